"""The flush state machine: start, tighten, count, finish; and the final flush's verdict.

It reads the time from an injectable clock and does no I/O besides logging, so every path
(second notice, stop timeout, files left behind) is tested in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from spotwatch.daemon.in_effect import NOTICE_HORIZON
from spotwatch.daemon.snapshot import EngineSnapshot
from spotwatch.logs import get_logger
from spotwatch.model import Outcome, UploadResult
from spotwatch.sync.engine import Progress
from spotwatch.sync.planner import PendingFile
from spotwatch.sync.throughput import ThroughputMeter, plan_flush

log = get_logger("spotwatch.daemon")

# A flush's log line names at most this many files it left behind.
NAMED_FILES_MAX = 20
# The flush_at_risk line names at most this many sets.
NAMED_SETS_MAX = 20
# How long past its time limit a flush still waits for the uploads in flight before it ends
# without them (FlushController.overdue): a retry S3 answers at once (a 500, say) ends in
# that time, and the flush then ends as usual, naming the set it leaves incomplete.
OVERDUE_GRACE_SECONDS = 10.0


class Clock(Protocol):
    """Monotonic seconds for deadlines and durations; wall time for notice deadlines."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


class FlushWork(Protocol):
    """What a flush plan is made of (the sync engine)."""

    throughput: ThroughputMeter

    def remaining_work(self) -> list[PendingFile]: ...

    def failure_of(self, path: Path) -> str | None: ...


@dataclass
class Flush:
    reason: str
    started: float
    deadline: datetime | None
    # Monotonic time after which it no longer waits for retries (None: no deadline).
    retries_until: float | None = None
    # Monotonic time after which it no longer waits for files still being written.
    writes_until: float | None = None
    progress: Progress = field(default_factory=Progress)
    work: FlushWork | None = None


@dataclass(frozen=True)
class FinishedFlush:
    reason: str
    seconds: float
    record: dict[str, Any]  # status.json's last_flush, and the flush_done log line


class FlushController:
    """At most one flush at a time. Invariant: a running flush's deadline is the earliest of
    every deadline it was given; a later notice never loosens it, the work stays the same."""

    def __init__(self, clock: Clock | None = None, write_wait: float | None = None) -> None:
        """write_wait: how long a flush with no deadline waits for files still being written
        (None: for as long as they are written)."""
        self._clock = clock or SystemClock()
        self._write_wait = write_wait
        self.current: Flush | None = None
        self.last: dict[str, Any] | None = None  # the record of the last finished flush

    @property
    def active(self) -> bool:
        return self.current is not None

    @property
    def retries_until(self) -> float | None:
        return self.current.retries_until if self.current is not None else None

    @property
    def writes_until(self) -> float | None:
        return self.current.writes_until if self.current is not None else None

    @property
    def hurry_until(self) -> float | None:
        """Until when the running flush retries files failing for a transient reason within
        seconds and waits for them (RetryQueue.hurry; None: no flush runs, or it does not).

        Invariant: that is as long as the flush waits for anything: its deadline (a notice's,
        the stop's sync.stop_timeout, which outlasts a notice's as for files being written);
        with no deadline, or one beyond NOTICE_HORIZON (a maintenance event days ahead), as
        long as it waits for files being written, so a `spotwatch flush` still answers."""
        flush = self.current
        if flush is None:
            return None
        bounds = [flush.writes_until]
        if (flush.retries_until is not None
                and flush.retries_until - flush.started <= NOTICE_HORIZON.total_seconds()):
            bounds.append(flush.retries_until)
        return max((bound for bound in bounds if bound is not None), default=None)

    def overdue(self) -> bool:
        """The running flush is OVERDUE_GRACE_SECONDS past hurry_until, the longest it
        waits for anything.

        Invariant: a flush (a notice's, `spotwatch flush`'s) ends by then even while uploads
        hang on an S3 that does not answer: they go on after it, and its record says how many
        files were not durable yet. Nothing else would end it, as an upload ends only once S3
        answers or the transfer client gives up, which may be never."""
        bound = self.hurry_until
        return (bound is not None
                and self._clock.monotonic() >= bound + OVERDUE_GRACE_SECONDS)

    def start(self, reason: str, deadline: datetime | None, work: FlushWork,
              until: float | None = None) -> None:
        """Start a flush, or tighten the running one; until: a monotonic deadline."""
        if self.current is None:
            started = self._clock.monotonic()
            self.current = Flush(reason, started, deadline, writes_until=None
                                 if self._write_wait is None else started + self._write_wait,
                                 work=work)
            self._tighten(deadline, until)
            log.info("flush_started", reason=reason)
            self._log_plan(work, deadline)
        else:
            earlier = deadline is not None and (self.current.deadline is None
                                                or deadline < self.current.deadline)
            self._tighten(deadline, until)
            if earlier:  # e.g. the spot notice after a rebalance: what misses it now
                self._log_plan(work, deadline)

    def _tighten(self, deadline: datetime | None, until: float | None) -> None:
        flush = self.current
        assert flush is not None
        if deadline and (flush.deadline is None or deadline < flush.deadline):
            flush.deadline = deadline
        stop_at = until
        if until is None and deadline is not None:
            until = self._monotonic_at(deadline)
        if until is not None and (flush.retries_until is None or until < flush.retries_until):
            flush.retries_until = until
        self._limit_writes(flush, until, stop_at)

    @staticmethod
    def _limit_writes(flush: Flush, until: float | None, stop_at: float | None) -> None:
        """Invariant: files being written hold a flush for write_wait after its start at most,
        and never past its deadline, however far that is (a maintenance event days ahead),
        so a `spotwatch flush` joining it still answers after sync.stop_timeout. The stop's
        final flush (stop_at: when it gives up) waits for them as long as it may, even past a
        notice's deadline, which is approximate: the emergency checkpoint may come late."""
        if stop_at is not None:
            flush.writes_until = stop_at
        elif until is not None and (flush.writes_until is None or until < flush.writes_until):
            flush.writes_until = until

    def _monotonic_at(self, moment: datetime) -> float:
        return self._clock.monotonic() + self._seconds_until(moment)

    def _seconds_until(self, moment: datetime) -> float:
        return (moment - self._clock.now()).total_seconds()

    def _log_plan(self, work: FlushWork, deadline: datetime | None) -> None:
        seconds_left = self._seconds_until(deadline) if deadline else None
        plan = plan_flush(work.remaining_work(), seconds_left,
                          work.throughput.bytes_per_second())
        fields = {"files": plan.files, "bytes": plan.bytes,
                  "bandwidth_mib_s": round(plan.bytes_per_second / 2**20, 1),
                  "bandwidth": "measured" if plan.measured else "assumed",
                  "estimated_seconds": round(plan.estimated_seconds, 1),
                  "seconds_left": None if seconds_left is None else round(seconds_left, 1)}
        if plan.at_risk_sets:
            # Newest sets go first; these older ones may not make it before the deadline.
            log.warning("flush_at_risk", **fields,
                        at_risk_sets=list(plan.at_risk_sets[:NAMED_SETS_MAX]),
                        at_risk_count=len(plan.at_risk_sets))
        else:
            log.info("flush_plan", **fields)

    def count(self, result: UploadResult) -> None:
        """An engine observer: what the running flush made durable."""
        if self.current is not None and result.outcome is Outcome.DONE:
            self.current.progress.files += 1
            self.current.progress.bytes += result.job.snapshot.size

    def finish(self, failed: Sequence[PendingFile], still_written: Sequence[Path] = (),
               unprotected: Mapping[str, Sequence[str]] | None = None,
               not_durable: int = 0) -> FinishedFlush:
        """End the running flush; failed: the files it left behind (failing for good);
        still_written: files it stopped waiting for because they never settled; unprotected:
        what it could not protect at all, by kind (EngineSnapshot.unprotected); not_durable:
        files still uploading or due for a retry when it ended overdue (then it timed out)."""
        finished = self._end(failed, still_written, timed_out=bool(not_durable),
                             unprotected=unprotected, pending_files=not_durable)
        # Files made durable after the deadline: the instance may be gone before they were.
        late = (finished.record["deadline_margin_seconds"] or 0) < 0 and finished.record["files"]
        bad = (failed or still_written or not_durable or late
               or any((unprotected or {}).values()))
        (log.warning if bad else log.info)("flush_done", **finished.record)
        return finished

    def _end(self, failed: Sequence[PendingFile], still_written: Sequence[Path],
             timed_out: bool, unprotected: Mapping[str, Sequence[str]] | None = None,
             pending_files: int = 0, cut_short_by_stop: bool = False) -> FinishedFlush:
        """No flush runs any more; self.last records the one that ran (pending_files: those
        not durable yet when it timed out or a stop cut it short). Invariant: the record says
        cut_short_by_stop whenever the stop ended it, whatever its reason (a notice's flush
        keeps its reason when the stop joins it), so no one blames its own time limit."""
        flush, self.current = self.current, None
        assert flush is not None
        seconds = self._clock.monotonic() - flush.started
        margin = self._seconds_until(flush.deadline) if flush.deadline else None
        self.last = {
            "reason": flush.reason,
            "seconds": round(seconds, 3),
            "files": flush.progress.files,
            "bytes": flush.progress.bytes,
            "failed": len(failed),
            "failed_files": _named(failed),
            # What S3 (or the disk) said of the first failing file that says: the why of it.
            "failed_because": next(
                (why for item in failed[:NAMED_FILES_MAX] if flush.work is not None
                 and (why := flush.work.failure_of(item.path)) is not None), None),
            "still_written": len(still_written),
            "still_written_files": [str(path) for path in still_written[:NAMED_FILES_MAX]],
            "timed_out": timed_out,
            "cut_short_by_stop": cut_short_by_stop,
            "pending_files": pending_files,
            "deadline_margin_seconds": None if margin is None else round(margin, 1),
            "finished_at": self._clock.now().isoformat(),
            **{kind: list(names[:NAMED_FILES_MAX])
               for kind, names in (unprotected or {}).items()},
            **{f"{kind}_count": len(names) for kind, names in (unprotected or {}).items()},
        }
        return FinishedFlush(flush.reason, seconds, self.last)

    # -- the final flush: bounded by sync.stop_timeout ------------------------------------

    def give_up_at(self, stop_timeout: float) -> float:
        return self._clock.monotonic() + stop_timeout

    def time_left(self, give_up_at: float) -> float:
        return max(0.0, give_up_at - self._clock.monotonic())

    def final_verdict(self, left: EngineSnapshot, failing: Sequence[PendingFile],
                      totals: Progress) -> int:
        """Exit code 0 when everything is durable; 1 when the flush ran out of time, left
        failing files or files still being written behind, or could not read a directory's
        files or take a file's name (logged as flush_incomplete, so the operator sees it, with
        the sets still waiting for their manifest: their files alone are no checkpoint). A
        flush the stop timeout cut short ends here too: nothing reports it running after the
        stop."""
        timed_out = self.current is not None
        if timed_out:
            self._end(failing, (), timed_out=True, pending_files=left.pending_files,
                      cut_short_by_stop=True)
        if (not timed_out and left.pending_files == 0 and not left.unsettled
                and not left.unreadable_dirs and not left.refused_files
                and not left.incomplete_sets):  # nor a set a file it needs keeps unsealed
            log.info("daemon_stopped", files=totals.files, bytes=totals.bytes)
            return 0
        log.error("flush_incomplete", pending_files=left.pending_files,
                  pending_bytes=left.pending_bytes, retrying=left.retrying,
                  uploading=left.uploading, unsettled=left.unsettled,
                  failed_files=_named(failing), timed_out=timed_out,
                  unsealed_sets=list(left.unsealed_sets[:NAMED_SETS_MAX]),
                  incomplete_sets=list(left.incomplete_sets[:NAMED_SETS_MAX]),
                  unreadable_dirs=list(left.unreadable_dirs[:NAMED_SETS_MAX]),
                  refused_files=list(left.refused_files[:NAMED_FILES_MAX]))
        return 1


def _named(files: Sequence[PendingFile]) -> list[str]:
    return [str(item.path) for item in files[:NAMED_FILES_MAX]]

