"""An EC2 instance metadata service emulator speaking IMDSv2 (tokens required) over HTTP.

Behaviour follows the real service: PUT /latest/api/token with a TTL header of 1..21600 gives a
token (400 otherwise, 403 when the PUT carries X-Forwarded-For); GETs without a valid, unexpired
token get 401; a missing item is 404. Notices are fired and faults injected through a control
API under /_emulator/ (POST JSON) or the Python methods of ImdsEmulator.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
SCHEDULED = "meta-data/events/maintenance/scheduled"
HISTORY = "meta-data/events/maintenance/history"  # completed or canceled events


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window(in_seconds: float) -> dict[str, str]:
    """A maintenance event's window as IMDS gives it: from in_seconds from now, two hours."""
    start = datetime.now(UTC) + timedelta(seconds=in_seconds)
    fmt = "%d %b %Y %H:%M:%S GMT"
    return {"NotBefore": start.strftime(fmt),
            "NotAfter": (start + timedelta(hours=2)).strftime(fmt)}


@dataclass
class Fault:
    status: int | None = None  # answer this status instead
    delay: float = 0.0  # wait this long before answering
    remaining: int = 1
    applies_to: str = "get"  # "get", "token" or "all"
    path: str | None = None  # only GETs of this item, e.g. "meta-data/spot/instance-action"

    def matches(self, kind: str, path: str | None) -> bool:
        return (self.remaining > 0 and self.applies_to in (kind, "all")
                and (self.path is None or self.path == path))


@dataclass
class _State:
    region: str = "us-west-2"
    instance_id: str = "i-0123456789abcdef0"
    items: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    faults: list[Fault] = field(default_factory=list)
    disabled: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    fired_at: dict[str, float] = field(default_factory=dict)  # notice kind -> wall time


class ImdsEmulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, region: str = "us-west-2") -> None:
        self.state = _State(region=region)
        self.lock = threading.Lock()
        self.reset()
        handler = type("Handler", (_Handler,), {"emulator": self})
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="imds-emulator",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        return f"http://{shown}:{port}"

    def start(self) -> ImdsEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImdsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scenario control (also reachable over HTTP) --------------------------------------

    def reset(self) -> None:
        with self.lock:
            state = self.state
            state.items = {
                "meta-data/instance-id": state.instance_id,
                "meta-data/instance-type": "g5.xlarge",
                "meta-data/placement/region": state.region,
                "meta-data/placement/availability-zone": f"{state.region}a",
                "meta-data/instance-life-cycle": "spot",
                SCHEDULED: "[]",
                "dynamic/instance-identity/document": json.dumps(
                    {"region": state.region, "instanceId": state.instance_id,
                     "availabilityZone": f"{state.region}a"}),
            }
            state.faults.clear()
            state.disabled = False
            state.counts.clear()
            state.fired_at.clear()

    def set_instance(self, instance_id: str, tags: dict[str, str] | None = None) -> str:
        """Be the metadata of this instance (e.g. one an Auto Scaling group launched), with
        these instance tags under meta-data/tags/instance/ (IMDS serves them when enabled)."""
        with self.lock:
            self.state.instance_id = instance_id
        self.reset()
        with self.lock:
            for name, value in (tags or {}).items():
                self.state.items[f"meta-data/tags/instance/{name}"] = value
        return instance_id

    def fire_spot_interruption(self, action: str = "terminate", in_seconds: float = 120) -> str:
        when = _iso(datetime.now(UTC) + timedelta(seconds=in_seconds))
        body = json.dumps({"action": action, "time": when})
        with self.lock:
            self.state.items["meta-data/spot/instance-action"] = body
            if action in ("terminate", "stop"):
                self.state.items["meta-data/spot/termination-time"] = when
            self.state.fired_at["spot"] = time.time()
        return body

    def fire_rebalance(self) -> str:
        body = json.dumps({"noticeTime": _iso(datetime.now(UTC))})
        with self.lock:
            self.state.items["meta-data/events/recommendations/rebalance"] = body
            self.state.fired_at["rebalance"] = time.time()
        return body

    def schedule_event(self, code: str = "system-reboot", in_seconds: float = 3600,
                       state: str = "active") -> str:
        event = {"Code": code, "State": state,
                 "EventId": f"instance-event-{secrets.token_hex(8)}",
                 "Description": f"scheduled {code}", **_window(in_seconds)}
        with self.lock:
            events = json.loads(self.state.items[SCHEDULED])
            events.append(event)
            body = json.dumps(events)
            self.state.items[SCHEDULED] = body
            self.state.fired_at["scheduled"] = time.time()
        return body

    def cancel_event(self, event_id: str | None = None, to_history: bool = True) -> str:
        """Cancel a scheduled event (the newest when none is named) as AWS does: its State
        becomes "canceled" and it moves to events/maintenance/history (to_history=False: it
        stays in the scheduled list, marked canceled). Returns the scheduled list."""
        with self.lock:
            items = self.state.items
            events = json.loads(items[SCHEDULED])
            event = next((e for e in reversed(events) if event_id in (None, e["EventId"])),
                         None)
            if event is None:
                raise KeyError(f"no scheduled event {event_id!r}")
            event["State"] = "canceled"
            event["Description"] = f"[Canceled] {event.get('Description', '')}"
            if to_history:
                events.remove(event)
                items[HISTORY] = json.dumps([*json.loads(items.get(HISTORY, "[]")), event])
            items[SCHEDULED] = json.dumps(events)
            return items[SCHEDULED]

    def reschedule_event(self, event_id: str | None = None, in_seconds: float = 3600) -> str:
        """Move a scheduled event (the newest when none is named) to start in_seconds from now,
        keeping its EventId, as `aws ec2 modify-instance-event-start-time` does. Returns the
        scheduled list."""
        with self.lock:
            events = json.loads(self.state.items[SCHEDULED])
            event = next((e for e in reversed(events) if event_id in (None, e["EventId"])),
                         None)
            if event is None:
                raise KeyError(f"no scheduled event {event_id!r}")
            event.update(_window(in_seconds))
            self.state.items[SCHEDULED] = json.dumps(events)
            return self.state.items[SCHEDULED]

    def set_lifecycle_state(self, target: str) -> str:
        with self.lock:
            self.state.items["meta-data/autoscaling/target-lifecycle-state"] = target
            self.state.fired_at["asg"] = time.time()
        return target

    def set_item(self, path: str, body: str) -> str:
        """Serve this text at a metadata item as it is, e.g. an answer no real IMDS gives."""
        with self.lock:
            self.state.items[path] = body
        return body

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.state.faults.append(fault)

    def expire_tokens(self) -> None:
        with self.lock:
            self.state.tokens.clear()

    def set_disabled(self, disabled: bool) -> None:
        with self.lock:
            self.state.disabled = disabled

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.state.counts)

    def gets_of(self, item: str) -> int:
        """How many GETs of this item (e.g. "meta-data/spot/instance-action") arrived."""
        return self.counts().get(f"get {item}", 0)

    # -- request handling -----------------------------------------------------------------

    def count(self, what: str) -> None:
        with self.lock:
            self.state.counts[what] = self.state.counts.get(what, 0) + 1

    def take_fault(self, kind: str, path: str | None = None) -> Fault | None:
        with self.lock:
            for fault in self.state.faults:
                if fault.matches(kind, path):
                    fault.remaining -= 1
                    return fault
            return None

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(42)
        with self.lock:
            now = time.monotonic()
            self.state.tokens = {t: e for t, e in self.state.tokens.items() if e > now}
            self.state.tokens[token] = now + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        with self.lock:
            return token is not None and self.state.tokens.get(token, 0) > time.monotonic()

    def item(self, path: str) -> str | None:
        with self.lock:
            if path in self.state.items:
                return self.state.items[path]
            # A directory lists its children, one per line, subdirectories with a slash.
            prefix = path.rstrip("/") + "/"
            children = sorted({
                key[len(prefix):].split("/", 1)[0] + ("/" if "/" in key[len(prefix):] else "")
                for key in self.state.items if key.startswith(prefix)
            })
            return "\n".join(children) if children else None

    def control(self, action: str, body: dict[str, Any]) -> tuple[int, Any]:
        if action == "spot":
            return 200, self.fire_spot_interruption(body.get("action", "terminate"),
                                                    float(body.get("in_seconds", 120)))
        if action == "rebalance":
            return 200, self.fire_rebalance()
        if action == "scheduled":
            return 200, self.schedule_event(body.get("code", "system-reboot"),
                                            float(body.get("in_seconds", 3600)))
        if action == "reschedule":
            return 200, self.reschedule_event(body.get("event_id"),
                                              float(body.get("in_seconds", 3600)))
        if action == "cancel-scheduled":
            return 200, self.cancel_event(body.get("event_id"),
                                          bool(body.get("to_history", True)))
        if action == "asg":
            return 200, self.set_lifecycle_state(body.get("state", "Terminated"))
        if action == "instance":
            return 200, self.set_instance(str(body["instance_id"]), body.get("tags"))
        if action == "fault":
            self.add_fault(Fault(status=body.get("status"), delay=float(body.get("delay", 0)),
                                 remaining=int(body.get("count", 1)),
                                 applies_to=body.get("applies_to", "get"),
                                 path=body.get("path")))
            return 200, "ok"
        if action == "expire-tokens":
            self.expire_tokens()
            return 200, "ok"
        if action == "disable":
            self.set_disabled(bool(body.get("disabled", True)))
            return 200, "ok"
        if action == "reset":
            self.reset()
            return 200, "ok"
        if action == "stats":
            with self.lock:
                return 200, {"counts": dict(self.state.counts),
                             "fired_at": dict(self.state.fired_at)}
        return 404, f"unknown control action {action!r}"


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    emulator: ImdsEmulator
    server_version = "EC2ws"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the demo print their own timelines

    def _send(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _fault(self, kind: str, path: str | None = None) -> bool:
        """Apply an injected fault; True when it already answered the request."""
        fault = self.emulator.take_fault(kind, path)
        if fault is None:
            return False
        if fault.delay:
            time.sleep(fault.delay)
        if fault.status is not None:
            self.emulator.count(f"fault_{fault.status}")
            self._send(fault.status, "injected fault")
            return True
        return False

    def do_PUT(self) -> None:
        if self.path.startswith("/_emulator/"):
            self._control()
            return
        if self.path != "/latest/api/token":
            self._send(405 if self.path.startswith("/latest/") else 404)
            return
        self.emulator.count("token_put")
        if self.emulator.state.disabled or "X-Forwarded-For" in self.headers:
            self._send(403, "Forbidden")
            return
        if self._fault("token"):
            return
        ttl_text = self.headers.get(TTL_HEADER, "")
        if not ttl_text.isdigit() or not 1 <= int(ttl_text) <= MAX_TTL:
            self.emulator.count("token_400")
            self._send(400, "Bad Request")
            return
        token = self.emulator.issue_token(int(ttl_text))
        self._send(200, token, {TTL_HEADER: ttl_text})

    def do_GET(self) -> None:
        if self.path.startswith("/_emulator/"):
            self._control()
            return
        self.emulator.count("get")
        self.emulator.count(f"get {self.path.removeprefix('/latest/')}")
        if self.emulator.state.disabled:
            self._send(403, "Forbidden")
            return
        if self._fault("get", self.path.removeprefix("/latest/")):
            return
        if not self.emulator.token_valid(self.headers.get(TOKEN_HEADER)):
            self.emulator.count("get_401")
            self._send(401, "Unauthorized")
            return
        if not self.path.startswith("/latest/"):
            self._send(404, "Not Found")
            return
        body = self.emulator.item(self.path[len("/latest/"):])
        if body is None:
            self._send(404, "Not Found")
        else:
            self._send(200, body)

    def do_POST(self) -> None:
        if self.path.startswith("/_emulator/"):
            self._control()
        else:
            self._send(405, "Method Not Allowed")

    def _control(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self._send(400, "control body must be JSON")
            return
        action = self.path[len("/_emulator/"):].strip("/")
        if not isinstance(body, dict):
            self._send(400, f"{action}: control body must be a JSON object")
            return
        try:
            status, result = self.emulator.control(action, body)
        except (ArithmeticError, KeyError, TypeError, ValueError) as exc:
            # A wrong value in a scenario is the caller's mistake: say so, keep serving.
            self._send(400, f"{action}: bad control body: {exc!r}")
            return
        self._send(status, result if isinstance(result, str) else json.dumps(result))
