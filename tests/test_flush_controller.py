"""The daemon's flush state machine on a fake clock, in milliseconds: deadlines that tighten,
the flush plan, finishing with failed files, and a final flush that runs out of time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotwatch.daemon.flush import OVERDUE_GRACE_SECONDS, FlushController
from spotwatch.daemon.snapshot import EngineSnapshot
from spotwatch.keys import object_key
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync.engine import Progress
from spotwatch.sync.planner import PendingFile, SetRef
from spotwatch.sync.throughput import ThroughputMeter

MIB = 2**20
START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """Monotonic and wall time that move only when told, together."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.wall = START

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        self.wall += timedelta(seconds=seconds)


class Work:
    """What is left to upload, and a bandwidth measured on the fake clock."""

    def __init__(self, clock: FakeClock, files: list[PendingFile],
                 bytes_per_second: float | None = None) -> None:
        self.throughput = ThroughputMeter(clock.monotonic)
        if bytes_per_second is not None:  # one upload's worth of samples: 1 s at that rate
            self.throughput.record(int(bytes_per_second), 1.0)
        self._files = files

    def remaining_work(self) -> list[PendingFile]:
        return list(self._files)

    def failure_of(self, path: Path) -> str | None:
        return f"{path.name}: refused"


def pending(set_name: str, size: int) -> PendingFile:
    return PendingFile(Path(f"/ckpt/{set_name}/m.pt"), object_key("p/", f"{set_name}/m.pt"),
                       Snapshot(size, 1, 1, 1), SetRef("p/", set_name, Path("/ckpt")))


def done(item: PendingFile) -> UploadResult:
    return UploadResult(UploadJob(item.path, item.key, item.snapshot), Outcome.DONE, 0.1)


def in_seconds(clock: FakeClock, seconds: float) -> datetime:
    return clock.now() + timedelta(seconds=seconds)


def controller() -> tuple[FakeClock, FlushController, Work]:
    clock = FakeClock()
    return clock, FlushController(clock), Work(clock, [])


def test_a_second_notice_with_an_earlier_deadline_tightens_the_flush() -> None:
    clock, flushes, work = controller()
    with capture_logs() as logs:
        flushes.start("rebalance-recommendation", in_seconds(clock, 120), work)
        flushes.start("spot-interruption", in_seconds(clock, 30), work)
    assert flushes.current is not None
    assert flushes.current.deadline == in_seconds(clock, 30)
    assert flushes.retries_until == clock.monotonic() + 30
    # Still the one flush that was started: the work is the same.
    assert flushes.current.reason == "rebalance-recommendation"
    assert [e["event"] for e in logs].count("flush_started") == 1


def test_a_later_deadline_does_not_loosen_the_flush() -> None:
    clock, flushes, work = controller()
    flushes.start("spot-interruption", in_seconds(clock, 30), work)
    flushes.start("rebalance-recommendation", in_seconds(clock, 120), work)
    flushes.start("manual", None, work)
    assert flushes.current is not None
    assert flushes.current.deadline == in_seconds(clock, 30)
    assert flushes.retries_until == clock.monotonic() + 30


@given(st.lists(st.one_of(st.none(), st.integers(min_value=-60, max_value=600)),
                min_size=1, max_size=20))
def test_the_deadline_is_always_the_earliest_seen(offsets: list[int | None]) -> None:
    clock, flushes, work = controller()
    for offset in offsets:
        flushes.start("notice", None if offset is None else in_seconds(clock, offset), work)
    given_ = [offset for offset in offsets if offset is not None]
    assert flushes.current is not None
    if given_:
        assert flushes.current.deadline == in_seconds(clock, min(given_))
        assert flushes.retries_until == clock.monotonic() + min(given_)
    else:
        assert flushes.current.deadline is None and flushes.retries_until is None


@given(deadline=st.one_of(st.none(), st.integers(min_value=-60, max_value=14 * 86400)),
       write_wait=st.integers(min_value=1, max_value=600))
def test_files_being_written_hold_a_flush_for_at_most_write_wait(
        deadline: int | None, write_wait: int) -> None:
    """A maintenance event days ahead must not make a log appended to all the time hold the
    flush (and `spotwatch flush` asking the daemon) for days: write_wait at most, and never
    past the flush's deadline."""
    clock = FakeClock()
    flushes = FlushController(clock, write_wait=write_wait)
    flushes.start("scheduled-event", None if deadline is None else in_seconds(clock, deadline),
                  Work(clock, []))
    limits = [write_wait] + ([] if deadline is None else [deadline])
    assert flushes.writes_until == clock.monotonic() + min(limits)


def test_a_stop_deadline_tightens_but_never_loosens_the_retries() -> None:
    clock, flushes, work = controller()
    flushes.start("spot-interruption", in_seconds(clock, 30), work)
    flushes.start("shutdown", None, work, until=flushes.give_up_at(60))
    assert flushes.retries_until == clock.monotonic() + 30
    flushes.start("shutdown", None, work, until=flushes.give_up_at(10))
    assert flushes.retries_until == clock.monotonic() + 10


def test_the_flush_plan_flags_the_sets_that_miss_the_deadline() -> None:
    clock = FakeClock()
    files = [pending("step_3", 60 * MIB), pending("step_2", 60 * MIB),
             pending("step_1", 60 * MIB)]
    work = Work(clock, files, bytes_per_second=20 * MIB)
    with capture_logs() as logs:
        FlushController(clock).start("spot-interruption", in_seconds(clock, 5), work)
    [plan] = [e for e in logs if e["event"] in ("flush_plan", "flush_at_risk")]
    assert plan["event"] == "flush_at_risk" and plan["log_level"] == "warning"
    # 100 MiB fit in 5 s at 20 MiB/s: step_3 (60 MiB, first) makes it, the older ones not.
    assert plan["at_risk_sets"] == ["p/step_2", "p/step_1"] and plan["at_risk_count"] == 2
    assert plan["bandwidth"] == "measured" and plan["bandwidth_mib_s"] == 20.0
    assert plan["estimated_seconds"] == 9.0 and plan["seconds_left"] == 5.0


def test_the_flush_plan_is_calm_when_everything_fits() -> None:
    clock = FakeClock()
    work = Work(clock, [pending("step_1", 10 * MIB)])
    with capture_logs() as logs:
        FlushController(clock).start("spot-interruption", in_seconds(clock, 120), work)
    [plan] = [e for e in logs if e["event"] in ("flush_plan", "flush_at_risk")]
    assert plan["event"] == "flush_plan" and plan["bandwidth"] == "assumed"


def test_finishing_reports_progress_and_the_files_left_behind() -> None:
    clock, flushes, work = controller()
    made, failed = pending("step_2", 300), pending("step_1", 100)
    flushes.start("spot-interruption", in_seconds(clock, 30), work)
    flushes.count(done(made))
    flushes.count(UploadResult(UploadJob(failed.path, failed.key, failed.snapshot),
                               Outcome.FAILED, 0.1, error="AccessDenied"))
    clock.advance(2.5)
    with capture_logs() as logs:
        finished = flushes.finish([failed])
    assert not flushes.active and flushes.retries_until is None
    assert finished.reason == "spot-interruption" and finished.seconds == 2.5
    record = flushes.last
    assert record is not None and finished.record is record
    assert (record["files"], record["bytes"], record["failed"]) == (1, 300, 1)
    assert record["failed_files"] == [str(failed.path)]
    assert record["failed_because"] == f"{failed.path.name}: refused"
    assert record["deadline_margin_seconds"] == 27.5
    assert record["finished_at"] == clock.now().isoformat()
    [line] = [e for e in logs if e["event"] == "flush_done"]
    assert line["log_level"] == "warning" and line["failed_files"] == [str(failed.path)]


def test_a_clean_finish_logs_at_info_and_counts_nothing_after_it() -> None:
    _clock, flushes, work = controller()
    flushes.start("manual", None, work)
    with capture_logs() as logs:
        flushes.finish([])
    assert [e["log_level"] for e in logs if e["event"] == "flush_done"] == ["info"]
    flushes.count(done(pending("step_1", 10)))  # no flush running: not counted anywhere
    assert flushes.last is not None and flushes.last["files"] == 0
    assert flushes.last["deadline_margin_seconds"] is None


@pytest.mark.parametrize("uploaded", [0, 1])
def test_a_complete_flush_that_ended_past_its_deadline_is_a_warning(uploaded: int) -> None:
    """Every file durable, but after the notice's deadline: on a real instance, too late
    (status says so too), never an info line. With nothing to upload (a maintenance window
    begun before the notice was seen) nothing was late."""
    clock, flushes, work = controller()
    flushes.start("spot-interruption", in_seconds(clock, 10), work)
    for _ in range(uploaded):
        flushes.count(done(pending("step_1", 300)))
    clock.advance(15)
    with capture_logs() as logs:
        flushes.finish([])
    [record] = [e for e in logs if e["event"] == "flush_done"]
    assert record["deadline_margin_seconds"] == -5.0
    assert record["log_level"] == ("warning" if uploaded else "info")


def left(pending_files: int) -> EngineSnapshot:
    return EngineSnapshot(pending_files=pending_files, pending_bytes=100 * pending_files,
                          uploading=0, retrying=pending_files, failing=pending_files,
                          unsettled=0, incomplete_sets=())


def test_a_stop_timeout_that_runs_out_ends_the_final_flush_with_what_it_left() -> None:
    clock, flushes, work = controller()
    give_up_at = flushes.give_up_at(5.0)
    flushes.start("shutdown", None, work, until=give_up_at)
    clock.advance(4.0)
    assert flushes.time_left(give_up_at) == 1.0
    clock.advance(1.5)
    assert flushes.time_left(give_up_at) == 0.0
    stuck = pending("step_1", 100)
    with capture_logs() as logs:
        code = flushes.final_verdict(left(1), [stuck], Progress(files=3, bytes=900))
    assert code == 1
    [line] = [e for e in logs if e["event"] == "flush_incomplete"]
    assert line["log_level"] == "error" and line["timed_out"] is True
    assert line["failed_files"] == [str(stuck.path)] and line["pending_files"] == 1
    assert line["pending_bytes"] == 100 and line["retrying"] == 1
    # What a `spotwatch flush` waiting for this flush reads: cut short, with what it left.
    assert flushes.last is not None
    assert (flushes.last["timed_out"], flushes.last["pending_files"]) == (True, 1)


def test_a_final_flush_that_finished_but_left_failing_files_exits_1_not_timed_out() -> None:
    _clock, flushes, work = controller()
    flushes.start("shutdown", None, work, until=flushes.give_up_at(5.0))
    stuck = pending("step_1", 100)
    flushes.finish([stuck])
    with capture_logs() as logs:
        assert flushes.final_verdict(left(1), [stuck], Progress()) == 1
    [line] = [e for e in logs if e["event"] == "flush_incomplete"]
    assert line["timed_out"] is False


def test_a_final_flush_with_nothing_left_exits_0() -> None:
    _clock, flushes, work = controller()
    flushes.start("shutdown", None, work, until=flushes.give_up_at(5.0))
    flushes.finish([])
    with capture_logs() as logs:
        assert flushes.final_verdict(left(0), [], Progress(files=3, bytes=900)) == 0
    assert [(e["event"], e["files"], e["bytes"]) for e in logs] == [("daemon_stopped", 3, 900)]


def test_a_stop_during_a_notices_flush_waits_for_files_being_written_until_it_gives_up() -> None:
    """SIGTERM while a notice's flush runs: retries are still not waited for past the
    notice's deadline, but a file still being written (the emergency checkpoint, the deadline
    being approximate) is waited for as long as the stop may take."""
    clock, flushes, work = controller()
    flushes.start("spot-interruption", in_seconds(clock, 2), work)
    give_up_at = flushes.give_up_at(30.0)
    flushes.start("shutdown", None, work, until=give_up_at)
    assert flushes.retries_until == clock.monotonic() + 2
    assert flushes.writes_until == give_up_at


def test_a_final_flush_that_left_a_file_being_written_exits_1() -> None:
    """A file still being written when the final flush ended is not in S3: exit 1."""
    _clock, flushes, work = controller()
    flushes.start("shutdown", None, work, until=flushes.give_up_at(5.0))
    flushes.finish([], [Path("/ckpt/step_1/m.pt")])
    being_written = EngineSnapshot(pending_files=0, pending_bytes=0, uploading=0, retrying=0,
                                   failing=0, unsettled=1, incomplete_sets=())
    with capture_logs() as logs:
        assert flushes.final_verdict(being_written, [], Progress()) == 1
    [line] = [e for e in logs if e["event"] == "flush_incomplete"]
    assert line["unsettled"] == 1 and line["timed_out"] is False


def test_a_deadline_that_comes_during_a_flush_gets_its_own_plan() -> None:
    """A rebalance (no deadline) starts the flush; the spot notice then gives it one: the
    sets that miss that deadline are named then, not left unsaid."""
    clock = FakeClock()
    files = [pending("step_2", 60 * MIB), pending("step_1", 60 * MIB)]
    work = Work(clock, files, bytes_per_second=20 * MIB)
    flushes = FlushController(clock)
    with capture_logs() as logs:
        flushes.start("rebalance-recommendation", None, work)
        flushes.start("spot-interruption", in_seconds(clock, 5), work)
        flushes.start("scheduled-event", in_seconds(clock, 3600), work)  # no news: no plan
    plans = [e for e in logs if e["event"] in ("flush_plan", "flush_at_risk")]
    assert [(e["event"], e["seconds_left"]) for e in plans] == [
        ("flush_plan", None), ("flush_at_risk", 5.0)]
    assert plans[1]["at_risk_sets"] == ["p/step_1"]


@given(st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=600))
def test_a_flush_is_overdue_at_its_deadline_else_at_the_write_wait(
        write_wait: int, notice_in: int) -> None:
    """What ends a flush that uploads hang in: a notice's at its deadline, one with no deadline
    at write_wait (sync.stop_timeout) from its start, each OVERDUE_GRACE_SECONDS later; never
    before, and a controller with no write_wait never calls a deadline-less flush overdue."""
    clock = FakeClock()
    manual = FlushController(clock, write_wait=write_wait)
    manual.start("manual", None, Work(clock, []))
    noticed = FlushController(clock, write_wait=write_wait)
    noticed.start("spot", START + timedelta(seconds=notice_in), Work(clock, []))
    unbounded = FlushController(clock)
    unbounded.start("manual", None, Work(clock, []))
    clock.advance(min(write_wait, notice_in) + OVERDUE_GRACE_SECONDS - 0.5)
    assert not manual.overdue() and not noticed.overdue()
    clock.advance(max(write_wait, notice_in))
    assert manual.overdue() and noticed.overdue() and not unbounded.overdue()
    record = manual.finish([], not_durable=2).record
    assert record["timed_out"] is True and record["pending_files"] == 2


def test_a_notices_flush_the_stop_cuts_short_is_recorded_as_cut_short_by_the_stop() -> None:
    """The stop joins a spot notice's flush, which keeps its reason: the record must still say
    the stop ended it, or `spotwatch flush` blames the notice's deadline (two minutes away)."""
    clock, flushes, work = controller()
    flushes.start("spot-interruption", clock.now() + timedelta(minutes=2), work)
    give_up_at = flushes.give_up_at(5.0)
    flushes.start("shutdown", None, work, until=give_up_at)
    clock.advance(5.0)
    assert flushes.final_verdict(left(2), [], Progress()) == 1
    assert flushes.last is not None
    assert flushes.last["reason"] == "spot-interruption"
    assert (flushes.last["timed_out"], flushes.last["cut_short_by_stop"]) == (True, True)
    assert flushes.last["pending_files"] == 2


def test_a_flush_that_ends_on_its_own_is_not_cut_short_by_a_stop() -> None:
    _clock, flushes, work = controller()
    flushes.start("manual-flush", None, work)
    assert flushes.finish([], not_durable=3).record["cut_short_by_stop"] is False
