"""An HTTP reverse proxy in front of the S3 server that injects faults by rule.

Each request is matched against the rules in order; the first rule with faults left applies:
an S3 error status (503 SlowDown, 500 InternalError, 501 NotImplemented, 403 AccessDenied,
400 RequestTimeout), a
connection reset before the request reaches S3 or after S3 handled it (the response is lost),
a response body cut off halfway (then reset, or closed in good order: "short"), a response
body with one byte flipped, a delay, or a DeleteObjects answered 200 with every key refused
("refuse-keys", as S3 reports a key it may not delete).
Everything else is forwarded untouched. The proxy records what it saw, so tests can check the
faults happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

ERROR_BODIES = {
    400: ("RequestTimeout", "Your socket connection to the server was not read from or written "
          "to within the timeout period."),
    403: ("AccessDenied", "Access Denied"),
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not "
          "implemented"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    access_key: str = ""  # the key id it was signed with (SigV4's Credential=), if signed
    signing_region: str = ""  # the region it was signed for (Credential=KEY/date/REGION/...)
    copy: bool = False  # a PUT that copies another object (x-amz-copy-source)

    @property
    def operation(self) -> str:
        """The S3 operation, as far as faults need telling them apart."""
        if self.copy and self.method == "PUT":
            return "UploadPartCopy" if "uploadId" in self.query else "CopyObject"
        if "uploadId" in self.query:
            return {"PUT": "UploadPart", "POST": "CompleteMultipartUpload",
                    "DELETE": "AbortMultipartUpload"}.get(self.method, "ListParts")
        if "uploads" in self.query:
            return "CreateMultipartUpload" if self.method == "POST" else "ListMultipartUploads"
        return {"PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(
            self.method, self.method)


@dataclass
class Rule:
    action: str  # "503", "500", "501", "403", "400", "reset", "reset-after", "truncate", "short",
    # "corrupt", "delay"
    matches: Callable[[Request], bool]
    times: int = 1
    delay: float = 0.0
    applied: int = 0
    # Set: the requests a "delay" rule holds are answered at once, as are those it takes later.
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()

    def take(self, request: Request) -> bool:
        if self.applied >= self.times or not self.matches(request):
            return False
        self.applied += 1
        return True


class _WideServer(ThreadingHTTPServer):
    # Clients that open a hundred connections at once are not made to wait out a SYN retry.
    request_queue_size = 512


class LocalServer:
    """A threaded HTTP server on a free localhost port, serving on its own thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = _WideServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def quiet_errors(self) -> None:
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[Request, str]] = field(default_factory=list)
    connections: int = 0  # accepted from clients
    # Per operation: requests being answered now, and the most that ever were at once.
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self._lock = threading.Lock()
        self._server = LocalServer(type("Handler", (_Handler,), {"proxy": self}))
        # Resets are the point here: no tracebacks for connections we or the client cut.
        self._server.quiet_errors()

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> FaultProxy:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def add(self, action: str, matches: Callable[[Request], bool], times: int = 1,
            delay: float = 0.0) -> Rule:
        rule = Rule(action, matches, times, delay)
        with self._lock:
            self.rules.append(rule)
        return rule

    def choose(self, request: Request) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.take(request):
                    return rule
        return None

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def begin(self, request: Request) -> None:
        with self._lock:
            now = self.in_flight[request.operation] = self.in_flight.get(request.operation, 0) + 1
            self.most_in_flight[request.operation] = max(
                now, self.most_in_flight.get(request.operation, 0))

    def end(self, request: Request) -> None:
        with self._lock:
            self.in_flight[request.operation] -= 1

    def most_at_once(self, operation: str) -> int:
        with self._lock:
            return self.most_in_flight.get(operation, 0)

    def record(self, request: Request, what: str) -> None:
        with self._lock:
            self.seen.append((request, what))

    def count(self, operation: str, what: str = "forwarded") -> int:
        with self._lock:
            return sum(1 for r, w in self.seen if r.operation == operation and w == what)


def _credential(authorization: str) -> tuple[str, str]:
    """The access key id and the region of a SigV4 Authorization header
    ("... Credential=KEY/date/REGION/s3/aws4_request, ...")."""
    scope = authorization.partition("Credential=")[2].partition(",")[0].split("/")
    return scope[0], scope[2] if len(scope) > 2 else ""


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:  # once per connection, however many requests it carries
        super().setup()
        self.proxy.connected()

    def _handle(self) -> None:
        body = self._read_body()
        parts = urlsplit(self.path)
        request = Request(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                          *_credential(self.headers.get("Authorization", "")),
                          copy="x-amz-copy-source" in self.headers)
        self.proxy.begin(request)
        try:
            self._answer(request, body)
        finally:
            self.proxy.end(request)

    def _answer(self, request: Request, body: bytes) -> None:
        rule = self.proxy.choose(request)
        action = rule.action if rule else "forward"
        if rule is not None and rule.action == "delay":
            rule.released.wait(rule.delay)  # the fault being simulated: a slow answer
        if action in ("503", "500", "501", "403", "400"):
            self.proxy.record(request, action)
            self._send_error(int(action))
            return
        if action == "refuse-keys":
            self.proxy.record(request, action)
            self._refuse_keys(body)
            return
        if action == "reset":
            self.proxy.record(request, "reset")
            self._reset()
            return
        status, headers, payload = self._forward(body)
        if action == "reset-after":
            self.proxy.record(request, "reset-after")
            self._reset()
            return
        if action == "corrupt" and payload:
            middle = len(payload) // 2
            payload = payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1:]
        self.proxy.record(request, action if action in ("truncate", "short", "corrupt")
                          else "forwarded")
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        # A HEAD reply tells the object's length without a body: pass it on unchanged.
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if action in ("truncate", "short"):  # the headers promise every byte; half arrive
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            if action == "truncate":
                self._reset()
            else:  # closed as if the body were complete
                self.close_connection = True
        elif self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _refuse_keys(self, body: bytes) -> None:
        """A DeleteObjects result that refuses every key the request named, S3's way."""
        keys = [element.text or "" for element in ElementTree.fromstring(body).iter()
                if element.tag.rpartition("}")[2] == "Key"]
        code, message = ERROR_BODIES[403]
        errors = "".join(f"<Error><Key>{escape(key)}</Key><Code>{code}</Code>"
                         f"<Message>{message}</Message></Error>" for key in keys)
        payload = ('<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns='
                   f'"http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.proxy._upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _send_error(self, status: int) -> None:
        code, message = ERROR_BODIES[status]
        payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST: the client sees a reset.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
