"""The daemon's loop: wires notices, signals, the sync engine, flushes, pruning and reporting
into `run` (and the one-shot `flush`). Each job lives in its own module beside this one."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from spotwatch.aws.autoscaling import LifecycleAction, make_autoscaling_client
from spotwatch.aws.imds import ImdsClient, disabled_reason
from spotwatch.aws.region import resolve_region
from spotwatch.aws.store import StoreError
from spotwatch.config import Config
from spotwatch.daemon import sdnotify
from spotwatch.daemon.flush import FlushController
from spotwatch.daemon.hooks import NoticeHooks
from spotwatch.daemon.in_effect import (
    SPOT_NOTICE_OUTLIVED,
    Held,
    NoticeReport,
    NoticesInEffect,
    replaces_spot_notices,
    spot_notice_outlived,
)
from spotwatch.daemon.metrics import Metrics
from spotwatch.daemon.prune_job import JOB_PRUNE_SECONDS, PruneSchedule
from spotwatch.daemon.reporter import Reporter
from spotwatch.daemon.session import Parts, Session
from spotwatch.daemon.signals import SignalInbox
from spotwatch.daemon.snapshot import EngineSnapshot
from spotwatch.daemon.startup import StartChecks, log_results
from spotwatch.daemon.state_guard import StateGuard
from spotwatch.errors import SpotwatchError
from spotwatch.logs import get_logger
from spotwatch.model import Notice, NoticeKind, NoticeListing, PeerWithdrawal
from spotwatch.notices import sources_for
from spotwatch.notices.claims import (
    CLAIM_EVERY_POLLS,
    STALE_ROUNDS,
    ClaimCheck,
    RankClaims,
    claims_roots,
)
from spotwatch.notices.peers import (
    SHARED_KINDS,
    PeerChannel,
    PeerPoller,
    PeerPublisher,
    channel_prefixes,
)
from spotwatch.notices.poller import NoticePoller
from spotwatch.notices.sources import due_by
from spotwatch.notices.store import Told
from spotwatch.state import StateDir
from spotwatch.sync.bandwidth import BandwidthLimiter, limiter_for
from spotwatch.sync.engine import SyncEngine

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = get_logger("spotwatch.daemon")

TICK_SECONDS = 0.05
# How often the watched directories are scanned again while a flush or this instance's notice
# is under way: the emergency checkpoint may be written through a memory mapping too.
FLUSH_RESCAN_SECONDS = 5.0
# Beyond sync.stop_timeout, the time a stop may take to exit (peers, lifecycle, status).
STOP_EXIT_MARGIN_SECONDS = 15.0
# How long the final flush waits for CompleteLifecycleAction before the process exits.
LIFECYCLE_COMPLETE_WAIT = 10.0
# How long stopping waits for the peer notice threads (a request under way is abandoned).
PEERS_STOP_WAIT = 1.0


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    files: int
    bytes: int
    failed: int


class FlushWatcher(Protocol):
    """Follows a one-shot flush, e.g. a progress bar."""

    def attach(self, engine: SyncEngine) -> None: ...

    def update(self, engine: SyncEngine) -> None: ...

    def close(self) -> None: ...


class Daemon:
    def __init__(self, config: Config, bucket: str, client: S3Client | None = None) -> None:
        self.config = config
        self.bucket = bucket
        self.state = StateDir(config.state_dir)
        self.hooks = NoticeHooks(config.hooks, self.state)
        self.metrics = Metrics(imds=config.imds.enabled, peers=config.job.is_multi_node)
        self.reporter = Reporter(bucket, self.state, self.metrics)
        self.reporter.watch_hooks(self.hooks)
        # A flush with no deadline waits for files being written as long as a stop may take.
        self.flushes = FlushController(write_wait=config.sync.stop_timeout)
        self._client = client
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Notices, and what the items that withdraw notices list as in effect, in order.
        self._notices: queue.Queue[Notice | NoticeListing | PeerWithdrawal] = queue.Queue()
        self._signals = SignalInbox()
        # The latest notice learnt (cancelled_at once withdrawn); see notice_report for what
        # status shows.
        self._latest_notice: dict[str, Any] | None = None
        self._in_effect = NoticesInEffect()
        self._told: Told | None = None  # the notice the trainer has
        # Since when this process knows of a notice told by an earlier run (in_effect's
        # SPOT_NOTICE_OUTLIVED).
        self._began = datetime.now(UTC)
        # Demo only: told of notice_detected and flush_done as they happen.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._pruning: PruneSchedule | None = None
        self._lifecycle: LifecycleAction | None = None
        # Monotonic time before which the scale-in is not continued (asg.save_grace).
        self._lifecycle_grace_ends: float | None = None
        # Continuous uploads share this cap until a notice or a stop lifts it (run only).
        self.bandwidth: BandwidthLimiter | None = None
        self._publisher: PeerPublisher | None = None
        self._poller: NoticePoller | None = None
        # Notices told to the trainer while the start waited for S3; their flushes start
        # (and peers learn of them) once the engine runs.
        self._deferred: list[Notice] = []
        self._claims: RankClaims | None = None  # this node's claim on its rank, on a job
        self._guard: StateGuard | None = None  # the daemon's hold on its state directory

    # -- public entry points -------------------------------------------------------------

    def run(self, handle_signals: bool = True, checks: StartChecks | None = None) -> int:
        """The daemon: upload continuously, flush on notices, final flush on SIGTERM.
        checks: the preflight checks to pass before anything touches S3 (`spotwatch run`)."""
        self.bandwidth = limiter_for(self.config.sync.continuous_bandwidth)
        self.reporter.watch_bandwidth(self.bandwidth)
        if handle_signals:
            self._signals.install_flush_requests()

        def before_s3() -> None:
            self._start_notices()
            # From here /healthz answers, 503 while the start checks S3, waits for it or scans
            # the watched directories (saying which), instead of refusing connections.
            self.reporter.start_server(self.config.metrics)
            self.reporter.starting("preflight checks running")
            if checks is not None:
                self._await_checks(checks, handle_signals)
            self.reporter.starting("startup scan")

        session = self._session(prune=True, throttle=self.bandwidth, before_s3=before_s3)
        self._guard = StateGuard(self.state, session.lock)
        self.reporter.watch_state(self._guard)
        with self.reporter.server_stopped_at_exit(), session as parts:
            engine = self._observe(parts)
            if parts.pruner is not None:
                self._pruning = PruneSchedule(
                    parts.pruner, self.config.watch, self._wake.set,
                    unchanged_every=JOB_PRUNE_SECONDS if self.config.job.is_multi_node else None)
                self.reporter.watch_pruning(self._pruning)
            peer_poller = self._start_peers(parts)
            self._flush_deferred(engine)
            poller = self._poller
            if handle_signals:
                self._signals.install()
            self.reporter.starting(None)
            sdnotify.notify("READY=1\nSTATUS=watching")
            log.info("daemon_started", bucket=self.bucket, mode=self.config.sync.mode,
                     watch=[str(w.path) for w in self.config.watch], pid=os.getpid(),
                     metrics=self.reporter.metrics_url)
            try:
                while not self._stop.is_set():
                    self._step(engine)
                    self._sleep(TICK_SECONDS)
                # The stop is bounded from here: stopping the poller counts against it.
                give_up_at = self.flushes.give_up_at(self.config.sync.stop_timeout)
                # Asks systemd for the stop this config allows (with room to exit): a
                # sync.stop_timeout above the unit's TimeoutStopSec would be cut short unsaid.
                stop_usec = int((self.config.sync.stop_timeout + STOP_EXIT_MARGIN_SECONDS) * 1e6)
                sdnotify.notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={stop_usec}\n"
                                "STATUS=final flush")
                if poller is not None:
                    poller.stop()
                if peer_poller is not None:
                    peer_poller.stop(PEERS_STOP_WAIT)
                return self._final_flush(engine, give_up_at)
            finally:
                if self._publisher is not None:
                    self._publisher.stop(PEERS_STOP_WAIT)
                self._withdraw_claim()

    def flush_once(self, watcher: FlushWatcher | None = None,
                   until: float | None = None) -> RunOutcome:
        """Upload everything pending, waiting for files being written to settle and for files
        failing for a transient reason up to sync.stop_timeout from the flush's start, or up
        to `until` (monotonic: the command's own limit, which its checks before began to use)."""
        self.reporter.role = "flush"
        with self._session() as parts:
            engine = self._observe(parts)
            if watcher is not None:
                watcher.attach(engine)
            self._start_flush(engine, "manual", None, until=until, scan=False)
            while True:
                self._step(engine)  # finishes the flush once nothing is left
                if watcher is not None:
                    watcher.update(engine)
                if not self.flushes.active:
                    break
                self._sleep(TICK_SECONDS)
            if watcher is not None:
                watcher.close()
            self._write_status(engine)  # what the flush left behind, e.g. incomplete sets
            failed = len(engine.left_behind(None))
            left = EngineSnapshot.of(engine)
            incomplete = bool(failed or left.pending_files or engine.being_written()
                              or any(left.unprotected.values()))  # pending: it ran overdue
            return RunOutcome(1 if incomplete else 0, engine.totals.files, engine.totals.bytes,
                              failed)

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def hand_notice(self, notice: Notice | NoticeListing | PeerWithdrawal) -> None:
        """Hand a notice, a listing of those in effect or a peer's withdrawal, to the daemon
        from any thread."""
        self._notices.put(notice)
        self._wake.set()

    # -- wiring --------------------------------------------------------------------------

    def _session(self, prune: bool = False, throttle: BandwidthLimiter | None = None,
                 before_s3: Callable[[], None] | None = None) -> Session:
        return Session(self.config, self.bucket, self.state, self.reporter.s3_watch,
                       self._wake.set, self._client, prune, throttle, before_s3,
                       check_claims=prune)  # the daemon's peer poller checks them

    def _start_notices(self) -> None:
        """With the state lock held and before anything touches S3: from here on the trainer
        is told of notices, whatever S3 does."""
        self._told = self.hooks.start()  # a restart keeps the notice told before
        self._lifecycle = self._lifecycle_action()
        self._poller = self._start_poller()

    def _await_checks(self, checks: StartChecks, handle_signals: bool) -> None:
        """Until the preflight checks pass. Invariant: while S3 is only unreachable, the
        daemon waits rather than exiting, and tells the trainer of notices as ever (their
        flushes wait for the engine: nothing uploads before the checks pass, they refuse a
        bucket in another region or a public one). A refusal ends it as at start; so does a
        stop, with exit 1: nothing could be made durable. A stop during the first run of the
        checks too (it may last the SDK's timeouts, with notices told meanwhile and the
        lifecycle action held): SIGTERM's default action would end it without a word."""
        waiting_since: float | None = None
        if handle_signals:
            self._signals.install()
        while True:
            verdict = checks.poll()
            if verdict is not None and verdict.unreachable is None:
                log_results(verdict.results)
                refused = verdict.refusal
                if refused is not None:
                    self._release_lifecycle(durable=False)
                    raise SpotwatchError(f"refusing to start: {refused.name}: {refused.detail}")
                if waiting_since is not None:
                    log.info("s3_checks_passed", waited_seconds=round(
                        time.monotonic() - waiting_since, 1), attempts=checks.attempts + 1)
                return
            if verdict is not None and verdict.unreachable is not None:
                if waiting_since is None:
                    log_results(verdict.results)
                    log.warning("s3_unreachable_at_start", reason=verdict.unreachable.detail,
                                detail="notices still reach the trainer; nothing uploads until "
                                "the preflight checks pass, checked again with backoff")
                    waiting_since = time.monotonic()
                    sdnotify.notify("READY=1\nSTATUS=waiting for S3 (preflight checks pending)")
                self.reporter.wait_for_s3(verdict.unreachable.detail, checks.attempts)
            self._take_signals()
            if self._stop.is_set():
                self._stop_before_checks_passed(waiting_since is not None)
            self._tell_while_waiting()
            self._end_outlived_notices(datetime.now(UTC))
            self._keep_state_dir()
            if waiting_since is not None:
                self.reporter.report_waiting_when_due(self.notice_report())
            else:
                self.reporter.extend_start_when_due()
            self._sleep(TICK_SECONDS)

    def _stop_before_checks_passed(self, waited: bool) -> NoReturn:
        """waited: a run of the checks found S3 unreachable (else the first still ran)."""
        if waited:
            log.error("stopped_waiting_for_s3", notices_told=len(self._deferred),
                      detail="S3 never became reachable: nothing was uploaded")
        else:
            log.error("stopped_during_checks", notices_told=len(self._deferred),
                      detail="the preflight checks had not finished: nothing was uploaded")
        self._release_lifecycle(durable=False)
        raise SpotwatchError("stopped while waiting for S3 to become reachable: nothing was "
                             "uploaded" if waited else "stopped before the preflight checks "
                             "finished: nothing was uploaded")

    def _tell_while_waiting(self) -> None:
        while True:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                return
            if isinstance(notice, NoticeListing | PeerWithdrawal):
                self._take_listing(notice)
            else:
                self._learn(notice)
                self._deferred.append(notice)

    def _flush_deferred(self, engine: SyncEngine) -> None:
        """The notices told while the start waited for S3: shared with peers now, and flushed
        (the trainer is not told again: it has them)."""
        for notice in self._deferred:
            self._share(notice)
            self._start_flush(engine, notice.kind.value, notice.deadline)
        self._deferred.clear()

    def _observe(self, parts: Parts) -> SyncEngine:
        """The engine, with the flush and the metrics counting its results."""
        parts.engine.add_observer(self.flushes.count)
        parts.engine.add_observer(self.reporter.count_upload)
        return parts.engine

    def _lifecycle_action(self) -> LifecycleAction | None:
        settings = self.config.asg
        if settings.lifecycle_hook is None:
            return None
        client = make_autoscaling_client(resolve_region(self.config))
        return LifecycleAction(settings, self.config.imds, client)

    def _start_peers(self, parts: Parts) -> PeerPoller | None:
        """On a node of a job: publish this node's notices, learn the others', and keep
        this node's claim on its rank (each on a thread of its own). The publisher runs on
        through the final flush."""
        rank = self.config.job.rank
        if not self.config.job.is_multi_node or rank is None:
            return None
        # A channel per watched prefix: nodes meet on any prefix they share.
        channels = [PeerChannel(parts.store, prefix, rank)
                    for prefix in channel_prefixes(self.config)]
        self._publisher = PeerPublisher(channels)
        self._publisher.start()
        interval = self.config.job.peer_poll_interval
        claim = parts.claim
        on_claims = None
        if claim is not None:
            self._claims = RankClaims(parts.store, claims_roots(self.config), rank,
                                      claim.identity,
                                      interval * CLAIM_EVERY_POLLS * STALE_ROUNDS,
                                      self.config.job.nodes)
            self.reporter.watch_claim(claim)

            def on_claims(check: ClaimCheck) -> None:
                claim.checked(check.live, check.undecided, check.beyond)
                self._wake.set()  # sets held for the check are sealed at once

        poller = PeerPoller(channels, interval, self.hand_notice,
                            started_at=datetime.now(UTC),
                            on_failure=self.reporter.count_peer_poll_failure,
                            claims=self._claims, on_claims=on_claims)
        self.reporter.watch_peers(poller.reachability.outage)
        poller.start()
        return poller

    def _withdraw_claim(self) -> None:
        if self._claims is None:
            return
        try:
            self._claims.withdraw()
        except StoreError as exc:  # it goes stale: a replacement waits a little longer
            log.warning("rank_claim_withdraw_failed", keys=self._claims.keys,
                        error=str(exc))

    def _start_poller(self) -> NoticePoller | None:
        reason = disabled_reason(self.config.imds)
        if reason:
            log.warning("imds_disabled", reason=reason, detail="no interruption notices will "
                        "be seen: only a SIGTERM starts the final flush")
            return None
        poller = NoticePoller(ImdsClient.from_settings(self.config.imds),
                              sources_for(self.config.notices),
                              self.config.imds.poll_interval, self.hand_notice, self.hand_notice)
        self.reporter.watch_imds(poller.reachability.outage)
        poller.start()
        return poller

    # -- the loop ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        """Until the next tick, or sooner when something arrives."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _take_signals(self) -> None:
        requests = self._signals.take()
        if requests.flush:
            self.hand_notice(Notice.make(NoticeKind.MANUAL, None, str(time.time())))
        if requests.stop:
            self.request_stop()

    def _uploads_allowed(self) -> bool:
        return (self.config.sync.mode == "continuous" or bool(self._in_effect)
                or self.flushes.active)

    def _quiet(self, engine: SyncEngine) -> bool:
        """Nothing needs the time: no notice for this instance, no flush, no upload. A file
        still being written does not count: a log appended to all the time never settles and
        would hold retention off for good, and once a file settles its upload cancels the
        prune. A peer's notice pauses pruning only while its flush and the uploads it brings
        run: this instance stays, and the job's retention must go on."""
        return (not self.flushes.active and not _pressing(self._in_effect.own_presses())
                and engine.idle())

    def _step(self, engine: SyncEngine) -> None:
        self._take_signals()
        while True:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                break
            if isinstance(notice, NoticeListing | PeerWithdrawal):
                self._take_listing(notice)
            else:
                self._on_notice(engine, notice)
        self._end_outlived_notices(datetime.now(UTC))
        self.reporter.beat()
        if _pressing(self._in_effect.deadline_presses()):
            # Invariant: once a notice set a deadline, a file closed after writing goes at
            # once, not after settle_seconds: that pause guards against a quick reopen, and is
            # time the instance may not have (the emergency checkpoint comes after the notice).
            for tracker in engine.trackers:
                tracker.settle_all_closed()
        engine.rescan_when_due(self._rescan_interval())
        engine.collect_settled()
        if self._pruning is not None:  # before pump: a running prune stops once work arrives
            self._pruning.tend(engine, self._quiet(engine))
        engine.pump(upload=self._uploads_allowed())
        if self.flushes.active and engine.flush_settled(self.flushes.retries_until,
                                                        self.flushes.writes_until):
            self._finish_flush(engine)
        elif self.flushes.active and not self._stop.is_set() and self.flushes.overdue():
            self._finish_flush(engine, overdue=True)  # the stop's own flush: final_verdict
        elif not self.flushes.active:
            self._complete_lifecycle_when_durable(engine, "the uploads since the notice")
        self._keep_state_dir()  # before status.json is written into it
        self.reporter.report_when_due(engine, self.notice_report(), self.flushes)

    def _keep_state_dir(self) -> None:
        """The daemon's state lock stays on the file at <state>/lock (see StateGuard)."""
        if self._guard is not None:
            self._guard.check_when_due()

    def _rescan_interval(self) -> float:
        interval = self.config.sync.rescan_interval
        if self.flushes.active or _pressing(self._in_effect.own_presses()):
            return min(interval, FLUSH_RESCAN_SECONDS)
        return interval

    def _on_notice(self, engine: SyncEngine, notice: Notice) -> None:
        self._learn(notice)
        self._start_flush(engine, notice.kind.value, notice.deadline)

    def notice_report(self) -> NoticeReport:
        return self._in_effect.report(self._latest_notice)

    def _learn(self, notice: Notice) -> None:
        """A notice, all but its flush: logged, shared, counted, told to the trainer. One in
        effect already, handed on again, was moved earlier (notices.store.SeenNotices): its
        new deadline replaces the old everywhere, logged as rescheduled_from."""
        detected = datetime.now(UTC)
        earlier = self._in_effect.held(notice.id)
        seconds_left = (notice.deadline - detected).total_seconds() if notice.deadline else None
        record = {
            "kind": notice.kind.value,
            "id": notice.id,
            "detail": notice.detail,
            "deadline": notice.deadline.isoformat() if notice.deadline else None,
            "detected_at": detected.isoformat(),
            **_origin(notice),
        }
        log.info("notice_detected", kind=notice.kind.value, id=notice.id, detail=notice.detail,
                 deadline=record["deadline"], **_origin(notice),
                 seconds_left=None if seconds_left is None else round(seconds_left, 1),
                 **({} if earlier is None else {"rescheduled_from": earlier.record["deadline"]}))
        self._share(notice)
        self._emit("notice_detected", record)
        if notice.kind is NoticeKind.MANUAL:
            self._end_save_grace()
        else:
            # Invariant: status's last notice and the notice metrics are AWS's (or a peer's);
            # a `spotwatch flush` is no notice and never hides one, nor its deadline
            # (last_flush and the flush metrics record it).
            if earlier is None:  # a notice rescheduled is the same notice
                self.reporter.count_notice(notice, detected)
            self._latest_notice = record
            held = Held(notice, record, detected, due_by(notice, detected))
            self._in_effect.add(held)
            replaced = {old.notice.id: old.record
                        for old in self._in_effect.superseded_by(notice)}
            told = self._told
            if (told is not None and replaces_spot_notices(notice) and told.id != notice.id
                    and told.source == "imds" and told.kind == notice.kind.value
                    and self._in_effect.held(told.id) is None):
                replaced[told.id] = _record_of(told)  # told by an earlier run, posted no more
            self._share_withdrawal(replaced)
            # The trainer told of a notice replaced is told of the one in effect due first.
            if not (replaced and self._end_notices(
                    replaced, "a new spot interruption notice replaced it")):
                self._tell_trainer(held)
        # Invariant: only this instance's own Terminated state holds its lifecycle action; a
        # peer's scale-in is the peer's (heart-beating or continuing ours would release a
        # later scale-in of this instance before its own flush).
        if (notice.kind is NoticeKind.ASG_TERMINATING and notice.peer_rank is None
                and self._lifecycle is not None):
            self._lifecycle.begin()  # heart-beats until a flush leaves everything durable
            if self._lifecycle_grace_ends is None:
                self._lifecycle_grace_ends = time.monotonic() + self.config.asg.save_grace

    def _end_save_grace(self) -> None:
        """A `spotwatch flush` asked for while the scale-in is held is the trainer saying its
        emergency checkpoint is saved: CONTINUE then waits for that flush, not the rest of
        asg.save_grace."""
        ends = self._lifecycle_grace_ends
        if (self._lifecycle is None or not self._lifecycle.holding or ends is None
                or time.monotonic() >= ends):
            return
        self._lifecycle_grace_ends = time.monotonic()
        log.info("asg_save_grace_ended", hook=self._lifecycle.hook,
                 reason="a flush was asked for: the checkpoint is saved",
                 seconds_left=round(ends - time.monotonic(), 1))

    def _tell_trainer(self, held: Held) -> None:
        """Invariant: the trainer is never told a later deadline than one it already has. A
        notice due later (a peer's, a scheduled event after the spot notice, the trainer's own
        event postponed, as a restart reads it) or with no time at all (a rebalance) still
        flushes, but leaves the notice file and the hooks alone;
        one that means the instance goes now (see due_by) counts as due within two minutes,
        so it is never kept behind an event due days later. A restarted daemon starts from
        the notice file it kept, whatever order IMDS answers in. (A new spot interruption
        notice ends the one before it instead: see in_effect.superseded_by.) A peer's notice
        whose time has passed holds nothing back: its node went then and never withdraws it,
        and it would keep this instance's own notice from the trainer. This instance's own
        stays told past its time: the instance may go any moment (a scale-in is held well
        past its two minutes while the lifecycle action waits on the flush)."""
        told, notice, due = self._told, held.notice, held.due
        if (told is not None and told.deadline is not None
                and (told.source != "peer" or told.deadline > datetime.now(UTC))
                and (due is None or due > told.deadline
                     or (due == told.deadline and told.id != notice.id))):
            log.info("notice_file_kept", id=notice.id, kind=notice.kind.value,
                     reason="the trainer already has an earlier deadline")
            return
        self._tell(held)

    def _tell(self, held: Held) -> None:
        self._told = Told(held.notice.id, held.due, held.notice.kind.value,
                          held.record["source"])
        self.hooks.fire(dict(held.record), self._told)

    def _take_listing(self, listing: NoticeListing | PeerWithdrawal) -> None:
        """Invariant: a notice AWS withdraws (a maintenance event cancelled, or over) holds
        nothing from then on, on this node and on the job's other nodes that learnt of it.
        The trainer's notice file no longer says the instance is going away: it tells the
        next notice in effect, or is removed; and once none is in effect, uploads, retention
        and the bandwidth cap go on as before any notice. A flush under way ends as it would;
        hooks that acted are not undone. Also a notice told before a restart that AWS
        withdrew before this daemon learnt it again."""
        gone = {held.notice.id: held.record for held in self._in_effect.withdrawn(listing)}
        if isinstance(listing, PeerWithdrawal):
            reason = f"withdrawn by the node of rank {listing.rank}, whose notice it was"
        else:
            reason = "no longer listed as active by IMDS"
        told = self._told
        if (isinstance(listing, NoticeListing) and told is not None and told.source == "imds"
                and told.kind == listing.kind.value and told.id not in listing.ids):
            gone.setdefault(told.id, _record_of(told))
        if not gone:
            return
        if isinstance(listing, NoticeListing):
            self._share_withdrawal(gone)
        self._end_notices(gone, reason)

    def _end_outlived_notices(self, now: datetime) -> None:
        """Spot notices (and peers' scale-ins) whose time is long past, the instance still
        running, are over (in_effect.outlives): also a spot notice the trainer was told of by
        an earlier run, known of since this process began."""
        gone = {held.notice.id: held.record for held in self._in_effect.outlived(now)}
        told = self._told
        if (told is not None and told.kind == NoticeKind.SPOT_INTERRUPTION.value
                and told.deadline is not None
                and spot_notice_outlived(told.deadline, self._began, now)
                and self._in_effect.held(told.id) is None):
            gone.setdefault(told.id, _record_of(told))
        if gone:
            # Peers outlive their copies alike; withdrawn, they never learn them anew.
            self._share_withdrawal({notice_id: record for notice_id, record in gone.items()
                                    if record.get("source") != "peer"})
            minutes = SPOT_NOTICE_OUTLIVED.total_seconds() / 60
            self._end_notices(gone, f"its time passed over {minutes:g} minutes ago and the "
                              "instance still runs")

    def _end_notices(self, gone: dict[str, dict[str, Any]], reason: str) -> bool:
        """Notices no longer in effect (id: record). Returns whether the trainer's was one of
        them (it is told of the next, see _tell_next)."""
        told = self._told
        self._deferred = [notice for notice in self._deferred if notice.id not in gone]
        if self._latest_notice is not None and self._latest_notice["id"] in gone:
            self._latest_notice = {**self._latest_notice,
                                   "cancelled_at": datetime.now(UTC).isoformat()}
        retold = told is not None and told.id in gone
        if retold:
            self._tell_next()
        # Logged once the trainer's notice file says so: whoever reads the line finds it.
        for record in gone.values():
            log.info("notice_cancelled", kind=record["kind"], id=record["id"],
                     detail=record["detail"], deadline=record["deadline"], reason=reason)
        if not self._in_effect and not self.flushes.active:
            self._reimpose_bandwidth_cap()
        return retold

    def _tell_next(self) -> None:
        """The trainer's notice was withdrawn: it is told of the notice in effect due first
        (kept from it so far: its hooks act now), or its notice file is removed."""
        held = self._in_effect.soonest()
        if held is None:
            self._told = None
            self.hooks.withdraw()
        else:
            self._tell(held)

    def _share(self, notice: Notice) -> None:
        """Invariant: a node publishes only the notices its own IMDS gave it; one learnt from
        a peer is never published again, so notices do not echo between nodes."""
        if (self._publisher is not None and notice.peer_rank is None
                and notice.kind in SHARED_KINDS):
            self._publisher.publish(notice)

    def _share_withdrawal(self, gone: dict[str, dict[str, Any]]) -> None:
        """This node's notices AWS withdrew or replaced (id: record): withdrawn on the peer
        channel too, also one published by this node before a restart, which peers may still
        hold."""
        if self._publisher is not None and gone:
            self._publisher.withdraw({notice_id: record["kind"]
                                      for notice_id, record in gone.items()})

    def _start_flush(self, engine: SyncEngine, reason: str, deadline: datetime | None,
                     until: float | None = None, scan: bool = True) -> None:
        """scan: False where the start's scan has just looked at every file (a one-shot
        flush)."""
        # A flush is the last chance: every file waiting to retry gets one more now.
        engine.retries.retry_now()
        if scan:
            engine.scan_soon()  # and every change since the last scan is found
        engine.sealer.check_incomplete_again()  # its verdict names the sets incomplete now
        # Taken back before the cap lifts: once lifted, the upload sending may end at once and
        # the next in the transfer client's queue begin before it could be taken back.
        engine.put_newest_first()
        self._lift_bandwidth_cap(reason)
        self.flushes.start(reason, deadline, engine, until)
        engine.hurry(self.flushes.hurry_until)

    def _lift_bandwidth_cap(self, reason: str) -> None:
        """Invariant: the bandwidth cap holds back continuous uploads only. Every flush (a
        notice's, a manual one, the stop's) lifts it at once, for uploads in flight too; after
        a notice it stays lifted (see _reimpose_bandwidth_cap): the instance is going away."""
        if self.bandwidth is not None and not self.bandwidth.lifted:
            self.bandwidth.lift()
            log.info("bandwidth_cap_lifted", reason=reason,
                     bytes_per_second=self.bandwidth.rate)

    def _reimpose_bandwidth_cap(self) -> None:
        """After a manual flush, or once every notice was withdrawn, continuous uploads are
        capped again; never while a notice is in effect, nor once the daemon stops."""
        if (self.bandwidth is not None and self.bandwidth.lifted and not self._in_effect
                and not self._stop.is_set()):
            self.bandwidth.reimpose()
            log.info("bandwidth_cap_reimposed", bytes_per_second=self.bandwidth.rate)

    def _finish_flush(self, engine: SyncEngine, overdue: bool = False) -> None:
        """End the running flush: settled, or overdue (FlushController.overdue), when the
        files still uploading or due for a retry are counted as not durable yet."""
        until = self.flushes.retries_until
        failed = engine.left_behind(until)
        engine.report_sets_left_behind(until)
        finished = self.flushes.finish(
            failed, engine.being_written(), EngineSnapshot.of(engine).unprotected,
            not_durable=engine.pending_files() - len(failed) if overdue else 0)
        engine.hurry(None)  # the failed files and manifests go back to their backoff
        self._reimpose_bandwidth_cap()
        self._complete_lifecycle_when_durable(engine, f"{finished.reason} flush")
        self.reporter.count_flush(finished.reason, finished.seconds)
        self._emit("flush_done", finished.record)

    def _final_flush(self, engine: SyncEngine, give_up_at: float) -> int:
        log.info("shutdown_started", pending=engine.pending_files(),
                 unsettled=engine.unsettled())
        self._start_flush(engine, "shutdown", None, give_up_at)
        while self.flushes.active and self.flushes.time_left(give_up_at) > 0:
            for tracker in engine.trackers:
                tracker.settle_all_closed()
            self._step(engine)
            if self.flushes.active:
                self._sleep(min(TICK_SECONDS, self.flushes.time_left(give_up_at)))
        verdict = self.flushes.final_verdict(EngineSnapshot.of(engine),
                                             engine.left_behind(give_up_at), engine.totals)
        self._write_status(engine)  # after the verdict, which ends a flush cut short
        self._release_lifecycle(verdict == 0)
        return verdict

    def _complete_lifecycle_when_durable(self, engine: SyncEngine, made_by: str) -> None:
        """Invariant: the scale-in goes on (CONTINUE) once everything is durable: when a
        flush ends with nothing left behind, or later, when the files a flush left failing
        were uploaded after all (retries, or a later flush); the hook heart-beats until then.
        Never before asg.save_grace passed since the trainer was told: the flush the notice
        starts finds nothing pending before the trainer even began its emergency checkpoint.
        The final flush's end releases it anyway (_release_lifecycle)."""
        lifecycle = self._lifecycle
        if (lifecycle is None or not lifecycle.holding or engine.pending_files()
                or not engine.flush_settled(None)
                or time.monotonic() < (self._lifecycle_grace_ends or 0.0)):
            return
        lifecycle.complete(f"{made_by} made everything durable")

    def _release_lifecycle(self, durable: bool) -> None:
        """A flush that left files behind keeps the hook heart-beating (a later flush may make
        them durable); the final flush is the last chance, so the scale-in continues anyway."""
        if self._lifecycle is None or not self._lifecycle.holding:
            return
        if not durable:
            log.warning("asg_lifecycle_completing_anyway", hook=self._lifecycle.hook,
                        detail="the final flush left files behind; the scale-in continues")
        self._lifecycle.complete("final flush", wait=LIFECYCLE_COMPLETE_WAIT)

    def _write_status(self, engine: SyncEngine) -> None:
        self.reporter.write(engine, self.notice_report(), self.flushes)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event, data)


def _pressing(since: datetime | None) -> bool:
    return since is not None and datetime.now(UTC) >= since


def _record_of(told: Told) -> dict[str, Any]:
    """A notice the trainer was told of, as a notice_cancelled line names it."""
    return {"kind": told.kind, "id": told.id, "detail": None,
            "deadline": told.deadline.isoformat() if told.deadline else None,
            "source": told.source}


def _origin(notice: Notice) -> dict[str, Any]:
    """Where a notice came from, for the notice file and the hooks' SPOTWATCH_NOTICE_*."""
    if notice.peer_rank is not None:
        return {"source": "peer", "peer_rank": notice.peer_rank}
    return {"source": "signal" if notice.kind is NoticeKind.MANUAL else "imds"}
