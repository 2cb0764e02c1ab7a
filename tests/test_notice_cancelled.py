"""A scheduled maintenance event that AWS cancels no longer tells the trainer the instance is
going away, nor holds the daemon (end to end: daemon, IMDS emulator, moto)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from spotwatch.config import load_config
from spotwatch.daemon import loop
from spotwatch.daemon.loop import Daemon
from spotwatch.emulator import ImdsEmulator
from spotwatch.interruption import interruption_pending
from spotwatch.model import Notice, NoticeKind

from .conftest import Workspace, keys_in, wait_for
from .test_prune import MANIFESTS, save_set

MINUTES = 60.0


def notice_kind(notice_file: Path) -> str | None:
    notice = interruption_pending(notice_file)
    return None if notice is None else str(notice["kind"])


def event_id(body: str) -> str:
    """The id of the newest event in an answer of events/maintenance/scheduled."""
    return str(json.loads(body)[-1]["EventId"])


@pytest.mark.parametrize("to_history", [True, False], ids=["moved-to-history", "marked"])
def test_a_cancelled_event_is_withdrawn_and_holds_nothing(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, to_history: bool) -> None:
    """An event due in five minutes: the trainer is told, the bandwidth cap is lifted and
    retention paused. AWS cancels it (moving it to the history, or marking it canceled in
    place): the notice file goes, the cap holds again and retention goes on."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)},
                           sync={"keep_sets": 1, "continuous_bandwidth": "100MB/s"})
    daemon = workspace.start_daemon()
    save_set(workspace, "step_1", 300)
    daemon.wait_for_event("set_complete")
    event = event_id(imds.schedule_event("system-reboot", in_seconds=5 * MINUTES))
    wait_for(lambda: notice_kind(notice_file) == "scheduled-event")
    daemon.wait_for_event("flush_done")
    assert daemon.named("bandwidth_cap_lifted")
    save_set(workspace, "step_2", 200)
    daemon.wait_for_event("set_complete", count=2)

    imds.cancel_event(event, to_history=to_history)
    cancelled = daemon.wait_for_event("notice_cancelled")
    assert cancelled["kind"] == "scheduled-event" and cancelled["detail"] == "system-reboot"
    assert interruption_pending(notice_file) is None and not notice_file.exists()
    daemon.wait_for_event("bandwidth_cap_reimposed")
    wait_for(lambda: f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket), timeout=30)
    last = wait_for(lambda: (workspace.status().get("last_notice") or {}).get("cancelled_at")
                    and workspace.status()["last_notice"])
    assert last["kind"] == "scheduled-event"
    status = workspace.cli("status", "-c", "config.yaml")
    assert "cancelled at" in status.stdout, status.stdout
    assert daemon.stop() == 0


def test_the_trainer_is_told_the_notice_still_in_effect(workspace: Workspace,
                                                        imds: ImdsEmulator) -> None:
    """A rebalance recommendation came after the event, and was kept from the trainer (the
    event has a deadline): once the event is cancelled, the trainer is told of the rebalance,
    and its hooks act for it; the cap stays lifted, as a notice is still in effect."""
    notice_file = workspace.root / "shared" / "notice.json"
    acted = workspace.root / "acted.txt"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": f"echo $SPOTWATCH_NOTICE_KIND >> {acted}"},
                           sync={"continuous_bandwidth": "100MB/s"})
    daemon = workspace.start_daemon()
    imds.schedule_event("instance-retirement", in_seconds=60 * MINUTES)
    wait_for(lambda: notice_kind(notice_file) == "scheduled-event")
    imds.fire_rebalance()
    assert daemon.wait_for_event("notice_file_kept")["kind"] == "rebalance-recommendation"
    imds.cancel_event()
    daemon.wait_for_event("notice_cancelled")
    wait_for(lambda: notice_kind(notice_file) == "rebalance-recommendation")
    wait_for(lambda: acted.exists() and acted.read_text().split() == [
        "scheduled-event", "rebalance-recommendation"])
    assert daemon.stop() == 0
    assert not daemon.named("bandwidth_cap_reimposed")


def test_an_event_cancelled_while_the_daemon_was_stopped(workspace: Workspace,
                                                         imds: ImdsEmulator) -> None:
    """The notice file stays over a restart; but if AWS cancelled the event meanwhile, the
    restarted daemon removes it."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    first = workspace.start_daemon()
    imds.schedule_event("system-maintenance", in_seconds=60 * MINUTES)
    wait_for(lambda: notice_kind(notice_file) == "scheduled-event")
    assert first.stop() == 0
    assert notice_kind(notice_file) == "scheduled-event"
    imds.cancel_event()
    second = workspace.start_daemon()
    assert second.wait_for_event("notice_cancelled")["kind"] == "scheduled-event"
    assert not notice_file.exists()
    assert second.stop() == 0


def told_deadline(notice_file: Path) -> str | None:
    notice = interruption_pending(notice_file)
    return None if notice is None else str(notice["deadline"])


def test_a_new_spot_notice_replaces_the_one_the_trainer_has(workspace: Workspace,
                                                            imds: ImdsEmulator) -> None:
    """AWS's instance-action is one item: a new time there (the instance resumed from
    hibernation in the same boot, and is to go again) is the notice now. The trainer is
    told of it and its hooks act, though the one it had was due earlier (long past by now);
    the old one is no longer in effect, in status either."""
    notice_file = workspace.root / "shared" / "notice.json"
    acted = workspace.root / "acted.txt"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": f"echo $SPOTWATCH_NOTICE_ID >> {acted}"})
    daemon = workspace.start_daemon()
    first = json.loads(imds.fire_spot_interruption("hibernate", in_seconds=1))["time"]
    wait_for(lambda: acted.exists() and len(acted.read_text().split()) == 1)
    second = json.loads(imds.fire_spot_interruption("terminate", in_seconds=120))["time"]
    replaced = daemon.wait_for_event("notice_cancelled")
    assert replaced["kind"] == "spot-interruption" and replaced["deadline"] is not None
    assert replaced["reason"] == "a new spot interruption notice replaced it"
    wait_for(lambda: (told_deadline(notice_file) or "").startswith(second[:19]))
    wait_for(lambda: len(acted.read_text().split()) == 2)  # the hooks acted for it
    assert len(set(acted.read_text().split())) == 2
    status = wait_for(lambda: len(workspace.status().get("notices_in_effect") or []) == 1
                      and (workspace.status().get("last_notice") or {}).get("detail")
                      == "terminate" and workspace.status())
    assert status["notices_in_effect"][0]["deadline"].startswith(second[:19])
    assert not daemon.named("notice_file_kept")
    assert first != second
    assert daemon.stop() == 0


def test_a_spot_notice_long_past_when_seen_is_still_told_and_flushed(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """A spot notice whose time reads as over ten minutes past (a host clock running ahead
    makes a fresh one look so) is never passed over when first seen: the trainer is told and
    the flush runs; it ends only once this process has known of it as long."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption("terminate", in_seconds=-11 * MINUTES)
    wait_for(lambda: notice_kind(notice_file) == "spot-interruption")
    assert daemon.wait_for_event("flush_done")["reason"] == "spot-interruption"
    assert notice_kind(notice_file) == "spot-interruption"
    assert not daemon.named("notice_cancelled")
    assert daemon.stop() == 0


def spot_notice(due: datetime | None, text: str) -> Notice:
    return Notice.make(NoticeKind.SPOT_INTERRUPTION, due, "terminate", text, detail="terminate")


def test_a_spot_notice_ends_once_long_past_and_long_known(workspace: Workspace) -> None:
    """The daemon's own bookkeeping, clock in hand: a spot notice 11 minutes past when learnt
    holds while it has been known of less than ten minutes, then ends: the notice file goes,
    status shows it cancelled, and peers would be told it is withdrawn."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = Daemon(load_config(workspace.config_file), workspace.bucket)
    now = datetime.now(UTC)
    with capture_logs() as logs:
        daemon._learn(spot_notice(now - 11 * timedelta(minutes=1), "long ago"))
        assert notice_kind(notice_file) == "spot-interruption"
        daemon._end_outlived_notices(now + 9 * timedelta(minutes=1))
        assert notice_kind(notice_file) == "spot-interruption"
        daemon._end_outlived_notices(now + 11 * timedelta(minutes=1))
    assert not notice_file.exists()
    [ended] = [event for event in logs if event["event"] == "notice_cancelled"]
    assert ended["reason"] == "its time passed over 10 minutes ago and the instance still runs"
    report = daemon.notice_report()
    assert report.in_effect == [] and report.last is not None and report.last["cancelled_at"]


def test_a_new_spot_notice_after_a_restart_leaves_the_trainer_the_soonest(
        workspace: Workspace) -> None:
    """The trainer was told of a spot notice by an earlier run, posted no more; a maintenance
    event due in a minute was kept from it for that one. A new spot notice due in five minutes
    ends the old one, and the trainer is told of the event, due first."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    config = load_config(workspace.config_file)
    now = datetime.now(UTC)
    earlier = Daemon(config, workspace.bucket)
    earlier._learn(spot_notice(now + timedelta(seconds=30), "before the restart"))
    daemon = Daemon(config, workspace.bucket)
    daemon._told = earlier._told  # as a restart reads it from the state directory
    event = Notice.make(NoticeKind.SCHEDULED_EVENT, now + timedelta(minutes=1), "event-1",
                        detail="system-reboot")
    with capture_logs() as logs:
        daemon._learn(event)
        assert notice_kind(notice_file) == "spot-interruption"  # kept: the spot was earlier
        daemon._learn(spot_notice(now + timedelta(minutes=5), "after the restart"))
    assert notice_kind(notice_file) == "scheduled-event"
    assert [event["reason"] for event in logs if event["event"] == "notice_cancelled"] == [
        "a new spot interruption notice replaced it"]


def test_a_garbled_spot_answer_replaces_no_notice(workspace: Workspace) -> None:
    """instance-action answered once with a time that does not read: no new time, so the
    notice the trainer has, with its deadline, stays in effect beside it."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = Daemon(load_config(workspace.config_file), workspace.bucket)
    due = datetime.now(UTC) + timedelta(seconds=100)
    daemon._learn(spot_notice(due, "readable"))
    daemon._learn(spot_notice(None, "not-a-time"))
    told = interruption_pending(notice_file)
    assert told is not None and told["deadline"] == due.isoformat()
    assert len(daemon.notice_report().in_effect) == 2


def test_a_peers_notice_that_ran_out_keeps_no_own_notice_from_the_trainer(
        workspace: Workspace) -> None:
    """A peer's spot notice, due a minute ago (its node went then and never withdraws it), is
    what the trainer was told: this instance's own spot notice, due in two minutes, is told
    over it and its hooks act. One due before the peer's time ran out would have been kept."""
    notice_file = workspace.root / "shared" / "notice.json"
    acted = workspace.root / "acted.txt"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": f"echo $SPOTWATCH_NOTICE_SOURCE >> {acted}"})
    daemon = Daemon(load_config(workspace.config_file), workspace.bucket)
    now = datetime.now(UTC)
    peer = Notice.make(NoticeKind.SPOT_INTERRUPTION, now - timedelta(minutes=1), "peer",
                       detail="terminate", peer_rank=0)
    with capture_logs() as logs:
        daemon._learn(peer)
        assert (interruption_pending(notice_file) or {}).get("source") == "peer"
        daemon._learn(spot_notice(now + timedelta(minutes=2), "own"))
    told = interruption_pending(notice_file)
    assert told is not None and told["source"] == "imds"
    assert told["deadline"] == (now + timedelta(minutes=2)).isoformat()
    assert not [event for event in logs if event["event"] == "notice_file_kept"]
    wait_for(lambda: acted.exists() and acted.read_text().split() == ["peer", "imds"])


def test_a_peers_notice_still_ahead_keeps_a_later_own_notice_from_the_trainer(
        workspace: Workspace) -> None:
    """The other side of the rule: the peer's time still to come, the trainer keeps it."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = Daemon(load_config(workspace.config_file), workspace.bucket)
    now = datetime.now(UTC)
    peer = Notice.make(NoticeKind.SPOT_INTERRUPTION, now + timedelta(minutes=1), "peer",
                       detail="terminate", peer_rank=0)
    with capture_logs() as logs:
        daemon._learn(peer)
        daemon._learn(spot_notice(now + timedelta(minutes=2), "own"))
    assert (interruption_pending(notice_file) or {}).get("source") == "peer"
    assert [event["event"] for event in logs].count("notice_file_kept") == 1


def test_a_peers_scale_in_ends_once_long_past_and_the_own_stays(workspace: Workspace) -> None:
    """A peer's Auto Scaling Terminated (no time: due two minutes after it was learnt) ends
    once that is over ten minutes past, as a spot notice does; this instance's own scale-in
    holds until the instance goes."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = Daemon(load_config(workspace.config_file), workspace.bucket)
    now = datetime.now(UTC)
    daemon._learn(Notice.make(NoticeKind.ASG_TERMINATING, None, "Terminated", "peer",
                              detail="Terminated", peer_rank=1))
    assert (interruption_pending(notice_file) or {}).get("source") == "peer"
    daemon._end_outlived_notices(now + timedelta(minutes=11))
    assert notice_file.exists()  # due at +2 min: only 9 minutes past
    daemon._end_outlived_notices(now + timedelta(minutes=13))
    assert not notice_file.exists()
    own = Daemon(load_config(workspace.config_file), workspace.bucket)
    own._learn(Notice.make(NoticeKind.ASG_TERMINATING, None, "Terminated", detail="Terminated"))
    own._end_outlived_notices(now + timedelta(days=1))
    assert (interruption_pending(notice_file) or {}).get("kind") == "asg-terminating"
    assert len(own.notice_report().in_effect) == 1


class _ThreeMinutesOn(datetime):
    """The daemon's clock three minutes on (its module's `datetime`)."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(minutes=3)


def test_this_instances_own_notice_past_its_time_stays_told(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a peer's notice stops holding back once its time is past. This instance's own may
    go any moment: its scale-in, held by the lifecycle action well past the two minutes it
    counts as due in, is not replaced by an event days ahead; its spot notice half a minute
    past is not replaced by a peer's due later."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    config = load_config(workspace.config_file)
    scaled_in = Daemon(config, workspace.bucket)
    scaled_in._learn(Notice.make(NoticeKind.ASG_TERMINATING, None, "Terminated",
                                 detail="Terminated"))
    monkeypatch.setattr(loop, "datetime", _ThreeMinutesOn)
    scaled_in._learn(Notice.make(NoticeKind.SCHEDULED_EVENT,
                                 datetime.now(UTC) + timedelta(days=2), "event-1",
                                 detail="system-reboot"))
    assert (interruption_pending(notice_file) or {}).get("kind") == "asg-terminating"
    monkeypatch.undo()

    notice_file.unlink()
    spot = Daemon(config, workspace.bucket)
    now = datetime.now(UTC)
    spot._learn(spot_notice(now - timedelta(seconds=30), "own"))
    spot._learn(Notice.make(NoticeKind.SPOT_INTERRUPTION, now + timedelta(minutes=2), "peer",
                            detail="terminate", peer_rank=0))
    told = interruption_pending(notice_file)
    assert told is not None and told["source"] == "imds"
