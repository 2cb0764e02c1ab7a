"""Pruning off the daemon loop: one prune at a time on a background thread, so S3 listing and
deleting never stall the loop, started only when all is quiet and cancelled when work arrives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from spotwatch.aws.store import StoreError
from spotwatch.config import WatchDir
from spotwatch.logs import get_logger
from spotwatch.sync.pruner import Deletion, PruneCancelled, keys_to_reseal

log = get_logger("spotwatch.prune")

# Pruning lists the prefix in S3: at most this often.
PRUNE_INTERVAL_SECONDS = 5.0
# On a node of a multi-node job, a prune with nothing changed here is still due this long
# after the last: the other nodes' seals make a set complete for the job, and then retention
# drops older sets, which this node's own changes would never call for.
JOB_PRUNE_SECONDS = 30.0


class Prunes(Protocol):
    """A pruner (spotwatch.sync.pruner.Pruner): plans, then applies, until cancelled."""

    cancelled: threading.Event

    @property
    def enabled(self) -> bool: ...

    def plan(self, watches: Iterable[WatchDir]) -> list[Deletion]: ...

    def apply(self, deletions: list[Deletion]) -> list[Deletion]: ...


class PruneTarget(Protocol):
    """The engine, as pruning sees it."""

    @property
    def changes(self) -> int: ...

    def reseal_after_deletions(self, keys: list[str]) -> None: ...


class PruneJob:
    """Plans and applies one prune on its own thread; the loop polls `finished()`."""

    def __init__(self, pruner: Prunes, watches: Sequence[WatchDir],
                 on_finished: Callable[[], None]) -> None:
        self._pruner = pruner
        self._watches = tuple(watches)
        self._on_finished = on_finished
        self.deleted: list[Deletion] = []
        self.completed = False  # planned and applied without failure or cancel
        self.failure: str | None = None  # why it failed (not a cancel)
        self._thread = threading.Thread(target=self._run, name="prune", daemon=True)

    def start(self) -> PruneJob:
        self._pruner.cancelled.clear()  # the loop runs one job at a time: this one's flag
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._pruner.cancelled.set()

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            planned = self._pruner.plan(self._watches)
            self.deleted = self._pruner.apply(planned)
            self.completed = len(self.deleted) == len(planned)
            log.debug("prune_done", planned=len(planned), deleted=len(self.deleted))
        except PruneCancelled:
            log.info("prune_cancelled", deleted=0)
        except StoreError as exc:
            self.failure = str(exc)
            log.warning("prune_failed", error=self.failure)
        except Exception as exc:  # a defect: said, and in status, never a thread gone quiet
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("prune_failed", error=self.failure, exc_info=True)
        finally:
            self._on_finished()


class PruneSchedule:
    """Decides when to prune and collects what a prune deleted; driven by the daemon loop.

    Invariant: deletes run only when all is quiet (the loop says so), never while a notice, a
    flush or an upload needs the time; a prune under way is cancelled as soon as it is not.
    """

    def __init__(self, pruner: Prunes, watches: Sequence[WatchDir],
                 on_finished: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic,
                 unchanged_every: float | None = None) -> None:
        """unchanged_every: prune this long after the last complete prune even with nothing
        changed here (a job's node: JOB_PRUNE_SECONDS); None: only after a change."""
        self._pruner = pruner
        self._unchanged_every = unchanged_every
        self._completed_at: float | None = None
        self._watches = tuple(watches)
        self._on_finished = on_finished
        self._clock = clock
        self._due = 0.0
        # The target's change count when the last complete prune started; None: never
        # pruned, so the first quiet moment catches up on what changed while stopped.
        self._pruned_at: int | None = None
        self._starting_at = 0
        self.job: PruneJob | None = None
        # Why the last prune failed, until one completes: retention is not being kept.
        self.failing: str | None = None

    def tend(self, target: PruneTarget, quiet: bool) -> None:
        if self.job is not None:
            self._tend_job(self.job, target, quiet)
        elif quiet and self._due_for(target):
            self._due = self._clock() + PRUNE_INTERVAL_SECONDS
            self._starting_at = target.changes
            self.job = PruneJob(self._pruner, self._watches, self._on_finished).start()

    def _due_for(self, target: PruneTarget) -> bool:
        if not self._pruner.enabled or self._clock() < self._due:
            return False
        if target.changes != self._pruned_at:
            return True
        return (self._unchanged_every is not None and self._completed_at is not None
                and self._clock() >= self._completed_at + self._unchanged_every)

    def _tend_job(self, job: PruneJob, target: PruneTarget, quiet: bool) -> None:
        if not quiet:
            job.cancel()
        if not job.finished():
            return
        self.job = None
        if job.failure is not None:
            self.failing = job.failure
        if job.completed:  # failed or cancelled: try again when quiet
            self.failing = None
            self._pruned_at = self._starting_at
            self._completed_at = self._clock()
        target.reseal_after_deletions(keys_to_reseal(job.deleted))
