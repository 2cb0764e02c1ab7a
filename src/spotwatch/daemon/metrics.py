"""Prometheus metrics and /healthz on a local HTTP port (prometheus-client does the format).

The daemon updates the metrics; the server thread only reads them. /healthz answers 200 while
the daemon's loop has run recently and nothing is degraded (see spotwatch.aws.health), else 503
with the reason, so a supervisor can tell a stalled or cut-off daemon, or one still starting
(waiting for S3 to pass the preflight checks, say).
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric

import spotwatch

# The loop runs every 50 ms; this long without a tick means it is stuck.
HEALTHY_WITHIN_SECONDS = 10.0
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60)
_FLUSH_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 300)


class Metrics:
    def __init__(self, imds: bool = True, peers: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)  # process_*, python_info, python_gc_*
        Info("spotwatch_build", "spotwatch's version", registry=r).info(
            {"version": spotwatch.__version__})
        self.notices = Counter("spotwatch_notices", "Notices acted on", ["kind"], registry=r)
        self.detection_latency = Histogram(
            "spotwatch_notice_detection_seconds",
            "Time from AWS posting a notice to spotwatch seeing it", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.pending_files = Gauge("spotwatch_pending_files",
                                   "Files changed and not yet in S3", registry=r)
        self.pending_bytes = Gauge("spotwatch_pending_bytes",
                                   "Bytes changed and not yet in S3", registry=r)
        self.uploading = Gauge("spotwatch_uploads_in_flight", "Uploads in progress", registry=r)
        self.uploads_quiet = Gauge(
            "spotwatch_uploads_quiet_seconds",
            "How long the uploads in flight have made no progress (0: none in flight)",
            registry=r)
        self.incomplete_sets = Gauge(
            "spotwatch_incomplete_sets",
            "Checkpoint sets left without a manifest: a file of theirs is not in S3", registry=r)
        self.unsealed_sets = Gauge(
            "spotwatch_unsealed_sets",
            "Checkpoint sets still waiting for their manifest (no checkpoint until it is written)",
            registry=r)
        # Invariant 8 (never less pending work than there is): not known, NaN, until the first
        # scan counted it; a daemon waiting for S3 at start has not scanned, and 0 would say
        # that nothing is left to upload.
        for uncounted in (self.pending_files, self.pending_bytes, self.incomplete_sets,
                          self.unsealed_sets):
            uncounted.set(math.nan)
        self.uploaded_files = Counter("spotwatch_uploaded_files", "Files uploaded", registry=r)
        self.uploaded_bytes = Counter("spotwatch_uploaded_bytes", "Bytes uploaded", registry=r)
        self.upload_errors = Counter("spotwatch_upload_errors", "Failed uploads", registry=r)
        self.bandwidth_cap = Gauge(
            "spotwatch_bandwidth_cap_bytes_per_second",
            "The cap on continuous uploads in force (0: none, or lifted by a flush)", registry=r)
        self.retrying = Gauge("spotwatch_retrying_files",
                              "Files waiting to retry a failed upload", registry=r)
        self.s3_errors = Counter("spotwatch_s3_errors", "Failed S3 request attempts, retries "
                                 "included, by error class", ["class"], registry=r)
        self.imds_up: Gauge | None = None
        if imds:
            self.imds_up = Gauge("spotwatch_imds_up", "1 when the last poll reached IMDS",
                                 registry=r)
        self.peers_up: Gauge | None = None
        self.peer_poll_errors: Counter | None = None
        if peers:
            self.peers_up = Gauge("spotwatch_peers_up",
                                  "1 when the last poll of the job's peer notices succeeded",
                                  registry=r)
            self.peer_poll_errors = Counter("spotwatch_peer_poll_errors",
                                            "Failed polls of the job's peer notices", registry=r)
        self.flush_duration = Histogram("spotwatch_flush_duration_seconds",
                                        "Duration of flushes", ["reason"],
                                        buckets=_FLUSH_BUCKETS, registry=r)
        self._last_upload_at: float | None = None
        self._last_tick = time.monotonic()
        # Why /healthz is degraded (empty: it is not); set by the daemon's loop.
        self.degraded: tuple[str, ...] = ()
        # What the daemon's start is doing (checking S3, waiting for it, the startup scan),
        # which protects nothing yet; None once the loop runs.
        self.starting: str | None = None
        r.register(_LastUpload(self))

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    def healthy(self) -> bool:
        return time.monotonic() - self._last_tick < HEALTHY_WITHIN_SECONDS

    def health(self) -> tuple[bool, str]:
        """/healthz's verdict: (ok, the text to answer)."""
        if self.starting is not None:  # the loop does not tick meanwhile: not "stalled"
            return False, self.starting
        if not self.healthy():
            return False, "stalled"
        degraded = self.degraded
        if degraded:
            return False, "degraded: " + "; ".join(degraded)
        return True, "ok"

    def uploaded(self, size: int) -> None:
        self.uploaded_files.inc()
        self.uploaded_bytes.inc(size)
        self._last_upload_at = time.time()

    @property
    def last_upload_at(self) -> float | None:
        return self._last_upload_at


class _LastUpload:
    """The last upload's time and age; no sample at all before the first upload (a sentinel
    such as -1 would read as a real age in alerts and graphs)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        last = self._metrics.last_upload_at
        stamp = GaugeMetricFamily("spotwatch_last_upload_timestamp_seconds",
                                  "Unix time of the last successful upload")
        age = GaugeMetricFamily("spotwatch_last_upload_age_seconds",
                                "Seconds since the last successful upload")
        if last is not None:
            stamp.add_metric([], last)
            age.add_metric([], time.time() - last)
        yield stamp
        yield age


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the daemon's own log


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def _server_class(host: str, port: int) -> type[_ThreadingServer]:
    """The server for the family the address is of: an IPv6 literal ('::1', '::') or a name
    that resolves to IPv6 first cannot be bound by an IPv4 socket."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return _ThreadingServer6 if family == socket.AF_INET6 else _ThreadingServer


class MetricsServer:
    """Serves /metrics and /healthz until stopped."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, text = metrics.health()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain")])
                return [f"{text}\n".encode()]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        self._server = make_server(host, port, app, server_class=_server_class(host, port),
                                   handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
