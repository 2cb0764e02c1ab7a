"""An Auto Scaling front for the moto server: moto (5.2) has no RecordLifecycleActionHeartbeat
or CompleteLifecycleAction, so this proxy answers those two itself, after checking them against
moto's own state (the hook exists on the group, the instance belongs to it), and records them;
every other request is forwarded to moto unchanged. `unparsable` makes it answer some calls
with a page that is not Auto Scaling's, as a proxy in its place does.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.faultproxy import LocalServer

LIFECYCLE_ACTIONS = ("RecordLifecycleActionHeartbeat", "CompleteLifecycleAction")
_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


@dataclass(frozen=True)
class LifecycleCall:
    action: str
    params: dict[str, str]
    at: float  # monotonic
    note: Any  # what the on_call callback said at that moment


@dataclass
class AutoScalingProxy:
    upstream: str
    moto: Any  # a boto3 autoscaling client on the moto server, to check the calls against
    on_call: Callable[[str], Any] = lambda action: None
    calls: list[LifecycleCall] = field(default_factory=list)
    # Action -> how many of its calls get a plain-text 503 (an Envoy-style proxy's page)
    # instead of an answer; counted down as they are sent.
    unparsable: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self._lock = threading.Lock()
        self._server = LocalServer(type("Handler", (_Handler,), {"proxy": self}))

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> AutoScalingProxy:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def take_unparsable(self, action: str) -> bool:
        with self._lock:
            left = self.unparsable.get(action, 0)
            if left:
                self.unparsable[action] = left - 1
            return bool(left)

    def named(self, action: str) -> list[LifecycleCall]:
        with self._lock:
            return [call for call in self.calls if call.action == action]

    def answer(self, action: str, params: dict[str, str]) -> str | None:
        """None when moto's state accepts the call, else the ValidationError's message."""
        group = params.get("AutoScalingGroupName", "")
        hooks = self.moto.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]
        if params.get("LifecycleHookName") not in [h["LifecycleHookName"] for h in hooks]:
            return f"No Lifecycle Hook found for {group}"
        found = self.moto.describe_auto_scaling_instances(
            InstanceIds=[params.get("InstanceId", "")])["AutoScalingInstances"]
        if not found or found[0]["AutoScalingGroupName"] != group:
            return f"instance {params.get('InstanceId')} is not in {group}"
        if action == "CompleteLifecycleAction" and \
                params.get("LifecycleActionResult") not in ("CONTINUE", "ABANDON"):
            return "LifecycleActionResult must be CONTINUE or ABANDON"
        with self._lock:
            self.calls.append(LifecycleCall(action, params, time.monotonic(),
                                            self.on_call(action)))
        return None


class _Handler(BaseHTTPRequestHandler):
    proxy: AutoScalingProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        action = params.pop("Action", "")
        if self.proxy.take_unparsable(action):
            self._reply(503, b"upstream connect error or disconnect/reset before headers. "
                        b"reset reason: connection failure", "text/plain")
            return
        if action not in LIFECYCLE_ACTIONS:
            self._reply(*self._forward(body))
            return
        params.pop("Version", None)
        problem = self.proxy.answer(action, params)
        if problem is None:
            self._reply(200, f'<{action}Response xmlns="{_NS}"><{action}Result/>'
                        f"<ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata>"
                        f"</{action}Response>".encode())
        else:
            self._reply(400, f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type>'
                        f"<Code>ValidationError</Code><Message>{problem}</Message></Error>"
                        f"<RequestId>proxy</RequestId></ErrorResponse>".encode())

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(*self.proxy._upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        try:
            connection.request("POST", self.path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _reply(self, status: int, payload: bytes, content_type: str = "text/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
