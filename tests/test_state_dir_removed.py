"""The state directory removed under a running daemon (rm -rf by an operator, tmpfiles cleaning
/tmp): the daemon takes its lock again on a new file, so there is still one daemon per state
directory, `spotwatch status` shows it, and its uploads go on."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from spotwatch.daemon import state_guard
from spotwatch.daemon.state_guard import StateGuard
from spotwatch.errors import ConfigError
from spotwatch.state import StateDir, StateLock
from tests.conftest import Workspace, fill, keys_in, object_bytes, wait_for
from tests.test_daemon_e2e import save_checkpoint


def shown_status(workspace: Workspace) -> dict[str, Any]:
    result = workspace.cli("status", "--json", "-c", str(workspace.config_file))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_daemon_whose_state_dir_is_removed_holds_it_again(workspace: Workspace,
                                                           s3: Any) -> None:
    daemon = workspace.start_daemon()
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 3_000)
    daemon.wait_for_event("set_complete")
    state = workspace.root / "state"
    mode = state.stat().st_mode

    shutil.rmtree(state)
    wait_for(lambda: shown_status(workspace)["daemon_pid"] == daemon.process.pid)

    assert state.stat().st_mode == mode  # made as at start
    recreated = daemon.wait_for_event("state_dir_recreated")
    assert recreated["level"] == "warning" and "ledger" in recreated["detail"]
    second = workspace.cli("run", "-c", str(workspace.config_file), timeout=30)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"spotwatch: error: another spotwatch (pid {daemon.process.pid}) is using state "
        f"directory {state}"]

    data = save_checkpoint(workspace.checkpoints / "step_2" / "model.pt", 5_000)
    flushed = workspace.cli("flush", "-c", str(workspace.config_file))  # joins the daemon
    assert flushed.returncode == 0, flushed.stderr
    assert daemon.named("flush_done")[-1]["reason"] == "manual-flush"
    wait_for(lambda: "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_2/model.pt") == data
    assert daemon.stop() == 0
    events = daemon.events()
    assert [e for e in events if e.get("event") == "state_dir_recreated"] == [recreated]
    assert not [e for e in events if e.get("level") == "error"
                or "Traceback" in json.dumps(e)]
    assert "Traceback" not in daemon.log_path.read_text()


def test_a_lock_taken_by_another_process_meanwhile_is_named_and_taken_back(
        tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(state_guard, "CHECK_EVERY_SECONDS", 0.0)
    state = StateDir(tmp_path / "state")
    state.ensure()
    ours = StateLock(state)
    ours.acquire()
    guard = StateGuard(state, ours)
    shutil.rmtree(state.path)
    state.ensure()
    theirs = StateLock(state)  # another open file: flock tells it from ours, as another process
    theirs.acquire()

    with capture_logs() as logs:
        guard.check_when_due()
        guard.check_when_due()
    assert not guard.held
    assert [(e["event"], e["log_level"]) for e in logs] == [("state_dir_taken", "error")]
    reason = guard.degraded_reason()
    assert reason is not None and reason.startswith("state_dir_taken: another spotwatch (pid ")

    theirs.release()
    with capture_logs() as logs:
        guard.check_when_due()
    assert guard.held and guard.degraded_reason() is None
    assert [e["event"] for e in logs] == ["state_dir_recreated"]
    assert StateLock(state).holder() is not None
    ours.release()


def test_a_state_directory_no_retry_mends_is_a_config_error_and_others_are_not(
        tmp_path: Path) -> None:
    """Exit 2 only where a restart would meet the same refusal (not this user's to write, a
    read-only mount, a file in its place); a passing failure (EIO, a full disk) stays 1."""
    state = StateDir(tmp_path / "state")
    for number in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        assert state.refused("write", OSError(number, "x")).exit_code == 2
    for number in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
        refused = state.refused("write", OSError(number, "no"))
        assert refused.exit_code == 1
        assert str(refused) == f"cannot write state directory {state.path}: no"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError):
        StateDir(tmp_path / "file" / "state").ensure()


@pytest.fixture
def full_disk(tiny_state_dir: Path) -> Path:
    fill(tiny_state_dir)
    return tiny_state_dir


@pytest.mark.parametrize("verb", ["check", "run"])
def test_a_full_state_disk_is_refused_by_check_as_by_run(workspace: Workspace, full_disk: Path,
                                                          verb: str) -> None:
    """`check` passed a state directory with no space left that `run` refuses at its first
    write (the lock): both now give run's one line, exit 1 (space may come back)."""
    workspace.write_config(state={"dir": str(full_disk)})
    done = workspace.cli(verb, "-c", "config.yaml", timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"spotwatch: error: cannot write state directory {full_disk}: No space left on device")
    assert not [p for p in full_disk.iterdir() if p.name.startswith(".spotwatch-check-")]


def test_a_state_disk_that_fills_up_makes_status_say_so_not_stand_still(
        workspace: Workspace, tiny_state_dir: Path, s3: Any) -> None:
    """The state disk fills while the daemon runs: uploads go on but their ledger writes fail,
    so the files stay pending. status.json, which could not be replaced, used to stand still
    at its last word (pending 0, healthy); it is now written in place and says why."""
    workspace.write_config(state={"dir": str(tiny_state_dir)})
    daemon = workspace.start_daemon()

    def status() -> dict[str, Any]:
        try:
            return json.loads((tiny_state_dir / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):  # not yet written, or met half written in place
            return {}

    wait_for(lambda: status().get("pid") == daemon.process.pid)
    fill(tiny_state_dir)
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1000)
    daemon.wait_for_event("status_written_in_place")
    report = wait_for(lambda: (found := status()).get("pending_files") and found)
    assert any(reason.startswith(f"state directory full: {tiny_state_dir}")
               for reason in report["degraded"]), report
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 1
    daemon.process.kill()
    daemon.process.wait()
