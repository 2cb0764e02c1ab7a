"""Telling the trainer (notice file, signal, command), notice sources, and the flush plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.config import load_config
from spotwatch.daemon.hooks import MAX_PID, OUTPUT_MAX, RECHECK_SECONDS, trainer_pid
from spotwatch.emulator import Fault, ImdsEmulator
from spotwatch.errors import ConfigError
from spotwatch.interruption import interruption_pending
from spotwatch.keys import object_key
from spotwatch.model import Snapshot
from spotwatch.notices.sources import REBALANCE, SCHEDULED_EVENTS
from spotwatch.sync.planner import PendingFile, Planner, SetRef
from spotwatch.sync.subtree import files_at_or_below
from spotwatch.sync.throughput import plan_flush

from .conftest import Workspace, fill, keys_in, object_bytes, wait_for
from .test_daemon_e2e import save_checkpoint

TRAINER = """
import os, signal, sys, time
checkpoints, pid_file = sys.argv[1], sys.argv[2]
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
deadline = time.time() + 30
while not asked and time.time() < deadline:
    time.sleep(0.01)  # the trainer's own wait for the signal (the input), not the test's
tmp = os.path.join(checkpoints, "emergency.pt.tmp")
with open(tmp, "wb") as f:
    f.write(b"emergency state")
os.replace(tmp, os.path.join(checkpoints, "emergency.pt"))
"""


def test_signal_hook_and_notice_file(workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    pid_file = workspace.root / "trainer.pid"
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"signal": "USR1", "pid_file": str(pid_file),
                                  "notice_file": str(notice_file)})
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(workspace.checkpoints),
                                str(pid_file)])
    try:
        wait_for(pid_file.exists)
        daemon = workspace.start_daemon()
        assert interruption_pending(notice_file) is None
        imds.fire_spot_interruption(in_seconds=120)
        assert trainer.wait(timeout=30) == 0
        wait_for(lambda: "run1/emergency.pt" in keys_in(s3, workspace.bucket))
        assert object_bytes(s3, workspace.bucket, "run1/emergency.pt") == b"emergency state"
        notice = interruption_pending(notice_file)
        assert notice is not None
        assert notice["kind"] == "spot-interruption"
        assert notice["deadline"]
        assert daemon.named("hook_signal_sent")[0]["pid"] == trainer.pid
        assert daemon.stop() == 0
    finally:
        trainer.kill()


def test_a_pid_reused_since_the_trainer_wrote_its_pid_file_is_not_signalled(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """The trainer exited and left its pid file; another process has its pid now (started
    after the file was written). SIGUSR1's default action would kill it: it is not
    signalled, and status says the trainer was not told."""
    pid_file = workspace.root / "trainer.pid"
    workspace.write_config(hooks={"signal": "USR1", "pid_file": str(pid_file)})
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        pid_file.write_text(f"{stranger.pid}\n")
        written = time.time() - 3600  # the trainer wrote it an hour before the pid was reused
        os.utime(pid_file, (written, written))
        daemon = workspace.start_daemon()
        imds.fire_spot_interruption(in_seconds=120)
        failed = daemon.wait_for_event("hook_failed")
        assert failed["hook"] == "signal" and "reused" in failed["error"], failed
        reason = "the trainer was not told of the notice: hooks.signal SIGUSR1"
        assert wait_for(lambda: any(said.startswith(reason)
                                    for said in workspace.status().get("degraded", [])))
        assert stranger.poll() is None  # alive
        assert not daemon.named("hook_signal_sent")
        assert daemon.stop() == 0
    finally:
        stranger.kill()


@pytest.mark.parametrize("pid", ["0", "99999999999999999999"])
def test_signal_hook_with_a_pid_file_naming_no_process(workspace: Workspace, imds: ImdsEmulator,
                                                       pid: str) -> None:
    """A pid of 0 would signal the daemon's own process group; one past pid_t overflows.
    The daemon runs in its own session, so the old kill(0) reaches nobody else."""
    pid_file = workspace.root / "trainer.pid"
    pid_file.write_text(f"{pid}\n")
    workspace.launcher = ("setsid",)
    workspace.write_config(hooks={"signal": "USR1", "pid_file": str(pid_file)})
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption(in_seconds=120)
    failed = daemon.wait_for_event("hook_failed")
    assert failed["hook"] == "signal" and pid[:10] in failed["error"]
    assert daemon.named("hook_signal_sent") == []
    assert daemon.stop() == 0


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_only_a_single_process_id_is_signalled(number: int) -> None:
    try:
        pid = trainer_pid(f"{number}\n")
    except ValueError:
        assert number <= 0 or number > MAX_PID
    else:
        assert pid == number and 0 < pid <= MAX_PID


def test_command_hook_gets_the_notice(workspace: Workspace, imds: ImdsEmulator) -> None:
    out = workspace.root / "hook.out"
    workspace.write_config(hooks={
        "command": f'echo "$SPOTWATCH_NOTICE_KIND|$SPOTWATCH_NOTICE_FILE" > {out}'})
    daemon = workspace.start_daemon()
    imds.fire_rebalance()
    wait_for(lambda: out.exists() and out.read_text().strip())
    kind, notice_file = out.read_text().strip().split("|")
    assert kind == "rebalance-recommendation"
    assert Path(notice_file) == workspace.root / "run" / "notice.json"  # $RUNTIME_DIRECTORY
    assert daemon.wait_for_event("hook_command_done")["exit_code"] == 0
    assert daemon.stop() == 0


def test_output_past_what_the_log_takes_ends_on_a_whole_line_and_says_so(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """A command that prints more than the log takes (OUTPUT_MAX): the log gets whole lines,
    then one event saying how much the file holds, and where; never a line cut short."""
    workspace.write_config(log={"format": "json"}, hooks={
        "command": "seq 1 100000; printf 'no newline at the end'"})
    daemon = workspace.start_daemon()
    imds.fire_rebalance()
    daemon.wait_for_event("hook_command_done")
    cut = daemon.wait_for_event("hook_command_output_cut")
    lines = [event["line"] for event in daemon.named("hook_command_output")]
    assert lines == [str(n) for n in range(1, len(lines) + 1)]  # each whole, in order
    logged = sum(len(line) + 1 for line in lines)
    assert cut["logged_bytes"] == logged and OUTPUT_MAX - 7 <= logged <= OUTPUT_MAX
    everything = len("".join(f"{n}\n" for n in range(1, 100001))) + len("no newline at the end")
    assert cut["bytes"] == everything
    assert Path(cut["path"]).read_text().endswith("99999\n100000\nno newline at the end")
    assert daemon.stop() == 0


def test_a_command_hooks_output_is_logged_as_events(workspace: Workspace,
                                                   imds: ImdsEmulator) -> None:
    """What the command writes, on stdout or stderr, comes into the daemon's log as events:
    a JSON log stays JSON lines (old: the command's raw lines among them). A process the
    command leaves running goes on writing after the daemon is gone, into the state
    directory's hook-command.log, and is not killed for it."""
    go, mark = workspace.root / "go", workspace.root / "mark"
    workspace.write_config(log={"format": "json"}, hooks={
        "command": "echo out-line; echo err-line >&2; printf 'raw\\377\\n'; "
                   f"(while [ ! -e {go} ]; do sleep 0.05; done; echo later; touch {mark}) &"})
    daemon = workspace.start_daemon()
    imds.fire_rebalance()
    daemon.wait_for_event("hook_command_done")
    assert sorted(event["line"] for event in daemon.named("hook_command_output")) == [
        "err-line", "out-line", "raw\ufffd"]
    assert daemon.stop() == 0
    for line in daemon.log_path.read_text().splitlines():
        json.loads(line)
    go.touch()
    assert wait_for(mark.exists)
    output = (workspace.root / "state" / "hook-command.log").read_bytes()
    assert output.splitlines()[-1] == b"later"


def test_reader_finds_the_notice_where_the_daemon_put_it(
        workspace: Workspace, imds: ImdsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOTWATCH_NOTICE_FILE", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(workspace.root / "run"))  # as for the daemon
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption()
    daemon.wait_for_event("flush_started")  # the notice file is written before the flush
    notice = interruption_pending()  # no argument: the same places, in the same order
    assert notice is not None and notice["kind"] == "spot-interruption"
    notice_file = workspace.root / "run" / "notice.json"
    assert notice_file.stat().st_mode & 0o777 == 0o644  # even under the unit's UMask=0027
    assert daemon.stop() == 0


def test_unreadable_or_foreign_notice_file_warns(tmp_path: Path) -> None:
    assert interruption_pending(tmp_path / "missing.json") is None  # simply no notice
    (tmp_path / "a-directory").mkdir()
    with pytest.warns(RuntimeWarning, match="cannot read the notice file .*a-directory"):
        assert interruption_pending(tmp_path / "a-directory") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.warns(RuntimeWarning, match=r"list\.json is not a notice file"):
        assert interruption_pending(tmp_path / "list.json") is None
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.warns(RuntimeWarning, match=r"deep\.json is not a notice file"):
        assert interruption_pending(tmp_path / "deep.json") is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_in_a_notice_file_give_a_notice_none_or_a_warning(
        tmp_path: Path, content: bytes) -> None:
    """The training loop calls interruption_pending(): whatever a notice file holds (another
    encoding, a truncated write, foreign bytes), it returns, and never raises."""
    path = tmp_path / "notice.json"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        found = interruption_pending(path)
    assert found is None or isinstance(found, dict)
    if found is None:
        assert [w.category for w in said] == [RuntimeWarning]
        assert str(path) in str(said[0].message)


def command_runs(out: Path) -> int:
    return len(out.read_text().splitlines()) if out.exists() else 0


def test_hooks_act_once_per_notice_across_restarts(workspace: Workspace,
                                                   imds: ImdsEmulator) -> None:
    out = workspace.root / "hook.out"
    workspace.write_config(hooks={"command": f'echo "$SPOTWATCH_NOTICE_ID" >> {out}'})
    first = workspace.start_daemon()
    imds.fire_spot_interruption()
    assert first.wait_for_event("hook_command_done")["exit_code"] == 0
    first.wait_for_event("flush_done")
    assert first.stop() == 0
    second = workspace.start_daemon()  # the notice is still posted
    assert second.wait_for_event("notice_detected")["id"] == out.read_text().strip()
    second.wait_for_event("flush_done")  # it still flushes; the hooks do not run again
    assert second.named("hook_command_started") == []
    assert second.named("hooks_already_acted")[0]["kind"] == "spot-interruption"
    assert command_runs(out) == 1
    assert interruption_pending(workspace.root / "run" / "notice.json") is not None
    assert second.stop() == 0


@pytest.mark.parametrize("trainer_deleted_it", [False, True])
def test_a_restart_never_tells_the_trainer_a_notice_kept_from_it(
        workspace: Workspace, imds: ImdsEmulator, trainer_deleted_it: bool) -> None:
    """A spot notice, then a rebalance (kept from the trainer: it has an earlier deadline).
    Restarted, the daemon sees the rebalance first: the trainer still has the spot notice, so
    the rebalance neither runs the hooks nor replaces the notice file, also when the trainer
    deleted that file (the daemon records which notice it told, not only in the file)."""
    out = workspace.root / "hook.out"
    notice_file = workspace.root / "run" / "notice.json"
    workspace.write_config(hooks={"command": f'echo "$SPOTWATCH_NOTICE_KIND" >> {out}'})
    first = workspace.start_daemon()
    imds.fire_spot_interruption(in_seconds=600)
    first.wait_for_event("hook_command_done")
    imds.fire_rebalance()
    assert first.wait_for_event("notice_file_kept")["kind"] == "rebalance-recommendation"
    assert first.stop() == 0
    if trainer_deleted_it:
        notice_file.unlink()
    # The spot item fails for a while after the restart: the rebalance is handed on first.
    spot = Fault(status=500, remaining=10**6, path="meta-data/spot/instance-action")
    imds.add_fault(spot)
    second = workspace.start_daemon()
    assert second.wait_for_event("notice_detected")["kind"] == "rebalance-recommendation"
    second.wait_for_event("flush_done")
    assert second.named("hook_command_started") == []
    told = interruption_pending(notice_file)
    assert (told is None) if trainer_deleted_it else told["kind"] == "spot-interruption"  # type: ignore[index]
    spot.remaining = 0
    assert second.wait_for_event("notice_detected", 2)["kind"] == "spot-interruption"
    assert second.named("hook_command_started") == []
    assert out.read_text().split() == ["spot-interruption"]
    # The notice file is written after notice_detected is logged: wait for it to be there.
    told = wait_for(lambda: interruption_pending(notice_file))
    assert told["kind"] == "spot-interruption"
    assert second.stop() == 0


def test_notice_file_stays_over_a_restart(workspace: Workspace, imds: ImdsEmulator) -> None:
    notice_file = workspace.root / "run" / "notice.json"
    first = workspace.start_daemon()
    imds.fire_spot_interruption()
    first.wait_for_event("flush_started")
    assert first.stop() == 0
    workspace.write_config(imds={"enabled": False})  # not polled again after the restart
    second = workspace.start_daemon()
    notice = interruption_pending(notice_file)
    assert notice is not None and notice["kind"] == "spot-interruption"
    assert second.stop() == 0


def test_disabled_sources_are_not_polled(workspace: Workspace, imds: ImdsEmulator) -> None:
    workspace.write_config(notices={"rebalance": False})
    daemon = workspace.start_daemon()
    imds.fire_rebalance()
    # The scheduled events are polled as often as the rebalance item would be: two more polls
    # of them span a whole interval after the notice, in which it would have been asked.
    scheduled = SCHEDULED_EVENTS.path
    polled = imds.gets_of(scheduled)
    wait_for(lambda: imds.gets_of(scheduled) >= polled + 2)
    assert imds.gets_of(REBALANCE.path) == 0
    assert daemon.named("notice_detected") == []
    imds.fire_spot_interruption()
    assert daemon.wait_for_event("notice_detected")["kind"] == "spot-interruption"
    assert daemon.stop() == 0


@pytest.mark.parametrize("acted", [None, {"boot_id": "an-earlier-boot", "ids": ["abc"]}])
def test_stale_notice_file_is_cleared_at_start(workspace: Workspace,
                                               acted: dict[str, Any] | None) -> None:
    """A notice file left from an earlier life of the instance means nothing now."""
    stale = workspace.root / "run" / "notice.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"kind": "spot-interruption", "id": "abc"}')
    if acted is not None:
        (workspace.root / "state").mkdir()
        (workspace.root / "state" / "acted_notices.json").write_text(json.dumps(acted))
    daemon = workspace.start_daemon()
    assert not stale.exists()
    assert daemon.stop() == 0


@pytest.mark.parametrize(("hooks", "message"), [
    ("{signal: NOPE, pid_file: p}", "not a signal name"),
    ("{signal: USR1}", "needs 'hooks.pid_file'"),
    ("{sginal: USR1}", "unknown config key 'hooks.sginal'"),
])
def test_hook_config_errors(tmp_path: Path, hooks: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"watch: [{{path: x}}]\nhooks: {hooks}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def pending(set_name: str, size: int, mtime_ns: int) -> PendingFile:
    set_ref = SetRef("p/", set_name, Path("/ckpt"))
    return PendingFile(Path(f"/ckpt/{set_name}/m.pt"), object_key("p/", f"{set_name}/m.pt"),
                       Snapshot(size, mtime_ns, mtime_ns, 1), set_ref)


def test_flush_plan_names_the_sets_that_miss_the_deadline() -> None:
    ordered = [pending("step_3", 100, 3), pending("step_2", 100, 2), pending("step_1", 100, 1)]
    plan = plan_flush(ordered, seconds_left=2.5, measured=100.0)
    assert plan.bytes == 300
    assert plan.estimated_seconds == pytest.approx(3.0)
    assert plan.at_risk_sets == ("p/step_1",)
    assert plan_flush(ordered, seconds_left=None, measured=100.0).at_risk_sets == ()
    assert not plan_flush(ordered, seconds_left=10, measured=None).measured


def test_planner_takes_newest_set_first_and_skips_busy_paths() -> None:
    planner = Planner()
    old, new_a = pending("step_1", 10, 1), pending("step_2", 20, 5)
    new_b = PendingFile(Path("/ckpt/step_2/o.pt"), "p/step_2/o.pt", Snapshot(30, 4, 4, 2),
                        new_a.set_ref)
    for item in (old, new_b, new_a):
        planner.add(item)
    assert planner.pending_bytes == 60
    assert planner.set_keys() == {"p/step_1", "p/step_2"}
    assert [i.path for i in planner.ordered()] == [new_a.path, new_b.path, old.path]
    # new_a is still uploading an older version: it waits, the next ones go.
    assert planner.take(2, busy=lambda path: path == new_a.path) == [new_b, old]
    assert planner.ordered() == [new_a] and planner.pending_bytes == 20
    assert planner.set_keys() == {"p/step_2"}
    assert planner.take(5, busy=lambda path: False) == [new_a]
    assert not planner and planner.pending_bytes == 0 and planner.set_keys() == set()


def test_planner_counts_each_path_once_per_set() -> None:
    planner = Planner()
    first, again = pending("step_1", 10, 1), pending("step_1", 15, 2)
    planner.add(first)
    planner.add(again)  # the same file written again: replaced, not added twice
    assert len(planner) == 1 and planner.pending_bytes == 15
    other = pending("step_2", 5, 3)
    planner.add(other)
    assert planner.remove_under(Path("/ckpt/step_1")) == [again]
    assert planner.set_keys() == {"p/step_2"} and planner.pending_bytes == 5
    assert planner.remove_under(other.path) == [other]
    assert planner.set_keys() == set() and not planner


def test_files_at_or_below_a_deleted_path() -> None:
    files = {Path(p) for p in ("/ckpt/step_1/a.pt", "/ckpt/step_1/sub/b.pt",
                               "/ckpt/step_10/a.pt", "/ckpt/step_1.pt", "/other/c.pt")}
    assert files_at_or_below(Path("/ckpt/step_1/a.pt"), files) == [Path("/ckpt/step_1/a.pt")]
    # a directory takes everything below it, not its siblings that share a name prefix
    assert set(files_at_or_below(Path("/ckpt/step_1"), files)) == {
        Path("/ckpt/step_1/a.pt"), Path("/ckpt/step_1/sub/b.pt")}
    assert set(files_at_or_below(Path("/ckpt"), files)) == files - {Path("/other/c.pt")}
    assert set(files_at_or_below(Path("/"), files)) == files
    assert files_at_or_below(Path("/ckpt/step"), files) == []
    assert files_at_or_below(Path("/ckpt/step_1/a.p"), files) == []


def test_planner_drains_in_order_around_busy_paths() -> None:
    planner = Planner()
    items = [pending(f"step_{n}", 1, n) for n in range(1, 8)]
    for item in items:
        planner.add(item)
    expected = planner.ordered()
    assert expected == items[::-1]  # newest set first
    busy = {expected[0].path, expected[3].path}
    taken = planner.take(3, busy=lambda path: path in busy)
    assert taken == [expected[1], expected[2], expected[4]]
    assert planner.ordered() == [expected[0], expected[3], *expected[5:]]  # the busy ones lead
    drained = []
    while planner:
        drained += planner.take(2, busy=lambda path: False)
    assert drained == [expected[0], expected[3], *expected[5:]]


def test_flush_at_risk_is_logged_newest_set_first(workspace: Workspace, imds: ImdsEmulator,
                                                  s3: Any) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    older = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 100 * 2**20)
    newer = save_checkpoint(workspace.checkpoints / "step_2" / "model.pt", 20 * 2**20)
    wait_for(lambda: workspace.status().get("pending_files") == 2)  # both settled, held back
    # 0.8 to 2 s left: at the assumed 50 MiB/s the newest set fits, the older one does not.
    imds.fire_spot_interruption(in_seconds=2)
    warning = daemon.wait_for_event("flush_at_risk")
    assert warning["at_risk_sets"] == ["run1/step_1"]
    assert warning["bandwidth"] == "assumed"
    daemon.wait_for_event("flush_done")
    assert object_bytes(s3, workspace.bucket, "run1/step_2/model.pt") == newer
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == older
    assert daemon.stop() == 0


def test_the_trainer_is_never_told_a_later_deadline_than_it_has(workspace: Workspace,
                                                                imds: ImdsEmulator) -> None:
    """A rebalance (no deadline) then a spot notice: the file moves to the spot notice. A
    scheduled event due later, then: it flushes too but the file keeps the spot deadline."""
    notice_file = workspace.root / "shared" / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file),
                                  "command": "echo acted $SPOTWATCH_NOTICE_KIND"})

    def told() -> str | None:
        notice = interruption_pending(notice_file)
        return None if notice is None else str(notice["kind"])

    daemon = workspace.start_daemon()
    imds.fire_rebalance()
    wait_for(lambda: told() == "rebalance-recommendation")
    imds.fire_spot_interruption(in_seconds=120)
    wait_for(lambda: told() == "spot-interruption")
    spot_deadline = interruption_pending(notice_file)["deadline"]  # type: ignore[index]
    imds.schedule_event(in_seconds=3600)
    kept = daemon.wait_for_event("notice_file_kept")
    assert kept["kind"] == "scheduled-event"
    assert told() == "spot-interruption"
    assert interruption_pending(notice_file)["deadline"] == spot_deadline  # type: ignore[index]
    kinds = [e["kind"] for e in daemon.named("notice_detected")]
    assert kinds == ["rebalance-recommendation", "spot-interruption", "scheduled-event"]
    assert daemon.stop() == 0


def test_a_notice_file_that_cannot_be_written_when_the_notice_comes_degrades_status(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """The notice file's directory is replaced by a file after the start: the notice cannot
    be written, and status says so (old: a hook_failed line in the log, and `health: ok`)."""
    notices = workspace.root / "notices"
    notices.mkdir()
    workspace.write_config(hooks={"notice_file": str(notices / "notice.json")})
    daemon = workspace.start_daemon()
    notices.rmdir()
    notices.write_bytes(b"in the way")
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("hook_failed")
    reason = f"the trainer cannot be told of a notice: {notices / 'notice.json'}: "
    assert wait_for(lambda: any(said.startswith(reason)
                                for said in workspace.status().get("degraded", [])))
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 1
    shown = workspace.cli("status", "-c", "config.yaml")
    assert "cannot be told of a notice" in shown.stdout, shown.stdout
    # Fixed while the daemon runs: the notice in effect is written there, and status is
    # healthy again, without another notice or a restart.
    notices.unlink()
    notices.mkdir()
    assert wait_for(lambda: not any(said.startswith(reason)
                                    for said in workspace.status().get("degraded", [])),
                    timeout=30)
    daemon.wait_for_event("notice_file_written")
    told = interruption_pending(notices / "notice.json")
    assert told is not None and told["kind"] == "spot-interruption"
    daemon.stop()


def test_a_notice_file_on_a_full_file_system_degrades_status_until_it_is_written(
        workspace: Workspace, imds: ImdsEmulator, tiny_run_dir: Path) -> None:
    """The notice file on a small tmpfs (/run) that is full when the notice comes: status
    stays degraded while it is full (old: a check that made an empty file, which needs no
    space, cleared it ten seconds later, and the notice was never written), and once space is
    freed the notice in effect is written and status is healthy again."""
    notices = tiny_run_dir
    workspace.write_config(hooks={"notice_file": str(notices / "notice.json")})
    daemon = workspace.start_daemon()
    filler = fill(notices)
    fired = time.time()
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("hook_failed")
    reason = f"the trainer cannot be told of a notice: {notices / 'notice.json'}: "

    def degraded() -> bool:
        return any(said.startswith(reason) for said in workspace.status().get("degraded", []))

    assert wait_for(degraded)
    # A status written after the place was checked again, still full: still degraded.
    wait_for(lambda: workspace.status().get("updated_at", 0) > fired + RECHECK_SECONDS + 1,
             timeout=RECHECK_SECONDS + 20)
    assert degraded()
    assert interruption_pending(notices / "notice.json") is None
    filler.unlink()
    wait_for(lambda: not degraded(), timeout=RECHECK_SECONDS + 20)
    told = interruption_pending(notices / "notice.json")
    assert told is not None and told["kind"] == "spot-interruption"
    assert daemon.stop() == 0


def test_a_command_hook_that_fails_degrades_status_until_its_notice_is_withdrawn(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """Old: `hook_command_done exit_code 3` at info level, and `health: ok`: the trainer
    missed its notice and nothing said so."""
    workspace.write_config(hooks={"command": "exit 3"})
    daemon = workspace.start_daemon()
    event = json.loads(imds.schedule_event(in_seconds=3600))[-1]["EventId"]
    done = daemon.wait_for_event("hook_command_done")
    assert done["exit_code"] == 3 and done["level"] == "warning"
    reason = "the trainer was not told of the notice: hooks.command: exit code 3"
    assert wait_for(lambda: reason in workspace.status().get("degraded", []))
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 1
    # The notice withdrawn: nothing is missed any more.
    imds.cancel_event(event)
    daemon.wait_for_event("notice_cancelled")
    assert wait_for(lambda: reason not in workspace.status().get("degraded", []))
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 0
    assert daemon.stop() == 0
