"""A directory the daemon may not read (a trainer of another user with umask 077, or a
tempfile.mkdtemp staging directory renamed into place) is named, keeps its set unsealed, shows
in status, and uploads once its permissions are fixed. The daemon runs as root without the
capabilities that let root read anything, as a daemon of another user than the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import Workspace, keys_in, object_bytes, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping DAC capabilities needs root")
NO_DAC = ("setpriv", "--inh-caps=-all", "--bounding-set", "-dac_override,-dac_read_search")


def manifest_paths(s3: Any, bucket: str, set_name: str) -> list[str]:
    body = object_bytes(s3, bucket, f"run1/.spotwatch/manifests/{set_name}.json")
    return sorted(entry["path"] for entry in json.loads(body)["files"])


def set_verdict(daemon: Any, set_key: str) -> str:
    """Waits for the daemon's first verdict on a set: set_complete or set_incomplete."""
    def verdict() -> str | None:
        return next((e["event"] for e in daemon.events()
                     if e.get("event") in ("set_complete", "set_incomplete")
                     and e.get("set") == set_key), None)
    return wait_for(verdict, timeout=30)  # type: ignore[no-any-return]


def test_a_set_with_a_directory_the_daemon_cannot_read_is_not_sealed(
        workspace: Workspace, s3: Any) -> None:
    workspace.launcher = NO_DAC
    daemon = workspace.start_daemon()
    staging = workspace.checkpoints / "step_1.tmp"
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"model")
    optim = staging / "optim"
    optim.mkdir()
    (optim / "optim.pt").write_bytes(b"optimizer state")
    # The daemon runs as the owner here: 0 stands for another user's 0700.
    optim.chmod(0)
    staging.rename(workspace.checkpoints / "step_1")

    assert set_verdict(daemon, "run1/step_1") == "set_incomplete"
    unreadable = str(workspace.checkpoints / "step_1" / "optim")
    warned = daemon.wait_for_event("dir_unreadable")
    assert warned["path"] == unreadable and warned["error"] == "Permission denied"
    assert "run1/.spotwatch/manifests/step_1.json" not in keys_in(s3, workspace.bucket)
    status = wait_for(lambda: workspace.status().get("unreadable_dirs") and workspace.status())
    assert status["unreadable_dirs"] == [unreadable]
    assert "run1/step_1" in status["incomplete_sets"]
    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert f"unreadable:   1 directories spotwatch may not read (their files are not " \
           f"uploaded): {unreadable}" in shown.stdout

    (workspace.checkpoints / "step_1" / "optim").chmod(0o755)  # the operator fixes it
    daemon.wait_for_event("set_complete")
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    assert manifest_paths(s3, workspace.bucket, "step_1") == ["step_1/model.pt",
                                                             "step_1/optim/optim.pt"]
    assert object_bytes(s3, workspace.bucket, "run1/step_1/optim/optim.pt") == \
        b"optimizer state"
    wait_for(lambda: workspace.status().get("unreadable_dirs") == [])
    assert daemon.stop() == 0


def test_a_directory_unreadable_at_start_is_named_and_watched_once_readable(
        workspace: Workspace, s3: Any) -> None:
    workspace.launcher = NO_DAC
    hidden = workspace.checkpoints / "step_2"
    hidden.mkdir()
    (hidden / "model.pt").write_bytes(b"two")
    hidden.chmod(0)  # another user's 0700
    daemon = workspace.start_daemon()
    warned = daemon.wait_for_event("dir_unreadable")
    assert warned["path"] == str(hidden)
    wait_for(lambda: workspace.status().get("unreadable_dirs") == [str(hidden)])

    hidden.chmod(0o755)
    wait_for(lambda: "run1/step_2/model.pt" in keys_in(s3, workspace.bucket), timeout=30)
    # Watched from now on: a file written in it later is uploaded too.
    (hidden / "later.pt").write_bytes(b"later")
    wait_for(lambda: "run1/step_2/later.pt" in keys_in(s3, workspace.bucket), timeout=30)
    assert object_bytes(s3, workspace.bucket, "run1/step_2/later.pt") == b"later"
    assert daemon.stop() == 0


def test_an_unreadable_directory_the_filters_exclude_is_not_reported(
        workspace: Workspace, s3: Any) -> None:
    workspace.launcher = NO_DAC
    staging = workspace.checkpoints / "step_3.tmp"  # the default excludes cover *.tmp/*
    staging.mkdir()
    staging.chmod(0)
    (workspace.checkpoints / "done.pt").write_bytes(b"done")
    daemon = workspace.start_daemon()
    wait_for(lambda: "run1/done.pt" in keys_in(s3, workspace.bucket))
    wait_for(lambda: "unreadable_dirs" in workspace.status())
    assert workspace.status()["unreadable_dirs"] == []
    assert daemon.named("dir_unreadable") == []
    assert daemon.stop() == 0


def test_a_flush_that_could_not_read_a_directory_does_not_say_everything_is_safe(
        workspace: Workspace, s3: Any) -> None:
    hidden = workspace.checkpoints / "step_4"
    hidden.mkdir()
    (hidden / "model.pt").write_bytes(b"four")
    hidden.chmod(0)
    (workspace.checkpoints / "done.pt").write_bytes(b"done")
    flush = subprocess.run([*NO_DAC, sys.executable, "-m", "spotwatch.cli", "flush", "-c",
                            str(workspace.config_file)], cwd=workspace.root, env=workspace.env(),
                           capture_output=True, text=True, timeout=60)
    assert flush.returncode == 1, flush.stderr
    assert f"1 directories spotwatch may not read, their files not uploaded: {hidden}" in \
        flush.stderr
    assert "run1/done.pt" in keys_in(s3, workspace.bucket)

    # The daemon's final flush says so too, in its exit code and its flush_incomplete.
    workspace.launcher = NO_DAC
    daemon = workspace.start_daemon()
    daemon.wait_for_event("dir_unreadable")
    assert daemon.stop() == 1
    [incomplete] = daemon.named("flush_incomplete")
    assert incomplete["unreadable_dirs"] == [str(hidden)]


def _closed_after_it_was_watched(workspace: Workspace, s3: Any, step: Path,
                                 folder: Path) -> Any:
    """The daemon (without root's read capabilities) once a file of step is in S3, then the
    folder (step or a folder above it) closed, as another user's 0700, and step/model.pt
    written while it is."""
    workspace.launcher = NO_DAC
    step.mkdir()
    (step / "first.pt").write_bytes(b"first")
    daemon = workspace.start_daemon()
    wait_for(lambda: f"run1/{step.name}/first.pt" in keys_in(s3, workspace.bucket), timeout=30)
    folder.chmod(0)
    (step / "model.pt").write_bytes(b"written while closed")
    return daemon


def _up_once_open(workspace: Workspace, s3: Any, step: Path, model: bytes) -> None:
    """Once the folder is open: step/model.pt goes up with these bytes, no directory is
    named unreadable any more, and a file written in step afterwards goes up too (watched)."""
    key = f"run1/{step.name}/model.pt"
    wait_for(lambda: key in keys_in(s3, workspace.bucket), timeout=30)
    assert object_bytes(s3, workspace.bucket, key) == model
    wait_for(lambda: workspace.status().get("unreadable_dirs") == [])
    (step / "later.pt").write_bytes(b"later")
    wait_for(lambda: f"run1/{step.name}/later.pt" in keys_in(s3, workspace.bucket), timeout=30)


@pytest.mark.parametrize("closed", ["set", "root"])
def test_a_folder_closed_after_it_was_watched_is_named_and_its_files_go_up_once_open(
        workspace: Workspace, s3: Any, closed: str) -> None:
    """A trainer of another user closes a folder already watched (chmod 700) and writes into
    it: inotify still reports the write, but the file's bytes, even its size, are out of
    reach. It is never dropped with status at 0 pending: its folder (the set's, or the watched
    root itself) is named, shown in status, and the file goes up once the folder is open
    again, with no flush or rescan to find it."""
    step = workspace.checkpoints / "step_6"
    folder = step if closed == "set" else workspace.checkpoints
    daemon = _closed_after_it_was_watched(workspace, s3, step, folder)

    warned = daemon.wait_for_event("dir_unreadable")
    assert warned["path"] == str(folder)
    wait_for(lambda: workspace.status().get("unreadable_dirs") == [str(folder)])
    assert "run1/step_6/model.pt" not in keys_in(s3, workspace.bucket)

    folder.chmod(0o755)  # the operator opens it again
    # Still watched through the watch it had: a later write goes up, once.
    _up_once_open(workspace, s3, step, b"written while closed")
    assert daemon.stop() == 0
    assert len([e for e in daemon.named("upload_done")
                if e.get("key") == "run1/step_6/later.pt"]) == 1


def test_a_closed_folder_replaced_by_another_closed_one_is_watched_once_open(
        workspace: Workspace, s3: Any) -> None:
    """Noted closed after it was watched, then deleted and another closed folder renamed into
    its place (watchdog cannot watch it): once open, the new folder gets a watch of its own,
    so a file written in it later goes up."""
    step = workspace.checkpoints / "step_8"
    daemon = _closed_after_it_was_watched(workspace, s3, step, step)
    wait_for(lambda: workspace.status().get("unreadable_dirs") == [str(step)])

    replacement = workspace.root / "step_8.new"
    replacement.mkdir()
    (replacement / "model.pt").write_bytes(b"the new folder's")
    replacement.chmod(0)
    step.chmod(0o755)
    shutil.rmtree(step)
    replacement.rename(step)
    step.chmod(0o755)
    _up_once_open(workspace, s3, step, b"the new folder's")
    assert daemon.stop() == 0
