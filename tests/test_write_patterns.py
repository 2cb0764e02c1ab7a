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

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.emulator import ImdsEmulator
from spotwatch.keys import manifest_key
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_manifests

from .conftest import Workspace, keys_in, object_bytes, wait_for
from .memory_store import InMemoryObjectStore


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


def test_a_log_that_never_settles_holds_a_far_notices_flush_only_stop_timeout(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """A maintenance event an hour ahead starts a flush with an hour's deadline; a log written
    all the time must not keep it (and a `spotwatch flush` joining it) waiting for that hour:
    it is given up after sync.stop_timeout, as without the notice."""
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 60,
                                 "stop_timeout": 3})
    daemon = workspace.start_daemon()
    with appending_logger(workspace.checkpoints / "train.log"):
        imds.schedule_event(in_seconds=3600)
        daemon.wait_for_event("flush_started")
        result = workspace.cli("flush", "-c", str(workspace.config_file), timeout=60)
        assert result.returncode == 1, result.stderr
        assert "train.log" in result.stderr and "still being written" in result.stderr
    done = daemon.named("flush_done")[0]
    assert done["reason"] == "scheduled-event"
    assert done["still_written_files"] == [str(workspace.checkpoints / "train.log")]


def test_a_stop_during_a_notices_flush_never_calls_a_file_being_written_durable(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    """SIGTERM while the notice's flush waits for a checkpoint still being written: the stop
    waits for it its whole sync.stop_timeout (the notice's time is approximate), and as it is
    still not in S3 then, exits 1 with flush_incomplete, never 0."""
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 60,
                                 "stop_timeout": 4})
    daemon = workspace.start_daemon()
    (workspace.checkpoints / "step_1").mkdir()
    with (workspace.checkpoints / "step_1" / "model.pt").open("wb") as checkpoint:
        checkpoint.write(b"weights")
        checkpoint.flush()
        imds.fire_spot_interruption(in_seconds=1)
        daemon.wait_for_event("flush_started")
        assert daemon.stop() == 1
    [incomplete] = daemon.named("flush_incomplete")
    assert incomplete["unsettled"] == 1 and incomplete["timed_out"] is True
    assert not daemon.named("daemon_stopped")
    assert "run1/step_1/model.pt" not in keys_in(s3, workspace.bucket)


def test_a_replacement_keeping_size_and_mtime_is_uploaded_again(workspace: Workspace,
                                                                s3: Any) -> None:
    daemon = workspace.start_daemon()
    path = workspace.checkpoints / "step_1" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(b"a" * 1000)
    daemon.wait_for_event("upload_done")
    before = os.stat(path)
    staged = path.with_name("staged.tmp")  # excluded: never uploaded itself
    staged.write_bytes(b"b" * 1000)  # the same size
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    os.replace(staged, path)
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


def test_linking_or_chmod_uploads_no_name_again(workspace: Workspace, s3: Any) -> None:
    """A trainer hard-linking an unchanged shard into each new step (or changing a file's
    mode) changes the inode's ctime, not its bytes: no name is uploaded again, or linking
    into N steps would cost N squared uploads."""
    daemon = workspace.start_daemon()
    first = workspace.checkpoints / "step_1" / "frozen.bin"
    first.parent.mkdir()
    first.write_bytes(b"frozen" * 100)
    daemon.wait_for_event("set_complete")
    for step in (2, 3, 4):
        linked = workspace.checkpoints / f"step_{step}" / "frozen.bin"
        linked.parent.mkdir()
        os.link(first, linked)
        daemon.wait_for_event("set_complete", count=step)
    first.chmod(0o600)
    marker = workspace.checkpoints / "step_5" / "model.pt"  # settles after the chmod event
    marker.parent.mkdir()
    marker.write_bytes(b"five")
    daemon.wait_for_event("set_complete", count=5)
    uploads = [event["key"] for event in daemon.named("upload_done")]
    assert sorted(uploads) == sorted([f"run1/step_{n}/frozen.bin" for n in (1, 2, 3, 4)]
                                     + ["run1/step_5/model.pt"])


YEAR_2100_NS = 4_102_444_800 * 10**9


def test_a_file_dated_in_the_future_does_not_make_its_set_the_newest(workspace: Workspace,
                                                                     s3: Any) -> None:
    """A set is no newer than its seal: a file with a 2100 mtime (a clock set wrong, a copy
    keeping its mtime) must not outrank, for restore or for retention, the checkpoints
    sealed after it."""
    future = workspace.checkpoints / "step_0" / "copied.pt"
    future.parent.mkdir()
    future.write_bytes(b"copied")
    os.utime(future, ns=(YEAR_2100_NS, YEAR_2100_NS))
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0
    step = workspace.checkpoints / "step_1"
    step.mkdir()
    (step / "model.pt").write_bytes(b"weights")  # written after the first set was sealed
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0

    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", str(workspace.config_file), "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert os.listdir(target) == ["step_1"]
    assert (target / "step_1" / "model.pt").read_bytes() == b"weights"

    result = workspace.cli("prune", "-c", str(workspace.config_file), "--keep-sets", "1")
    assert result.returncode == 0, result.stderr
    keys = keys_in(s3, workspace.bucket)
    assert {"run1/step_1/model.pt", "run1/.spotwatch/manifests/step_1.json"} <= keys, keys
    assert "run1/.spotwatch/manifests/step_0.json" not in keys, keys


INT64 = st.integers(-(2**63), 2**63 - 1)


def _sealed(name: str, mtimes: list[int], sealed_at: float) -> Manifest:
    return Manifest(name, "run1/", tuple(ManifestEntry(f"run1/{name}/f{index}", f"{name}/f{index}",
                                                       1, mtime, None)
                                         for index, mtime in enumerate(mtimes)), sealed_at)


@given(earlier_mtimes=st.lists(INT64, min_size=1, max_size=3),
       earlier_seal=st.floats(0.0, 5e9), seal_gap=st.floats(1.0, 1e6),
       written=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
       other_seal=st.floats(allow_nan=False, allow_infinity=False))
def test_a_set_written_after_another_was_sealed_is_newer_whatever_its_mtimes(
        earlier_mtimes: list[int], earlier_seal: float, seal_gap: float,
        written: list[float], other_seal: float) -> None:
    """However the first set's files are dated, a set whose files were all written after it
    was sealed comes before it (for restore and retention), and no seal time, however wild
    a third set's, breaks the sort."""
    later_mtimes = [int((earlier_seal + 0.5 + share * (seal_gap - 0.5)) * 1e9)
                    for share in written]  # between the first seal and its own
    store = InMemoryObjectStore()
    for manifest in (_sealed("a", earlier_mtimes, earlier_seal),
                     _sealed("b", later_mtimes, earlier_seal + seal_gap),
                     _sealed("c", earlier_mtimes, other_seal)):
        store.put(manifest_key("run1/", manifest.set_name), manifest.to_json().encode())
    order = [m.set_name for m in list_manifests(store, "run1/")]
    assert order.index("b") < order.index("a"), order
