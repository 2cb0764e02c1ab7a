"""What the daemon tells the outside: status.json, Prometheus gauges and counters, /healthz's
degraded reasons, and systemd keep-alives. Each write reads the engine once (EngineSnapshot),
so status.json and the gauges always agree."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from spotwatch.aws.health import Outage, S3Watch, unreachable_reason
from spotwatch.config import MetricsSettings
from spotwatch.daemon import sdnotify
from spotwatch.daemon.flush import FlushController
from spotwatch.daemon.hooks import NoticeHooks
from spotwatch.daemon.in_effect import NoticeReport
from spotwatch.daemon.metrics import Metrics, MetricsServer
from spotwatch.daemon.prune_job import PruneSchedule
from spotwatch.daemon.snapshot import EngineSnapshot
from spotwatch.daemon.state_guard import StateGuard
from spotwatch.logs import get_logger
from spotwatch.model import Notice, Outcome, UploadResult
from spotwatch.state import StateDir, write_json_atomically
from spotwatch.sync.bandwidth import BandwidthLimiter
from spotwatch.sync.engine import SyncEngine
from spotwatch.sync.sets.claim import RankClaim

log = get_logger("spotwatch.daemon")
# How long before the daemon's start a notice may say it was posted and still be timed.
POSTED_SLACK = timedelta(seconds=5)

STATUS_INTERVAL_SECONDS = 1.0
# status.json names at most this many incomplete and unsealed sets (the first in order); its
# *_set_count fields count them all.
STATUS_NAMED_SETS_MAX = 100
# While the first run of the preflight checks goes on (S3 silent: the SDK's timeouts, minutes),
# systemd's start timeout (the unit's TimeoutStartSec=60) is pushed this far from each message,
# sent every EXTEND_EVERY_SECONDS: a start still checking S3 is not killed and restarted.
START_EXTENSION_SECONDS = 60
EXTEND_EVERY_SECONDS = 10.0


class Reporter:
    def __init__(self, bucket: str, state: StateDir, metrics: Metrics) -> None:
        self._bucket = bucket
        self._state = state
        self.metrics = metrics
        self._started = datetime.now(UTC)
        self.s3_watch = S3Watch(lambda error: self.metrics.s3_errors.labels(error).inc())
        self.metrics_url: str | None = None
        self._server: MetricsServer | None = None
        # "run" (the daemon) or "flush" (a one-shot `spotwatch flush`, which is no daemon).
        self.role = "run"
        self._imds: Outage | None = None  # the poller's reachability, when IMDS is polled
        self._bandwidth: BandwidthLimiter | None = None  # the cap on continuous uploads
        self._peers: Outage | None = None  # the peer poller's, on a node of a job
        self._claim: RankClaim | None = None  # this node's claim on its rank, on a job
        self._guard: StateGuard | None = None  # the daemon's hold on the state directory
        self._hooks: NoticeHooks | None = None  # how the trainer is told of a notice
        self._pruning: PruneSchedule | None = None  # retention, when it is kept
        self._in_place = False  # status.json is written in place: the state disk is full
        self.peer_poll_failures = 0
        self._status_due = 0.0
        self._keepalive_interval = sdnotify.watchdog_interval()
        self._keepalive_due = 0.0
        self._extend_due = 0.0
        # While the start waits for S3 to pass the preflight checks: why, since when, runs.
        self._waiting: dict[str, Any] | None = None

    def watch_imds(self, reachability: Outage) -> None:
        self._imds = reachability

    def watch_bandwidth(self, limiter: BandwidthLimiter | None) -> None:
        self._bandwidth = limiter

    def watch_peers(self, reachability: Outage) -> None:
        self._peers = reachability

    def watch_state(self, guard: StateGuard) -> None:
        self._guard = guard

    def watch_hooks(self, hooks: NoticeHooks) -> None:
        self._hooks = hooks

    def watch_claim(self, claim: RankClaim) -> None:
        self._claim = claim

    def watch_pruning(self, pruning: PruneSchedule) -> None:
        self._pruning = pruning

    def problems(self) -> list[str]:
        """What needs a person: a rank claimed by two live nodes, or nodes that disagree on
        the job's node count, seal no part."""
        if self._claim is None:
            return []
        if self._claim.rival is not None:
            return [f"rank_claimed_twice: {self._claim.blocked()}"]
        beyond = self._claim.beyond
        return [] if beyond is None else [f"job_size_mismatch: {beyond}"]

    def sealing_held(self) -> str | None:
        """Why this node seals no part for now, short of a clash (problems names that one):
        the first check of its rank's claims, or a replaced node's claim not stale yet. Its
        sets wait meanwhile, unsealed."""
        if self._claim is None or self.problems():
            return None
        return self._claim.blocked()

    def count_peer_poll_failure(self) -> None:
        """Called from the peer poller's thread."""
        self.peer_poll_failures += 1
        if self.metrics.peer_poll_errors is not None:
            self.metrics.peer_poll_errors.inc()

    def start_server(self, settings: MetricsSettings) -> None:
        """Serve /metrics and /healthz (stopped by server_stopped_at_exit)."""
        if not settings.enabled:
            return
        try:
            self._server = MetricsServer(self.metrics, settings.address, settings.port).start()
        except OSError as exc:
            # Metrics are a convenience: never a reason not to protect the checkpoints.
            log.warning("metrics_unavailable", address=settings.address, port=settings.port,
                        error=exc.strerror)
            return
        self.metrics_url = self._server.url

    @contextmanager
    def server_stopped_at_exit(self) -> Iterator[None]:
        """The server start_server starts within stops at the end, however it ends."""
        try:
            yield
        finally:
            if self._server is not None:
                self._server.stop()
                self._server = None

    def starting(self, phase: str | None) -> None:
        """What the start is doing, for /healthz (503 meanwhile); None: it is over."""
        self.metrics.starting = None if phase is None else f"starting: {phase}"

    # -- counters, fed as things happen ---------------------------------------------------

    def count_upload(self, result: UploadResult) -> None:
        """An engine observer."""
        if result.outcome is Outcome.DONE:
            self.metrics.uploaded(result.job.snapshot.size)
        elif result.outcome is Outcome.FAILED:
            self.metrics.upload_errors.inc()

    def count_notice(self, notice: Notice, detected: datetime) -> None:
        """Detection latency only of a notice posted while the daemon ran: one posted before
        (while it was down, or a garbled time years ago) says nothing of how soon it sees one.
        POSTED_SLACK: a notice's time has whole seconds, and AWS's clock is not this host's."""
        self.metrics.notices.labels(notice.kind.value).inc()
        if notice.posted_at is not None and notice.posted_at >= self._started - POSTED_SLACK:
            self.metrics.detection_latency.observe(
                max(0.0, (detected - notice.posted_at).total_seconds()))

    def count_flush(self, reason: str, seconds: float) -> None:
        self.metrics.flush_duration.labels(reason).observe(seconds)

    # -- every loop step -------------------------------------------------------------------

    def beat(self) -> None:
        """The loop is alive (for /healthz); an S3 outage long enough is logged."""
        self.metrics.tick()
        self.s3_watch.check()

    def report_when_due(self, engine: SyncEngine, notices: NoticeReport,
                        flushes: FlushController) -> None:
        """Keep-alives and status.json, each when due."""
        self._keep_alive()
        if time.monotonic() >= self._status_due:
            self.write(engine, notices, flushes)
            self._status_due = time.monotonic() + STATUS_INTERVAL_SECONDS

    def _keep_alive(self) -> None:
        if self._keepalive_interval is not None and time.monotonic() >= self._keepalive_due:
            # systemd's watchdog restarts us if this loop ever stalls.
            sdnotify.notify("WATCHDOG=1")
            self._keepalive_due = time.monotonic() + self._keepalive_interval

    # -- while the start waits for S3 ------------------------------------------------------

    def extend_start_when_due(self) -> None:
        """The start goes on (no READY=1 yet): systemd must not time it out meanwhile."""
        if time.monotonic() >= self._extend_due:
            sdnotify.notify(f"EXTEND_TIMEOUT_USEC={START_EXTENSION_SECONDS * 1_000_000}\n"
                            "STATUS=checking S3 (preflight checks running)")
            self._extend_due = time.monotonic() + EXTEND_EVERY_SECONDS

    def wait_for_s3(self, reason: str, attempts: int) -> None:
        """A run of the preflight checks found S3 unreachable."""
        since = self._waiting["since"] if self._waiting else time.time()
        self._waiting = {"reason": reason, "since": since, "attempts": attempts}
        self.metrics.starting = f"waiting_for_s3: {self._waiting_reason()}"
        self._status_due = 0.0  # said at once

    def _waiting_reason(self) -> str:
        assert self._waiting is not None
        return (f"S3 unreachable at start ({self._waiting['reason']}): preflight checks "
                "pending, nothing uploads until they pass")

    def report_waiting_when_due(self, notices: NoticeReport) -> None:
        """Keep-alives and a status.json that says the daemon is up, telling the trainer of
        notices, and waiting for S3: no engine runs yet, so no pending counts are claimed."""
        self._keep_alive()
        if time.monotonic() < self._status_due or self._waiting is None:
            return
        self._status_due = time.monotonic() + STATUS_INTERVAL_SECONDS
        imds_up = self._imds.up if self._imds is not None else None
        # The gauges too: a metric that said IMDS down while status.json says up raised a
        # false alert through every wait for S3 at a boot.
        self._set_up_gauges(imds_up, self._peers.up if self._peers is not None else None)
        self._publish({
            "waiting_for_s3": self._waiting,
            "imds_up": imds_up,
            "degraded": [self._waiting_reason()],
            **notices.fields(),
            "metrics_url": self.metrics_url,
        })

    def write(self, engine: SyncEngine, notices: NoticeReport,
              flushes: FlushController) -> None:
        """status.json and the gauges, from one snapshot of the engine."""
        left = EngineSnapshot.of(engine)
        liveness = engine.uploader.liveness
        sending = engine.uploader.sending()  # not those waiting for a held copy
        degraded = self._degraded_reasons(liveness.stalled_reason(sending))
        self.metrics.uploads_quiet.set(liveness.quiet_seconds(sending))
        imds_up = self._imds.up if self._imds is not None else None
        peers_up = self._peers.up if self._peers is not None else None
        self._set_gauges(left, degraded, imds_up, peers_up)
        self._publish({
            "pending_files": left.pending_files,
            "pending_bytes": left.pending_bytes,
            "outstanding_bytes": left.pending_bytes,
            "retrying_files": left.retrying,
            "failing_files": left.failing,
            "failing_named": list(left.failing_files),
            "failing_because": left.failing_because,
            "unsettled_files": left.unsettled,
            "uploading": left.uploading,
            "uploaded_files": engine.totals.files,
            "uploaded_bytes": engine.totals.bytes,
            "upload_failures": engine.totals.failures,
            "s3_errors": dict(self.s3_watch.errors),
            "imds_up": imds_up,
            "peers_up": peers_up,
            "peer_poll_failures": self.peer_poll_failures,
            "degraded": degraded,
            "problems": self.problems(),
            "sealing_held": self.sealing_held(),
            "last_upload_at": engine.last_upload_at,
            **notices.fields(),
            "last_flush": flushes.last,
            "flushing": flushes.active,
            "metrics_url": self.metrics_url,
            # Named up to a bound, counted in full: with tens of thousands of sets (each
            # top-level file is one) the whole list would be rewritten every second.
            "incomplete_sets": list(left.incomplete_sets[:STATUS_NAMED_SETS_MAX]),
            "incomplete_set_count": len(left.incomplete_sets),
            "unsealed_sets": list(left.unsealed_sets[:STATUS_NAMED_SETS_MAX]),
            "unsealed_set_count": len(left.unsealed_sets),
            "unreadable_dirs": list(left.unreadable_dirs),
            "missing_dirs": list(left.missing_dirs),
            "bandwidth_cap": None if self._bandwidth is None else self._bandwidth.rate,
            "bandwidth_cap_lifted": None if self._bandwidth is None else self._bandwidth.lifted,
        })

    def _publish(self, fields: dict[str, Any]) -> None:
        """status.json: who reports and when (pid, role, bucket, updated_at), then fields.
        Not while another process holds the state lock: the file is that one's word then."""
        if self._guard is not None and not self._guard.held:
            return
        status = {"pid": os.getpid(), "role": self.role, "bucket": self._bucket,
                  "updated_at": time.time(), **fields}
        try:
            write_json_atomically(self._state.status, status)
            self._in_place = False
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._overwrite_status(status)
            else:
                log.warning("status_write_failed", error=exc.strerror)

    def _overwrite_status(self, status: dict[str, Any]) -> None:
        """Invariant: a full state disk never leaves the last report standing as current
        (pending 0, healthy, while uploads fail for want of ledger space). The report is
        written over the old one in place, in the blocks it has, saying the disk is full; a
        reader may meet it half written, which it takes for a report it cannot read (not
        healthy)."""
        full = (f"state directory full: {self._state.path} has no space left (status.json "
                "written in place, the ledger's writes fail)")
        body = json.dumps({**status, "degraded": [*status.get("degraded", ()), full]}).encode()
        try:
            with self._state.status.open("r+b") as handle:
                handle.write(body)
                handle.truncate()
        except OSError as exc:
            log.warning("status_write_failed", error=exc.strerror)
            return
        if not self._in_place:  # said once while it lasts
            self._in_place = True
            log.warning("status_written_in_place", reason=full)

    def _set_gauges(self, left: EngineSnapshot, degraded: list[str],
                    imds_up: bool | None, peers_up: bool | None) -> None:
        self.metrics.incomplete_sets.set(len(left.incomplete_sets))
        self.metrics.unsealed_sets.set(len(left.unsealed_sets))
        self.metrics.pending_files.set(left.pending_files)
        self.metrics.pending_bytes.set(left.pending_bytes)
        self.metrics.uploading.set(left.uploading)
        self.metrics.retrying.set(left.retrying)
        capped = self._bandwidth is not None and not self._bandwidth.lifted
        self.metrics.bandwidth_cap.set(self._bandwidth.rate if capped and self._bandwidth else 0)
        self.metrics.degraded = tuple(degraded)
        self._set_up_gauges(imds_up, peers_up)

    def _set_up_gauges(self, imds_up: bool | None, peers_up: bool | None) -> None:
        if self.metrics.imds_up is not None and imds_up is not None:
            self.metrics.imds_up.set(1 if imds_up else 0)
        if self.metrics.peers_up is not None and peers_up is not None:
            self.metrics.peers_up.set(1 if peers_up else 0)

    def _retention_reason(self) -> str | None:
        failing = None if self._pruning is None else self._pruning.failing
        return None if failing is None else f"retention failing, nothing pruned: {failing}"

    def _degraded_reasons(self, stalled: str | None) -> list[str]:
        reasons = (self.s3_watch.degraded_reason(), stalled,
                   unreachable_reason("IMDS", self._imds),
                   unreachable_reason("peer notices", self._peers),
                   None if self._guard is None else self._guard.degraded_reason(),
                   self._retention_reason(),
                   # A rank two live nodes claim seals no part: their sets stay unprotected.
                   *self.problems(),
                   *([] if self._hooks is None else self._hooks.degraded_reasons()))
        return [reason for reason in reasons if reason is not None]
