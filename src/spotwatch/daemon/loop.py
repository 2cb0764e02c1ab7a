"""Wires notice sources, trackers and the sync engine into the `run` daemon and `flush`."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
from watchdog.observers import Observer

from spotwatch.aws.health import S3Watch, imds_degraded_reason
from spotwatch.aws.imds import ImdsClient, disabled_reason
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.config import Config
from spotwatch.daemon import sdnotify
from spotwatch.daemon.hooks import NoticeHooks
from spotwatch.daemon.metrics import Metrics, MetricsServer
from spotwatch.daemon.prune_job import PruneJob
from spotwatch.model import Notice, NoticeKind, Outcome, UploadResult
from spotwatch.notices import sources_for
from spotwatch.notices.poller import NoticePoller
from spotwatch.progress import ProgressBar
from spotwatch.state import StateDir, StateLock, write_json_atomically
from spotwatch.sync.engine import Progress, SyncEngine
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.orphans import abort_orphaned_uploads
from spotwatch.sync.pruner import Pruner
from spotwatch.sync.throughput import plan_flush
from spotwatch.sync.tracker import ChangeTracker
from spotwatch.sync.uploader import Uploader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("spotwatch.daemon")

TICK_SECONDS = 0.05
STATUS_INTERVAL_SECONDS = 1.0
# Pruning lists the prefix in S3: at most this often.
PRUNE_INTERVAL_SECONDS = 5.0
# A flush's log line names at most this many files it left behind.
NAMED_FILES_MAX = 20


@dataclass
class FlushState:
    reason: str
    started: float
    deadline: datetime | None
    # Monotonic time after which it no longer waits for retries (None: no deadline).
    retries_until: float | None = None
    progress: Progress = field(default_factory=Progress)

    def tighten(self, deadline: datetime | None, until: float | None) -> None:
        """An earlier deadline tightens the flush; the work is the same."""
        if deadline and (self.deadline is None or deadline < self.deadline):
            self.deadline = deadline
        if until is None and deadline is not None:
            until = _monotonic_at(deadline)
        if until is not None and (self.retries_until is None or until < self.retries_until):
            self.retries_until = until


def _monotonic_at(moment: datetime) -> float:
    return time.monotonic() + (moment - datetime.now(timezone.utc)).total_seconds()


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    files: int
    bytes: int
    failed: int


class Daemon:
    def __init__(self, config: Config, bucket: str, client: S3Client | None = None) -> None:
        self.config = config
        self.bucket = bucket
        self.state = StateDir(config.state_dir)
        self.hooks = NoticeHooks(config.hooks, self.state)
        self._client = client
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._notices: queue.Queue[Notice] = queue.Queue()
        # Signal numbers received, taken by the loop (see _install_signal_handlers).
        self._signals: deque[int] = deque()
        self.flush: FlushState | None = None
        self.last_notice: dict[str, Any] | None = None
        self.last_flush: dict[str, Any] | None = None
        self._notice_seen = False
        self._status_due = 0.0
        self._keepalive_interval = sdnotify.watchdog_interval()
        self._keepalive_due = 0.0
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._engine: SyncEngine | None = None
        self._pruner: Pruner | None = None
        self._prune_job: PruneJob | None = None
        self._prune_due = 0.0
        self.metrics = Metrics(imds=config.imds.enabled)
        self._metrics_url: str | None = None
        self.s3_watch = S3Watch(lambda error: self.metrics.s3_errors.labels(error).inc())
        self._poller: NoticePoller | None = None

    # -- public entry points -------------------------------------------------------------

    def run(self, handle_signals: bool = True) -> int:
        """The daemon: upload continuously, flush on notices, final flush on SIGTERM."""
        with self._running(prune=True) as engine:
            self.hooks.start()
            poller = self._poller = self._start_poller()
            metrics_server = self._start_metrics_server()
            if handle_signals:
                self._install_signal_handlers()
            sdnotify.notify("READY=1\nSTATUS=watching")
            log.info("daemon_started", bucket=self.bucket, mode=self.config.sync.mode,
                     watch=[str(w.path) for w in self.config.watch], pid=os.getpid(),
                     metrics=self._metrics_url)
            try:
                while not self._stop.is_set():
                    self._step(engine)
                    self._wake.wait(TICK_SECONDS)
                    self._wake.clear()
                # The stop is bounded from here: stopping the poller counts against it.
                give_up_at = time.monotonic() + self.config.sync.stop_timeout
                sdnotify.notify("STOPPING=1\nSTATUS=final flush")
                if poller is not None:
                    poller.stop()
                return self._final_flush(engine, give_up_at)
            finally:
                if metrics_server is not None:
                    metrics_server.stop()

    def flush_once(self, progress: ProgressBar | None = None) -> RunOutcome:
        """Upload everything pending, waiting for files being written to settle."""
        with self._running() as engine:
            shown = progress if progress is not None and progress.enabled else None
            if shown is not None:  # no terminal, no per-chunk callbacks or byte sums
                engine.uploader.on_progress = shown
                engine.add_observer(
                    lambda r: shown.file_done() if r.outcome is Outcome.DONE else None)
            self._start_flush("manual", None)
            while True:
                self._step(engine)  # finishes the flush once nothing is left
                if shown is not None:
                    shown.grow_to(engine.totals.bytes + engine.outstanding_bytes())
                if self.flush is None:
                    break
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
            if shown is not None:
                shown.close()
            self._write_status(engine)  # what the flush left behind, e.g. incomplete sets
            failed = len(engine.left_behind(None))
            return RunOutcome(1 if failed else 0, engine.totals.files, engine.totals.bytes,
                              failed)

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def notify(self, notice: Notice) -> None:
        """Hand a notice to the daemon from any thread."""
        self._notices.put(notice)
        self._wake.set()

    # -- wiring --------------------------------------------------------------------------

    def _running(self, prune: bool = False) -> _Running:
        return _Running(self, prune)

    def _build_engine(self, prune: bool) -> SyncEngine:
        settings = self.config.sync
        trackers = [
            ChangeTracker(w, settings.settle_seconds, settings.quiet_seconds, self._wake.set)
            for w in self.config.watch
        ]
        client = self._client or make_s3_client(resolve_region(self.config),
                                                   self.config.transfer)
        self.s3_watch.attach(client)

        def uploader(on_result: Callable[[UploadResult], None]) -> Uploader:
            return Uploader(client, self.bucket, self.config.transfer, on_result)

        engine = SyncEngine(trackers, Ledger(self.state.ledger), uploader, self._wake.set)
        engine.add_observer(self._count_flush_progress)
        engine.add_observer(self._count_upload)
        self._engine = engine
        if prune:  # the daemon deletes; a one-off flush only uploads (see `spotwatch prune`)
            self._pruner = Pruner(client, self.bucket, engine.ledger, settings.delete,
                                  settings.keep_sets)
        return engine

    def _start_poller(self) -> NoticePoller | None:
        reason = disabled_reason(self.config.imds)
        if reason:
            log.warning("imds_disabled", reason=reason, detail="no interruption notices will "
                        "be seen: only a SIGTERM starts the final flush")
            return None
        poller = NoticePoller(ImdsClient.from_settings(self.config.imds),
                              sources_for(self.config.notices),
                              self.config.imds.poll_interval, self.notify)
        poller.start()
        return poller

    def _start_metrics_server(self) -> MetricsServer | None:
        settings = self.config.metrics
        if not settings.enabled:
            return None
        try:
            server = MetricsServer(self.metrics, settings.address, settings.port).start()
        except OSError as exc:
            # Metrics are a convenience: never a reason not to protect the checkpoints.
            log.warning("metrics_unavailable", address=settings.address, port=settings.port,
                        error=exc.strerror)
            return None
        self._metrics_url = server.url
        return server

    def _install_signal_handlers(self) -> None:
        # A handler runs on the main thread between any two bytecodes, also while the loop
        # holds the lock of an Event or a Queue: taking that lock again would hang the daemon
        # for good. So the handler only appends to a deque (no Python lock), and the loop acts
        # on it within a tick.
        def remember(signum: int, frame: FrameType | None) -> None:
            self._signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, remember)

    def _take_signals(self) -> None:
        received = set()
        while self._signals:
            received.add(self._signals.popleft())
        if signal.SIGUSR1 in received:  # `spotwatch flush` asking; several asks, one flush
            self.notify(Notice.make(NoticeKind.MANUAL, None, str(time.time())))
        if received & {signal.SIGTERM, signal.SIGINT}:
            self.request_stop()

    # -- the loop ------------------------------------------------------------------------

    def _uploads_allowed(self) -> bool:
        return (self.config.sync.mode == "continuous" or self._notice_seen
                or self.flush is not None)

    def _step(self, engine: SyncEngine) -> None:
        self._take_signals()
        while True:
            try:
                self._on_notice(self._notices.get_nowait())
            except queue.Empty:
                break
        self.metrics.tick()
        self.s3_watch.check()
        engine.collect_settled()
        self._maybe_prune(engine)  # before pump: a running prune stops once work arrives
        engine.pump(upload=self._uploads_allowed())
        if self.flush is not None and engine.flush_settled(self.flush.retries_until):
            self._finish_flush(engine)
        if self._keepalive_interval is not None and time.monotonic() >= self._keepalive_due:
            # systemd's watchdog restarts us if this loop ever stalls.
            sdnotify.notify("WATCHDOG=1")
            self._keepalive_due = time.monotonic() + self._keepalive_interval
        if time.monotonic() >= self._status_due:
            self._write_status(engine)
            self._status_due = time.monotonic() + STATUS_INTERVAL_SECONDS

    def _maybe_prune(self, engine: SyncEngine) -> None:
        """Deletes run only when all is quiet: never while a notice, a flush or an upload
        needs the time. The S3 work runs on a background thread, one prune at a time; the
        loop starts it, tells it to stop when work arrives, and collects what it deleted."""
        quiet = (self.flush is None and not self._notice_seen and engine.idle()
                 and not engine.unsettled())
        if self._prune_job is not None:
            self._tend_prune(engine, quiet)
            return
        if (self._pruner is None or not self._pruner.enabled or not engine.changed_since_prune
                or not quiet or time.monotonic() < self._prune_due):
            return
        engine.changed_since_prune = False
        self._prune_due = time.monotonic() + PRUNE_INTERVAL_SECONDS
        self._prune_job = PruneJob(self._pruner, self.config.watch, self._wake.set).start()

    def _tend_prune(self, engine: SyncEngine, quiet: bool) -> None:
        job = self._prune_job
        assert job is not None
        if not quiet:
            job.cancel()
        if not job.finished():
            return
        self._prune_job = None
        if not job.completed:  # failed or cancelled: try again when quiet
            engine.changed_since_prune = True
        engine.reseal_after_deletions([d.key for d in job.deleted if not d.retires])

    def _on_notice(self, notice: Notice) -> None:
        detected = datetime.now(timezone.utc)
        seconds_left = (notice.deadline - detected).total_seconds() if notice.deadline else None
        self.last_notice = {
            "kind": notice.kind.value,
            "id": notice.id,
            "detail": notice.detail,
            "deadline": notice.deadline.isoformat() if notice.deadline else None,
            "detected_at": detected.isoformat(),
        }
        log.info("notice_detected", kind=notice.kind.value, id=notice.id, detail=notice.detail,
                 deadline=self.last_notice["deadline"],
                 seconds_left=None if seconds_left is None else round(seconds_left, 1))
        self._emit("notice_detected", self.last_notice)
        self.metrics.notices.labels(notice.kind.value).inc()
        if notice.posted_at is not None:
            self.metrics.detection_latency.observe(
                max(0.0, (detected - notice.posted_at).total_seconds()))
        if notice.kind is not NoticeKind.MANUAL:
            self._notice_seen = True
            self.hooks.fire(dict(self.last_notice))
        self._start_flush(notice.kind.value, notice.deadline)

    def _start_flush(self, reason: str, deadline: datetime | None,
                     until: float | None = None) -> None:
        """Start a flush (or tighten the running one); until: a monotonic deadline."""
        if self._engine is not None:
            # A flush is the last chance: every file waiting to retry gets one more now.
            self._engine.retries.retry_now()
        if self.flush is not None:
            self.flush.tighten(deadline, until)
            return
        self.flush = FlushState(reason, time.monotonic(), deadline)
        self.flush.tighten(deadline, until)
        log.info("flush_started", reason=reason)
        if self._engine is not None:
            self._log_flush_plan(self._engine, deadline)

    def _log_flush_plan(self, engine: SyncEngine, deadline: datetime | None) -> None:
        seconds_left = ((deadline - datetime.now(timezone.utc)).total_seconds()
                        if deadline else None)
        plan = plan_flush(engine.remaining_work(), seconds_left,
                          engine.throughput.bytes_per_second())
        fields = {"files": plan.files, "bytes": plan.bytes,
                  "bandwidth_mib_s": round(plan.bytes_per_second / 2**20, 1),
                  "bandwidth": "measured" if plan.measured else "assumed",
                  "estimated_seconds": round(plan.estimated_seconds, 1),
                  "seconds_left": None if seconds_left is None else round(seconds_left, 1)}
        if plan.at_risk_sets:
            # Newest sets go first; these older ones may not make it before the deadline.
            log.warning("flush_at_risk", **fields, at_risk_sets=list(plan.at_risk_sets[:20]),
                        at_risk_count=len(plan.at_risk_sets))
        else:
            log.info("flush_plan", **fields)

    def _count_upload(self, result: UploadResult) -> None:
        if result.outcome is Outcome.DONE:
            self.metrics.uploaded(result.job.snapshot.size)
        elif result.outcome is Outcome.FAILED:
            self.metrics.upload_errors.inc()

    def _count_flush_progress(self, result: UploadResult) -> None:
        if self.flush is not None and result.outcome is Outcome.DONE:
            self.flush.progress.files += 1
            self.flush.progress.bytes += result.job.snapshot.size

    def _finish_flush(self, engine: SyncEngine) -> None:
        assert self.flush is not None
        flush, self.flush = self.flush, None
        seconds = time.monotonic() - flush.started
        margin = ((flush.deadline - datetime.now(timezone.utc)).total_seconds()
                  if flush.deadline else None)
        failed = engine.left_behind(flush.retries_until)
        engine.report_sets_left_behind(flush.retries_until)
        self.last_flush = {
            "reason": flush.reason,
            "seconds": round(seconds, 3),
            "files": flush.progress.files,
            "bytes": flush.progress.bytes,
            "failed": len(failed),
            "failed_files": [str(item.path) for item in failed[:NAMED_FILES_MAX]],
            "deadline_margin_seconds": None if margin is None else round(margin, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        (log.warning if failed else log.info)("flush_done", **self.last_flush)
        self.metrics.flush_duration.labels(flush.reason).observe(seconds)
        self._emit("flush_done", self.last_flush)

    def _final_flush(self, engine: SyncEngine, give_up_at: float) -> int:
        """Exit code 0 when everything is durable; 1 when the flush ran out of time or left
        failing files behind (logged as flush_incomplete, so the operator sees it)."""
        log.info("shutdown_started", pending=engine.pending_files(),
                 unsettled=engine.unsettled())
        self._start_flush("shutdown", None, give_up_at)
        while self.flush is not None and time.monotonic() < give_up_at:
            for tracker in engine.trackers:
                tracker.settle_all_closed()
            self._step(engine)
            if self.flush is not None:
                self._wake.wait(min(TICK_SECONDS, max(0.0, give_up_at - time.monotonic())))
                self._wake.clear()
        self._write_status(engine)
        if self.flush is None and engine.pending_files() == 0:
            log.info("daemon_stopped", files=engine.totals.files, bytes=engine.totals.bytes)
            return 0
        failing = engine.left_behind(give_up_at)
        log.error("flush_incomplete", pending_files=engine.pending_files(),
                  pending_bytes=engine.outstanding_bytes(), retrying=len(engine.retries),
                  uploading=engine.uploader.in_flight(), unsettled=engine.unsettled(),
                  failed_files=[str(item.path) for item in failing[:NAMED_FILES_MAX]],
                  timed_out=self.flush is not None)
        return 1

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event, data)

    def _degraded_reasons(self) -> list[str]:
        imds = self._poller.reachability if self._poller is not None else None
        reasons = (self.s3_watch.degraded_reason(), imds_degraded_reason(imds))
        return [reason for reason in reasons if reason is not None]

    def _write_status(self, engine: SyncEngine) -> None:
        pending_files, pending_bytes = engine.pending_files(), engine.outstanding_bytes()
        uploading = engine.uploader.in_flight()
        degraded = self._degraded_reasons()
        imds_up = self._poller.reachability.up if self._poller is not None else None
        status = {
            "pid": os.getpid(),
            "bucket": self.bucket,
            "updated_at": time.time(),
            "pending_files": pending_files,
            "pending_bytes": pending_bytes,
            "outstanding_bytes": pending_bytes,
            "retrying_files": len(engine.retries),
            "failing_files": len(engine.retries.failing()),
            "unsettled_files": engine.unsettled(),
            "uploading": uploading,
            "uploaded_files": engine.totals.files,
            "uploaded_bytes": engine.totals.bytes,
            "upload_failures": engine.totals.failures,
            "s3_errors": dict(self.s3_watch.errors),
            "imds_up": imds_up,
            "degraded": degraded,
            "last_upload_at": engine.last_upload_at,
            "last_notice": self.last_notice,
            "last_flush": self.last_flush,
            "flushing": self.flush is not None,
            "metrics_url": self._metrics_url,
            "incomplete_sets": sorted(engine.sealer.incomplete),
        }
        self.metrics.incomplete_sets.set(len(engine.sealer.incomplete))
        self.metrics.pending_files.set(pending_files)
        self.metrics.pending_bytes.set(pending_bytes)
        self.metrics.uploading.set(uploading)
        self.metrics.retrying.set(len(engine.retries))
        self.metrics.degraded = tuple(degraded)
        if self.metrics.imds_up is not None and imds_up is not None:
            self.metrics.imds_up.set(1 if imds_up else 0)
        try:
            write_json_atomically(self.state.status, status)
        except OSError as exc:
            log.warning("status_write_failed", error=exc.strerror)


class _Running:
    """Context for one run: state lock, engine, watchdog observer and startup scan."""

    def __init__(self, daemon: Daemon, prune: bool) -> None:
        self._daemon = daemon
        self._prune = prune
        self._lock = StateLock(daemon.state)
        self._observer: Any = None
        self._engine: SyncEngine | None = None

    def __enter__(self) -> SyncEngine:
        daemon = self._daemon
        daemon.state.ensure()
        self._lock.acquire()
        try:
            engine = self._engine = daemon._build_engine(self._prune)
            abort_orphaned_uploads(engine.uploader.client, daemon.bucket, engine.ledger)
            self._observer = Observer()
            for tracker in engine.trackers:
                tracker.watch_with(self._observer)
            self._observer.start()
            queued = engine.reconcile(daemon.config.sync.quiet_seconds)
            log.info("startup_scan_done", pending=queued, unsettled=engine.unsettled())
        except BaseException:
            self.__exit__()
            raise
        return engine

    def __exit__(self, *exc: object) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._engine is not None:
            self._engine.close()
        self._lock.release()
