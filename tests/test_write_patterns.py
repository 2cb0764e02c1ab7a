"""Unusual write patterns end to end: the daemon and `spotwatch flush` as subprocesses,
real files and watchdog events, the moto S3 server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .conftest import Workspace, keys_in, object_bytes, wait_for


@contextmanager
def appending_logger(path: Path, every: float = 0.1) -> Iterator[None]:
    """A logger that keeps its file open (O_APPEND) and writes a line every few moments,
    so the file never settles."""
    stop = threading.Event()

    def write_lines() -> None:
        with path.open("a") as log:
            while not stop.wait(every):
                log.write("step done\n")
                log.flush()

    thread = threading.Thread(target=write_lines)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def settled_checkpoint(path: Path, data: bytes) -> None:
    """A checkpoint written a minute ago: the startup scan takes it as complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = time.time() - 60
    os.utime(path, (past, past))


def test_flush_stops_waiting_for_a_log_that_never_settles(workspace: Workspace,
                                                          s3: Any) -> None:
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 1.0,
                                 "stop_timeout": 3})
    settled_checkpoint(workspace.checkpoints / "step_1" / "model.pt", b"weights" * 100)
    with appending_logger(workspace.checkpoints / "step_1" / "train.log"):
        result = workspace.cli("flush", "-c", str(workspace.config_file), timeout=40)
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines()
                   if line.startswith("spotwatch: error:")]
    assert len(error_lines) == 1 and "train.log" in error_lines[0], result.stderr
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == b"weights" * 100
    # The log's set is held by the log: no manifest says it is complete.
    assert not any("manifests" in key for key in keys_in(s3, workspace.bucket))


def test_daemon_flush_stops_waiting_for_a_log_that_never_settles(workspace: Workspace,
                                                                 s3: Any) -> None:
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 1.0,
                                 "stop_timeout": 3})
    daemon = workspace.start_daemon()
    with appending_logger(workspace.checkpoints / "train.log"):
        settled_checkpoint(workspace.checkpoints / "step_1" / "model.pt", b"weights" * 100)
        result = workspace.cli("flush", "-c", str(workspace.config_file), timeout=40)
        assert result.returncode == 1, result.stderr
        assert "train.log" in result.stderr and "still being written" in result.stderr
        done = daemon.wait_for_event("flush_done")
        assert done["still_written_files"] == [str(workspace.checkpoints / "train.log")]
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == b"weights" * 100
    assert "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket)


def test_a_rewrite_keeping_size_and_mtime_is_uploaded_again(workspace: Workspace,
                                                            s3: Any) -> None:
    daemon = workspace.start_daemon()
    path = workspace.checkpoints / "step_1" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(b"a" * 1000)
    daemon.wait_for_event("upload_done")
    before = os.stat(path)
    with path.open("r+b") as file:  # in place, same size
        file.write(b"b" * 1000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime back
    daemon.wait_for_event("upload_done", count=2)
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == b"b" * 1000


def test_a_file_linked_into_two_sets_ends_equal_under_both_names(workspace: Workspace,
                                                                 s3: Any) -> None:
    """inotify reports a write only under the name it went through: the other name of a
    hard-linked file must be uploaded again too, and its set sealed with the new bytes."""
    daemon = workspace.start_daemon()
    first = workspace.checkpoints / "step_1" / "shared.bin"
    first.parent.mkdir()
    first.write_bytes(b"old" * 100)
    daemon.wait_for_event("set_complete")
    second = workspace.checkpoints / "step_2" / "shared.bin"
    second.parent.mkdir()
    os.link(first, second)
    daemon.wait_for_event("set_complete", count=2)
    with first.open("r+b") as file:  # in place, through the first name only
        file.write(b"new" * 100)
    for key in ("run1/step_1/shared.bin", "run1/step_2/shared.bin"):
        wait_for(lambda key=key: object_bytes(s3, workspace.bucket, key) == b"new" * 100)
    daemon.wait_for_event("set_complete", count=4)
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", str(workspace.config_file), "--to", str(target),
                           "--set", "step_2")
    assert result.returncode == 0, result.stderr
    assert (target / "step_2" / "shared.bin").read_bytes() == b"new" * 100
