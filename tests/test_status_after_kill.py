"""`spotwatch status` after the daemon was killed before it could report what the trainer
wrote last: what is on disk and not in S3 is counted all the same (invariant 8), by the rule
the daemon's start-up scan uploads by."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotwatch.bucket import NamedBucket
from spotwatch.commands import status
from spotwatch.config import load_config
from tests.conftest import Daemon, Workspace, keys_in, wait_for

# Drops root's power to read any directory (as tests/test_unreadable_dirs.py).
NO_DAC = ("setpriv", "--inh-caps=-all", "--bounding-set", "-dac_override,-dac_read_search")


def write_steps(checkpoints: Path, steps: range) -> list[str]:
    """As a trainer saves: three files a step. Their keys."""
    keys = []
    for step in steps:
        folder = checkpoints / f"step_{step}"
        folder.mkdir()
        for name in ("model.pt", "optim.pt", "meta.json"):
            (folder / name).write_bytes(f"{step}/{name}".encode() * 10)
            keys.append(f"run1/step_{step}/{name}")
    return keys


def killed_unseen(workspace: Workspace, write: Any, daemon: Daemon | None = None) -> Daemon:
    """A daemon (started here unless given) that reported, then was stopped (SIGSTOP) while
    `write` wrote, then killed: it never saw, let alone reported, what was written."""
    daemon = daemon or workspace.start_daemon()
    wait_for(lambda: workspace.status().get("pid") == daemon.process.pid)
    daemon.process.send_signal(signal.SIGSTOP)
    write()
    daemon.process.kill()
    daemon.process.wait()
    return daemon


def shown(workspace: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    done = workspace.cli("status", "-c", str(workspace.config_file), *args)
    assert done.returncode == (1 if "--healthy" in args else 0), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_files_written_after_the_last_report_of_a_killed_daemon_are_counted(
        workspace: Workspace, s3: Any) -> None:
    """The acceptance probe's case: 3 steps (9 files) written, the daemon killed before its
    next report. Its last report says nothing is left; the disk says 9 files are."""
    keys: list[str] = []
    killed_unseen(workspace, lambda: keys.extend(write_steps(workspace.checkpoints, range(3))))
    assert workspace.status()["pending_files"] == 0  # its last word: nothing pending

    text = shown(workspace).stdout
    assert "daemon:       not running" in text, text
    assert "left behind:  9 files, " in text and "(counted on disk now)" in text, text
    assert "its last report (" in text and ") counted 0" in text, text
    report = json.loads(shown(workspace, "--json").stdout)
    left = report["left_by_last_run"]
    assert left["files_not_in_s3"] == 9 and left["counted"] == "on disk now", left
    assert left["pending_files"] + left["unsettled_files"] == 9
    assert left["reported_files"] == 0 and not left["at_least"]
    assert report["healthy"] is False
    shown(workspace, "--healthy")  # exit 1: the same verdict

    # What the count promised is what the next start uploads.
    daemon = workspace.start_daemon()
    wait_for(lambda: set(keys) <= keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0
    assert json.loads(shown(workspace, "--json").stdout)["left_by_last_run"] is None


def test_the_count_follows_the_scans_rules(workspace: Workspace, s3: Any) -> None:
    """Only what the start-up scan would upload counts: not a file in S3 as it is, nor one
    the filters, the staging names or spotwatch's own key space leave out; a file rewritten
    since its upload does."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "exclude": ["*.log"]}])
    (workspace.checkpoints / "kept.pt").write_bytes(b"uploaded")
    (workspace.checkpoints / "rewritten.pt").write_bytes(b"uploaded")
    daemon = workspace.start_daemon()
    wait_for(lambda: {"run1/kept.pt", "run1/rewritten.pt"} <= keys_in(s3, workspace.bucket))
    wait_for(lambda: (lambda report: report.get("pending_files") == 0
                      and report.get("unsettled_files") == 0
                      and report.get("unsealed_sets") == [])(workspace.status()))

    def write() -> None:
        (workspace.checkpoints / "rewritten.pt").write_bytes(b"changed since")
        (workspace.checkpoints / "train.log").write_text("excluded by the filter")
        (workspace.checkpoints / "step_9.tmp").mkdir()
        (workspace.checkpoints / "step_9.tmp" / "model.pt").write_bytes(b"staged")
        (workspace.checkpoints / ".spotwatch").mkdir()
        (workspace.checkpoints / ".spotwatch" / "own.json").write_bytes(b"reserved")
        (workspace.checkpoints / "new.pt").write_bytes(b"new")
        (workspace.checkpoints / "link.pt").symlink_to("kept.pt")
        os.mkfifo(workspace.checkpoints / "pipe")

    killed_unseen(workspace, write, daemon)
    assert daemon.process.returncode == -signal.SIGKILL
    left = json.loads(shown(workspace, "--json").stdout)["left_by_last_run"]
    assert left["files_not_in_s3"] == 2 and left["counted"] == "on disk now", left
    assert left["on_disk"]["bytes"] == len(b"changed since") + len(b"new")
    assert "left behind:  2 files, 16 B not in S3 (counted on disk now)" in shown(
        workspace).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping DAC capabilities needs root")
def test_a_directory_status_may_not_read_is_named_not_a_traceback(
        workspace: Workspace) -> None:
    def write() -> None:
        write_steps(workspace.checkpoints, range(2))
        (workspace.checkpoints / "step_1").chmod(0o700)
        os.chown(workspace.checkpoints / "step_1", 12345, 12345)

    killed_unseen(workspace, write)
    done = subprocess.run(
        [*NO_DAC, sys.executable, "-m", "spotwatch.cli", "status", "-c",
         str(workspace.config_file)],
        cwd=workspace.root, env=workspace.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "left behind:  at least 3 files, " in done.stdout, done.stdout
    assert ("unreadable:   1 directories status may not read (their files are not counted "
            f"above): {workspace.checkpoints / 'step_1'}") in done.stdout, done.stdout


def test_a_huge_tree_is_counted_up_to_a_bound_and_says_so(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """No daemon ever ran here: every file is not in S3. Past the bound the count is a lower
    bound, said as such."""
    write_steps(workspace.checkpoints, range(3))
    monkeypatch.setattr(status, "STATUS_COUNT_MAX_FILES", 4)
    report = status.gather_status(load_config(workspace.config_file),
                                  NamedBucket(workspace.bucket, "--bucket"))
    left = report["left_by_last_run"]
    assert left["files_not_in_s3"] == 4 and left["at_least"], left
    assert left["on_disk"]["complete"] is False and left["reported_files"] is None
    text = status.render_status(report)
    assert ("left behind:  at least 4 files, " in text
            and "(counted on disk now, stopped after 4 files looked at); no readable report "
                "of the last run; the next start uploads them" in text), text
