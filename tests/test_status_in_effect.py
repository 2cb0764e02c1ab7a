"""Status tells the notice in effect due first, whatever came after it or was withdrawn; a
flush the daemon's stop cut short is said to be so, whatever its reason; a flush that left
files behind never reads as a success (end to end: daemon, IMDS emulator, moto; and units)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.commands.flush import report_left_behind
from spotwatch.commands.status import render_status
from spotwatch.daemon.in_effect import SPOT_NOTICE_OUTLIVED, Held, NoticesInEffect
from spotwatch.emulator import ImdsEmulator
from spotwatch.model import Notice, NoticeKind, NoticeListing
from tests.conftest import Workspace, wait_for
from tests.faultproxy import FaultProxy
from tests.test_faults import checkpoint_data, of_files, proxy  # noqa: F401  (the fixture)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def held(kind: NoticeKind, due_in: timedelta | None) -> Held:
    deadline = None if due_in is None else NOW + due_in
    notice = Notice.make(kind, deadline, kind.value)
    record = {"kind": kind.value, "id": notice.id, "detail": "",
              "deadline": None if deadline is None else deadline.isoformat(),
              "detected_at": NOW.isoformat(), "source": "imds"}
    return Held(notice, record, NOW, deadline)


def test_the_notice_due_first_is_reported_whatever_came_after_or_was_withdrawn() -> None:
    in_effect = NoticesInEffect()
    spot = held(NoticeKind.SPOT_INTERRUPTION, timedelta(minutes=2))
    rebalance = held(NoticeKind.REBALANCE, None)
    event = held(NoticeKind.SCHEDULED_EVENT, timedelta(hours=3))
    for notice in (spot, rebalance, event):
        in_effect.add(notice)
    report = in_effect.report(event.record)  # the latest learnt is the weakest
    assert report.last == spot.record
    assert report.in_effect == [spot.record, event.record, rebalance.record]

    in_effect.withdrawn(NoticeListing(NoticeKind.SCHEDULED_EVENT, frozenset()))
    cancelled = {**event.record, "cancelled_at": NOW.isoformat()}
    report = in_effect.report(cancelled)
    assert report.last == spot.record and "cancelled_at" not in report.last
    assert report.in_effect == [spot.record, rebalance.record]

    # With none in effect any more, the latest notice shows, cancelled.
    alone = NoticesInEffect()
    assert alone.report(cancelled).last == cancelled and alone.report(cancelled).in_effect == []


@pytest.mark.parametrize("kind", [NoticeKind.SPOT_INTERRUPTION, NoticeKind.SCHEDULED_EVENT])
def test_a_notice_due_at_the_calendars_start_presses_at_once(kind: NoticeKind) -> None:
    """A garbled notice time near year 1 (IMDS can say anything) is long past: it presses from
    when it was seen, and asking so never raises (the daemon's loop asks every turn)."""
    in_effect = NoticesInEffect()
    start = datetime.min.replace(tzinfo=UTC)
    notice = Notice.make(kind, start, kind.value)
    in_effect.add(Held(notice, {"kind": kind.value, "id": notice.id}, NOW, start))
    assert in_effect.deadline_presses() == NOW
    assert in_effect.own_presses() == NOW


def a_report(**daemon: Any) -> dict[str, Any]:
    status = {"pending_files": 0, "pending_bytes": 0, "uploading": 0, "unsettled_files": 0,
              "updated_at": 0.0, **daemon}
    return {"bucket": "b", "daemon_pid": 1, "daemon": status, "uploaded_objects": 0,
            "uploaded_bytes": 0, "last_upload_at": None}


FLUSH = {"files": 3, "bytes": 300, "seconds": 4.0, "reason": "spot-interruption"}


@pytest.mark.parametrize(("record", "said"), [
    ({"timed_out": True, "pending_files": 7}, "timed out with 7 files not durable"),
    ({"timed_out": True, "cut_short_by_stop": True, "pending_files": 5},
     "cut short by the daemon's stop with 5 files not durable"),
    ({"failed": 2}, "2 files failing"),
    ({"still_written": 1}, "1 files still being written"),
    ({"deadline_margin_seconds": -5.0}, "finished 5s after its deadline"),
])
def test_a_flush_that_left_files_behind_does_not_read_as_a_success(record: dict[str, Any],
                                                                   said: str) -> None:
    [line] = [line for line in render_status(a_report(last_flush={**FLUSH, **record}))
              .splitlines() if line.startswith("last flush:")]
    assert "INCOMPLETE" in line and said in line, line
    [done] = [line for line in render_status(a_report(last_flush=FLUSH)).splitlines()
              if line.startswith("last flush:")]
    assert "INCOMPLETE" not in done


def test_a_flush_with_nothing_to_upload_past_its_deadline_is_no_failure() -> None:
    """A maintenance window that began before the notice was seen, nothing pending: nothing
    was made durable late, so nothing reads as incomplete."""
    nothing = {**FLUSH, "files": 0, "bytes": 0, "deadline_margin_seconds": -1805.6}
    [line] = [line for line in render_status(a_report(last_flush=nothing)).splitlines()
              if line.startswith("last flush:")]
    assert "INCOMPLETE" not in line and "after its deadline" not in line, line


@pytest.mark.parametrize("reason", ["spot-interruption", "manual-flush", "shutdown"])
def test_a_stop_that_cut_a_flush_short_is_blamed_whatever_its_reason(
        reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    record = {"reason": reason, "timed_out": True, "cut_short_by_stop": reason != "shutdown",
              "pending_files": 4}
    assert report_left_behind(record, "the daemon's flush") == 1
    error = capsys.readouterr().err
    assert "cut short by the daemon's stop" in error and "time limit" not in error, error


def status_json(workspace: Workspace) -> dict[str, Any]:
    shown = workspace.cli("status", "--json", "-c", str(workspace.config_file))
    return json.loads(shown.stdout)["daemon"]  # type: ignore[no-any-return]


def status_text(workspace: Workspace) -> str:
    return workspace.cli("status", "-c", str(workspace.config_file)).stdout


def test_a_spot_notice_in_effect_is_never_hidden_by_a_later_or_cancelled_one(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """Spot notice, then a rebalance, then an event three hours ahead, then the event is
    cancelled: status shows the spot notice throughout, never "no longer in effect"."""
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("notice_detected")
    imds.fire_rebalance()
    daemon.wait_for_event("notice_detected", count=2)
    imds.schedule_event("system-reboot", in_seconds=3 * 3600)
    daemon.wait_for_event("notice_detected", count=3)
    wait_for(lambda: len(workspace.status().get("notices_in_effect") or []) == 3)
    assert status_json(workspace)["last_notice"]["kind"] == "spot-interruption"
    assert "last notice:  spot-interruption at" in status_text(workspace)

    imds.cancel_event()
    daemon.wait_for_event("notice_cancelled")
    wait_for(lambda: len(workspace.status().get("notices_in_effect") or []) == 2)
    report = status_json(workspace)
    assert report["last_notice"]["kind"] == "spot-interruption"
    assert "cancelled_at" not in report["last_notice"]
    assert [n["kind"] for n in report["notices_in_effect"]] == ["spot-interruption",
                                                                "rebalance-recommendation"]
    shown = status_text(workspace)
    assert "last notice:  spot-interruption at" in shown, shown
    assert "rebalance-recommendation" in shown and "no longer in effect" not in shown, shown
    # A rebalance gives no deadline: said in words, never as Python's None.
    assert "rebalance-recommendation at" in shown and "(no deadline given)" in shown, shown
    assert "None" not in shown, shown
    daemon.stop()


def test_flush_joining_a_notices_flush_blames_the_stop_that_cut_it_short(
        workspace: Workspace, imds: ImdsEmulator, proxy: FaultProxy) -> None:  # noqa: F811
    """The daemon flushes for a spot notice (two minutes ahead), `spotwatch flush` joins it,
    then SIGTERM's stop_timeout runs out: the CLI blames the stop, not its time limit."""
    workspace.write_config(sync={"stop_timeout": 3})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    # S3 holds every file's upload (only those: a startup listing held would keep the daemon
    # from ever flushing)
    proxy.add("delay", lambda request: of_files(request) and request.method == "PUT",
              times=100, delay=600)
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    wait_for(lambda: proxy.rules[0].applied)
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("flush_started")
    flush = subprocess.Popen([sys.executable, "-m", "spotwatch.cli", "flush", "-c",
                              str(workspace.config_file)], cwd=workspace.root,
                             env=workspace.env(AWS_ENDPOINT_URL=proxy.url),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(e["kind"] == "manual-flush" for e in daemon.named("notice_detected")))
    daemon.process.send_signal(signal.SIGTERM)
    _out, err = flush.communicate(timeout=60)
    assert flush.returncode == 1
    assert "cut short by the daemon's stop" in err and "time limit" not in err, err
    assert daemon.process.wait(timeout=60) == 1
    record = workspace.status()["last_flush"]
    assert record["reason"] == "spot-interruption" and record["cut_short_by_stop"] is True


@given(st.lists(st.tuples(st.sampled_from(list(NoticeKind)), st.none() | st.integers(0, 3),
                          st.integers(-3600, 3600), st.integers(-3600, 0)), max_size=6),
       st.integers(-3600, 3600))
def test_only_spot_notices_and_peers_scale_ins_long_past_and_long_known_are_outlived(
        notices: list[tuple[NoticeKind, int | None, int, int]], clock: int) -> None:
    """Invariant: a spot notice (this instance's or a peer's) and a peer's scale-in end by
    time only once both their time and their detection are over SPOT_NOTICE_OUTLIVED ago;
    every other notice, this instance's own scale-in too, stays until it is withdrawn."""
    in_effect = NoticesInEffect()
    made = []
    for index, (kind, peer_rank, due_in, known_for) in enumerate(notices):
        due = NOW + timedelta(seconds=due_in)
        notice = Notice.make(kind, due, str(index), peer_rank=peer_rank)
        made.append(Held(notice, {"id": notice.id}, NOW + timedelta(seconds=known_for),
                         due))
        in_effect.add(made[-1])
    now = NOW + timedelta(seconds=clock)
    ended = {held.notice.id for held in in_effect.outlived(now)}
    assert ended == {held.notice.id for held in made
                     if (held.notice.kind is NoticeKind.SPOT_INTERRUPTION
                         or (held.notice.kind is NoticeKind.ASG_TERMINATING
                             and held.notice.peer_rank is not None))
                     and held.due is not None
                     and max(held.due, held.detected) < now - SPOT_NOTICE_OUTLIVED}
    assert {held.notice.id for held in in_effect.by_urgency()} == {
        held.notice.id for held in made} - ended
