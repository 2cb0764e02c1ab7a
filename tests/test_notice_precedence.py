"""Which notice the trainer is told of when several come: one that means the instance goes
now is never kept from it behind a notice due later (end to end: daemon, IMDS emulator)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from spotwatch.emulator import ImdsEmulator
from spotwatch.interruption import interruption_pending

from .conftest import Workspace, wait_for

DAY = 24 * 3600.0


def terminated(imds: ImdsEmulator) -> None:
    imds.set_lifecycle_state("Terminated")


def spot_with_unreadable_time(imds: ImdsEmulator) -> None:
    imds.set_item("meta-data/spot/instance-action",
                  json.dumps({"action": "terminate", "time": "in two minutes"}))


@pytest.mark.parametrize(("fire", "kind"), [
    (terminated, "asg-terminating"),
    (spot_with_unreadable_time, "spot-interruption"),
], ids=["asg-terminated", "spot-time-unreadable"])
def test_an_imminent_notice_without_a_deadline_is_told_over_one_due_days_later(
        workspace: Workspace, imds: ImdsEmulator, fire: Callable[[ImdsEmulator], None],
        kind: str) -> None:
    """A maintenance event two days ahead, then the instance is reclaimed now: an Auto
    Scaling scale-in (which has no deadline) or a spot notice whose time cannot be read."""
    notice_file = workspace.root / "shared" / "notice.json"
    acted = workspace.root / "acted.txt"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": f"echo $SPOTWATCH_NOTICE_KIND >> {acted}"})
    daemon = workspace.start_daemon()
    imds.schedule_event("instance-retirement", in_seconds=2 * DAY)
    wait_for(lambda: (interruption_pending(notice_file) or {}).get("kind") == "scheduled-event")
    fire(imds)
    daemon.wait_for_event("notice_detected", count=2)
    told = wait_for(lambda: (interruption_pending(notice_file) or {}).get("kind") == kind)
    assert told
    wait_for(lambda: acted.exists() and acted.read_text().split() == ["scheduled-event", kind])
    assert not daemon.named("notice_file_kept")
    assert daemon.stop() == 0


def test_a_notice_due_days_later_does_not_replace_an_imminent_one(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """The other order: the trainer keeps the scale-in, not an event two days ahead."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = workspace.start_daemon()
    imds.set_lifecycle_state("Terminated")
    wait_for(lambda: (interruption_pending(notice_file) or {}).get("kind") == "asg-terminating")
    imds.schedule_event("instance-retirement", in_seconds=2 * DAY)
    assert daemon.wait_for_event("notice_file_kept")["kind"] == "scheduled-event"
    assert interruption_pending(notice_file)["kind"] == "asg-terminating"  # type: ignore[index]
    assert daemon.stop() == 0
