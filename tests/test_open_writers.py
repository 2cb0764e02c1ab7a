"""A file a process still holds open for writing is not complete, however long it is quiet.

The quiet rule settles a file never seen closed after quiet_seconds without changes; a trainer
pausing mid-save with the file open had half a file uploaded and its set sealed (and a prune
keeping one set then deleted the last really complete one)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotwatch.config import WatchDir
from spotwatch.sync.open_writers import file_identity, held_for_writing
from spotwatch.sync.tracker import ChangeTracker

from .conftest import Workspace, keys_in, object_bytes, wait_for

_HOLDER = """
import os, sys
fd = os.open(sys.argv[1], getattr(os, sys.argv[2]) | os.O_CREAT, 0o644)
os.write(fd, b"x" * int(sys.argv[3])) if sys.argv[2] != "O_RDONLY" else None
print("ready", flush=True)
sys.stdin.read()  # held until the test closes our stdin
os.write(fd, b"y" * int(sys.argv[3])) if sys.argv[2] != "O_RDONLY" else None
"""


class Holder:
    """A process holding a file open (flags) until release."""

    def __init__(self, path: Path, flags: str, size: int = 0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path), flags, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "ready\n"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=10)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.release()


def identity(path: Path) -> tuple[int, int]:
    found = file_identity(path)
    assert found is not None
    return found


def test_scan_finds_writers_only(tmp_path: Path, holders: list[Holder]) -> None:
    written, read, closed = (tmp_path / name for name in ("w.pt", "r.pt", "closed.pt"))
    read.write_bytes(b"r")
    closed.write_bytes(b"c")
    holders.append(Holder(written, "O_WRONLY", 10))
    holders.append(Holder(read, "O_RDONLY"))
    files = [identity(p) for p in (written, read, closed)]
    assert held_for_writing(files) == {identity(written)}
    holders[0].release()
    assert held_for_writing(files) == set()


def test_scan_finds_read_write_but_not_a_mapping_alone(tmp_path: Path,
                                                      holders: list[Holder]) -> None:
    # A file mapped writable and shared (Python's mmap keeps a read-write descriptor of its
    # own) is left to the quiet rule and the periodic rescan: a trainer may keep one for its
    # whole run (tests/test_daemon_e2e.py, writes through a memory mapping).
    both, mapped = tmp_path / "rw.pt", tmp_path / "mapped.pt"
    holders.append(Holder(both, "O_RDWR", 10))
    mapped.write_bytes(b"\0" * mmap.PAGESIZE)
    with mapped.open("r+b") as handle:
        mapping = mmap.mmap(handle.fileno(), 0)
    try:
        assert held_for_writing([identity(both), identity(mapped)]) == {identity(both)}
    finally:
        mapping.close()


def test_scan_never_raises_on_an_odd_proc(tmp_path: Path) -> None:
    (tmp_path / "123" / "fd").mkdir(parents=True)
    os.symlink("/nonexistent", tmp_path / "123" / "fd" / "3")
    (tmp_path / "456").mkdir()
    assert held_for_writing([(1, 2)], proc=tmp_path) == set()
    assert held_for_writing([(1, 2)], proc=tmp_path / "missing") == set()


def test_quiet_rule_waits_for_the_writer_and_looks_again(tmp_path: Path,
                                                         holders: list[Holder]) -> None:
    # Found unclosed by a scan (no events): settled once no process holds it for writing any
    # more, at the next quiet expiry.
    tracker = ChangeTracker(WatchDir(tmp_path), settle_seconds=0.1, quiet_seconds=0.3)
    path = tmp_path / "b.pt"
    holders.append(Holder(path, "O_WRONLY", 30_000))
    tracker.mark_quiet_for(path, 10.0)
    assert tracker.take_settled() == []
    assert tracker.unsettled_paths() == [path]
    holders[0].release()
    assert wait_for(tracker.take_settled, timeout=5) == [path]


def test_set_with_a_file_held_open_is_not_sealed(workspace: Workspace, s3: Any,
                                                 holders: list[Holder]) -> None:
    # As the operator saw: step_2/b.pt written in part, its writer pausing past quiet_seconds
    # (1.0) with it open; step_2 must not be sealed with half of b.pt.
    daemon = workspace.start_daemon()
    step = workspace.checkpoints / "step_2"
    step.mkdir()
    a = os.urandom(50_000)
    (step / "a.pt").write_bytes(a)
    holders.append(Holder(step / "b.pt", "O_WRONLY", 30_000))
    wait_for(lambda: "run1/step_2/a.pt" in keys_in(s3, workspace.bucket))
    wait_for(lambda: workspace.status().get("unsettled_files") == 1)
    manifest = "run1/.spotwatch/manifests/step_2.json"
    # The writer's pause (the input): past several quiet intervals, after each of which the
    # old rule settled b.pt.
    pause_ends = time.monotonic() + 4 * 1.0
    while time.monotonic() < pause_ends:
        keys = keys_in(s3, workspace.bucket)
        assert manifest not in keys and "run1/step_2/b.pt" not in keys
        assert workspace.status().get("unsettled_files") == 1
        time.sleep(0.1)
    holders[0].release()
    wait_for(lambda: manifest in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_2/b.pt") == b"x" * 30_000 + b"y" * 30_000
    assert daemon.stop() == 0
