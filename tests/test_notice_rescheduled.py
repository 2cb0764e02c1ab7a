"""A scheduled maintenance event that AWS reschedules under the same EventId (as
`aws ec2 modify-instance-event-start-time` does): moved earlier, the trainer and the daemon's
deadline-driven rules follow the new time; moved later, the trainer keeps the earlier one (end
to end: `spotwatch run`, IMDS emulator, moto)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from spotwatch.emulator import ImdsEmulator
from spotwatch.emulator.imds import SCHEDULED
from spotwatch.interruption import interruption_pending

from .conftest import Daemon, Workspace, keys_in, wait_for
from .test_daemon_e2e import save_checkpoint

DAYS = 86400.0


def told_deadline(notice_file: Path) -> datetime | None:
    notice = interruption_pending(notice_file)
    deadline = None if notice is None else notice.get("deadline")
    return None if deadline is None else datetime.fromisoformat(deadline)


def event_start(body: str) -> datetime:
    """The NotBefore of the newest event in an answer of events/maintenance/scheduled."""
    return datetime.strptime(json.loads(body)[-1]["NotBefore"] + " +0000",
                             "%d %b %Y %H:%M:%S GMT %z")


def hooked_deadlines(out: Path) -> list[datetime]:
    return [datetime.fromisoformat(line) for line in out.read_text().split()] \
        if out.exists() else []


def start(workspace: Workspace, imds: ImdsEmulator, in_seconds: float,
          **sync: Any) -> tuple[Daemon, Path, Path, datetime]:
    """A daemon told of an event due in_seconds ahead, its hook command run."""
    notice_file = workspace.root / "shared" / "notice.json"
    out = workspace.root / "hooked.txt"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": f'echo "$SPOTWATCH_NOTICE_DEADLINE" >> {out}'},
                           sync=sync)
    daemon = workspace.start_daemon()
    first = event_start(imds.schedule_event("system-reboot", in_seconds=in_seconds))
    wait_for(lambda: told_deadline(notice_file) == first)
    wait_for(lambda: hooked_deadlines(out) == [first])
    return daemon, notice_file, out, first


def test_an_event_moved_earlier_is_told_again_and_presses(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    """Scheduled three days ahead, then moved to 90 s ahead: the notice file, the command hook,
    status and the flush follow the new deadline, and files settle at once (settle_seconds
    is far longer than the test waits)."""
    daemon, notice_file, out, first = start(workspace, imds, 3 * DAYS, settle_seconds=600)
    daemon.wait_for_event("flush_done")

    moved = event_start(imds.reschedule_event(in_seconds=90))
    wait_for(lambda: told_deadline(notice_file) == moved)
    detected = daemon.wait_for_event("notice_detected", count=2)
    assert detected["rescheduled_from"] == first.isoformat()
    assert detected["deadline"] == moved.isoformat()
    wait_for(lambda: hooked_deadlines(out) == [first, moved])
    wait_for(lambda: (workspace.status().get("last_notice") or {}).get("deadline")
             == moved.isoformat())
    daemon.wait_for_event("flush_started", count=2)
    plan = wait_for(lambda: len(daemon.named("flush_plan")) >= 2 and daemon.named("flush_plan")[1])
    assert plan["seconds_left"] <= 90

    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1_000)
    wait_for(lambda: "run1/step_1/model.pt" in keys_in(s3, workspace.bucket), timeout=30)
    assert daemon.stop() == 0


def test_an_event_moved_later_leaves_the_trainer_its_earlier_deadline(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """Moved from an hour ahead to three days ahead: the trainer keeps the hour, its hooks do
    not act again, and a restart (the daemon reads the later time afresh) keeps it too."""
    daemon, notice_file, out, first = start(workspace, imds, 3600)
    imds.reschedule_event(in_seconds=3 * DAYS)
    seen_through(workspace, imds)
    assert told_deadline(notice_file) == first
    assert len(daemon.named("notice_detected")) == 1
    assert daemon.stop() == 0

    again = workspace.start_daemon()
    again.wait_for_event("notice_file_kept")
    assert told_deadline(notice_file) == first
    assert hooked_deadlines(out) == [first]
    assert again.stop() == 0


def test_an_event_moved_earlier_then_cancelled_is_withdrawn(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    daemon, notice_file, _, _ = start(workspace, imds, 3 * DAYS)
    moved = event_start(imds.reschedule_event(in_seconds=300))
    wait_for(lambda: told_deadline(notice_file) == moved)
    imds.cancel_event()
    daemon.wait_for_event("notice_cancelled")
    assert not notice_file.exists()
    assert daemon.stop() == 0


def seen_through(workspace: Workspace, imds: ImdsEmulator) -> None:
    """Until the daemon has read the scheduled events at least once since now, and its loop
    has taken whatever that answer handed on: two more reads (the poller hands a notice on
    before it reads again), then two status writes after that (the loop takes notices
    before it writes status)."""
    reads = imds.gets_of(SCHEDULED)
    wait_for(lambda: imds.gets_of(SCHEDULED) >= reads + 2)
    for _ in range(2):
        written_after(workspace, time.time())


def written_after(workspace: Workspace, since: float) -> None:
    wait_for(lambda: workspace.status().get("updated_at", 0) > since)
