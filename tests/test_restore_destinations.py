"""Destinations a user may name to restore: each restores, or is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import Workspace
from .test_daemon_e2e import save_checkpoint
from .test_unreadable_dirs import NO_DAC


def test_a_destination_whose_name_is_not_utf8_is_restored_on_either_client(
        workspace: Workspace, transfer_client: str) -> None:
    data = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 2_000)
    assert workspace.cli("flush").returncode == 0
    destination = os.fsencode(workspace.root) + b"/caf\xe9"  # Latin-1, as an old tool names it
    restored = subprocess.run(  # bytes out: the name in the summary is not UTF-8 either
        [sys.executable, "-m", "spotwatch.cli", "restore", "--to", destination],
        cwd=workspace.root, env=workspace.env(), capture_output=True, timeout=60)
    assert restored.returncode == 0, restored.stderr
    assert b"Traceback" not in restored.stderr
    with open(destination + b"/step_1/model.pt", "rb") as back:
        assert back.read() == data


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping DAC capabilities needs root")
def test_a_destination_below_a_folder_that_may_not_be_entered_is_one_line(
        workspace: Workspace) -> None:
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 2_000)
    assert workspace.cli("flush").returncode == 0
    locked = workspace.root / "locked"
    locked.mkdir(mode=0)
    done = subprocess.run(
        [*NO_DAC, sys.executable, "-m", "spotwatch.cli", "restore", "--to",
         str(locked / "sub")], cwd=workspace.root, env=workspace.env(), capture_output=True,
        text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"spotwatch: error: cannot restore into {locked / 'sub'}: Permission denied"]


def test_a_fifo_where_an_empty_file_goes_is_replaced_not_read(workspace: Workspace) -> None:
    """A FIFO of the size (0) and mtime an empty file of the set was sealed with: taken for
    the file, it was opened to be checked, and restore waited for a writer for good."""
    empty = workspace.checkpoints / "step_1" / "empty.bin"
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 2_000)
    empty.write_bytes(b"")
    assert workspace.cli("flush").returncode == 0
    mtime_ns = empty.stat().st_mtime_ns
    target = workspace.root / "restored"
    (target / "step_1").mkdir(parents=True)
    fifo = target / "step_1" / "empty.bin"
    os.mkfifo(fifo)
    os.utime(fifo, ns=(mtime_ns, mtime_ns))
    restored = workspace.cli("restore", "--to", str(target), timeout=60)
    assert restored.returncode == 0, restored.stderr
    assert fifo.is_file() and fifo.read_bytes() == b""
