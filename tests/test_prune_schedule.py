"""When the daemon prunes, in milliseconds: a prune runs on its own thread only when all is
quiet, a notice mid-prune cancels it, and a cancelled prune is tried again later."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from structlog.testing import capture_logs

from spotwatch.config import WatchDir
from spotwatch.daemon.metrics import Metrics
from spotwatch.daemon.prune_job import JOB_PRUNE_SECONDS, PRUNE_INTERVAL_SECONDS, PruneSchedule
from spotwatch.daemon.reporter import Reporter
from spotwatch.state import StateDir
from spotwatch.sync.pruner import Deletion, PruneCancelled

WAIT = 10.0  # generous bound for a thread to get somewhere; never slept


class CancelEvent(threading.Event):
    """The pruner's cancel flag; setting it also releases a plan that is waiting."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self._release = release

    def set(self) -> None:
        super().set()
        self._release.set()


class BlockingPruner:
    """Plans these deletions once released; cancelled while planning, it stops as the real
    Pruner does (PruneCancelled)."""

    enabled = True

    def __init__(self, deletions: list[Deletion]) -> None:
        self.release = threading.Event()
        self.cancelled: threading.Event = CancelEvent(self.release)
        self.planning = threading.Event()
        self.plans = 0
        self._deletions = deletions

    def plan(self, watches: Iterable[WatchDir]) -> list[Deletion]:
        self.plans += 1
        self.planning.set()
        assert self.release.wait(WAIT)
        if self.cancelled.is_set():
            raise PruneCancelled
        return list(self._deletions)

    def apply(self, deletions: list[Deletion]) -> list[Deletion]:
        return list(deletions)


class Target:
    def __init__(self) -> None:
        self.changes = 1
        self.resealed: list[list[str]] = []

    def reseal_after_deletions(self, keys: list[str]) -> None:
        self.resealed.append(keys)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def schedule_with(pruner: BlockingPruner) -> tuple[PruneSchedule, Clock, threading.Event]:
    clock, finished = Clock(), threading.Event()
    return PruneSchedule(pruner, [], finished.set, clock), clock, finished


def finish(schedule: PruneSchedule, target: Target, finished: threading.Event,
           quiet: bool) -> None:
    """Wait for the job's thread to end, then let the loop collect it."""
    assert finished.wait(WAIT)
    finished.clear()
    schedule.tend(target, quiet)
    assert schedule.job is None


def test_a_notice_mid_prune_cancels_it_and_it_runs_again_when_quiet() -> None:
    pruner = BlockingPruner([Deletion("p/step_1/m.pt", "retention")])
    schedule, clock, finished = schedule_with(pruner)
    target = Target()
    schedule.tend(target, quiet=True)
    assert pruner.planning.wait(WAIT)
    with capture_logs() as logs:
        schedule.tend(target, quiet=False)  # a notice arrived: no longer quiet
        finish(schedule, target, finished, quiet=False)
    assert pruner.cancelled.is_set() and "prune_cancelled" in [e["event"] for e in logs]
    assert target.resealed == [[]]  # nothing was deleted
    schedule.tend(target, quiet=True)
    assert schedule.job is None  # not again before the interval is over
    clock.now += PRUNE_INTERVAL_SECONDS
    schedule.tend(target, quiet=True)  # S3 did not change, but the cancelled prune is owed
    assert schedule.job is not None and not pruner.cancelled.is_set()
    pruner.release.set()
    finish(schedule, target, finished, quiet=True)
    assert pruner.plans == 2


def test_a_completed_prune_reseals_and_waits_for_the_next_change() -> None:
    gone = Deletion("p/step_1/m.pt", "deleted locally")
    pruner = BlockingPruner([gone, Deletion("p/step_0/m.pt", "retention")])
    pruner.release.set()
    schedule, clock, finished = schedule_with(pruner)
    target = Target()
    schedule.tend(target, quiet=False)
    assert schedule.job is None  # never while something needs the time
    schedule.tend(target, quiet=True)
    finish(schedule, target, finished, quiet=True)
    # Retention keeps the local file: only the set that lost a file gets a new manifest.
    assert target.resealed == [[gone.key]]
    clock.now += PRUNE_INTERVAL_SECONDS
    schedule.tend(target, quiet=True)
    assert schedule.job is None and pruner.plans == 1  # nothing changed since
    target.changes += 1
    schedule.tend(target, quiet=True)
    assert schedule.job is not None
    finish(schedule, target, finished, quiet=True)
    assert pruner.plans == 2


def test_changes_during_a_prune_call_for_another() -> None:
    pruner = BlockingPruner([])
    schedule, clock, finished = schedule_with(pruner)
    target = Target()
    schedule.tend(target, quiet=True)
    assert pruner.planning.wait(WAIT)
    target.changes += 1  # an upload landed while the prune listed S3
    pruner.release.set()
    finish(schedule, target, finished, quiet=True)
    clock.now += PRUNE_INTERVAL_SECONDS
    schedule.tend(target, quiet=True)
    assert schedule.job is not None
    finish(schedule, target, finished, quiet=True)
    assert pruner.plans == 2


def test_on_a_job_an_unchanged_node_prunes_again_for_its_peers_seals() -> None:
    """On a job, other nodes' seals make a set complete and older ones due for retention
    while nothing changes here: a prune is due again JOB_PRUNE_SECONDS after the last one
    completed (old: never, until this node's next change)."""
    pruner = BlockingPruner([])
    pruner.release.set()
    clock, finished = Clock(), threading.Event()
    schedule = PruneSchedule(pruner, [], finished.set, clock, unchanged_every=JOB_PRUNE_SECONDS)
    target = Target()
    schedule.tend(target, quiet=True)
    finish(schedule, target, finished, quiet=True)
    clock.now += PRUNE_INTERVAL_SECONDS
    schedule.tend(target, quiet=True)
    assert schedule.job is None  # nothing changed here, and not long enough since
    clock.now += JOB_PRUNE_SECONDS
    schedule.tend(target, quiet=False)
    assert schedule.job is None  # never while something needs the time
    schedule.tend(target, quiet=True)
    assert schedule.job is not None
    finish(schedule, target, finished, quiet=True)
    assert pruner.plans == 2


class FailingOncePruner(BlockingPruner):
    """Its first plan meets a defect (an exception no pruner should raise)."""

    def plan(self, watches: Iterable[WatchDir]) -> list[Deletion]:
        if self.plans == 0:
            self.plans += 1
            raise OverflowError("int too large to convert to float")
        return super().plan(watches)


def test_a_prune_that_fails_unexpectedly_is_said_and_degrades_status_until_one_completes(
        tmp_path: Path) -> None:
    pruner = FailingOncePruner([])
    pruner.release.set()
    schedule, clock, finished = schedule_with(pruner)
    reporter = Reporter("bucket", StateDir(tmp_path / "state"), Metrics())
    reporter.watch_pruning(schedule)
    target = Target()
    with capture_logs() as logs:
        schedule.tend(target, quiet=True)
        finish(schedule, target, finished, quiet=True)
    [failed] = [entry for entry in logs if entry["event"] == "prune_failed"]
    assert failed["log_level"] == "error" and "OverflowError" in failed["error"]
    assert schedule.failing is not None
    assert reporter._degraded_reasons(None) == [
        f"retention failing, nothing pruned: {schedule.failing}"]
    clock.now += PRUNE_INTERVAL_SECONDS
    schedule.tend(target, quiet=True)  # tried again, and this time it completes
    finish(schedule, target, finished, quiet=True)
    assert schedule.failing is None and reporter._degraded_reasons(None) == []
