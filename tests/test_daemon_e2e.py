"""End to end: `spotwatch run`, `flush` and `status` as subprocesses against moto and IMDS."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator

from .conftest import Workspace, keys_in, object_bytes, wait_for


def save_checkpoint(path: Path, size: int) -> bytes:
    """Write like torch.save/Hugging Face do: a temp file, then an atomic rename."""
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, path)
    return data


@pytest.mark.usefixtures("transfer_client")
def test_interruption_end_to_end(workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    ckpt = workspace.checkpoints
    expected = {"run1/step_0/model.pt": save_checkpoint(ckpt / "step_0" / "model.pt", 300_000)}
    past = time.time() - 60
    os.utime(ckpt / "step_0" / "model.pt", (past, past))  # found by the startup scan
    daemon = workspace.start_daemon()
    for step in (100, 200):
        for name, size in (("model.pt", 2_000_000), ("optimizer.pt", 700_000)):
            key = f"run1/step_{step}/{name}"
            expected[key] = save_checkpoint(ckpt / f"step_{step}" / name, size)
    (ckpt / "scratch.tmp").write_bytes(b"partial")
    (ckpt / "__pycache__").mkdir()
    (ckpt / "__pycache__" / "hook.pyc").write_bytes(b"cache")
    imds.fire_spot_interruption("terminate", in_seconds=120)

    notice = daemon.wait_for_event("notice_detected")
    assert notice["kind"] == "spot-interruption"
    assert notice["detail"] == "terminate"
    assert 100 < notice["seconds_left"] <= 120
    flush = daemon.wait_for_event("flush_done")
    assert flush["reason"] == "spot-interruption"
    assert flush["seconds"] >= 0
    assert flush["deadline_margin_seconds"] > 60

    # Written after the notice (an emergency checkpoint): still uploaded once it settles.
    expected["run1/emergency.pt"] = save_checkpoint(ckpt / "emergency.pt", 123_456)
    wait_for(lambda: set(expected) <= keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0
    for key, data in expected.items():
        assert object_bytes(s3, workspace.bucket, key) == data, key
    keys = keys_in(s3, workspace.bucket)
    manifests = {k for k in keys if k.startswith("run1/.spotwatch/manifests/")}
    assert keys - manifests == set(expected)  # no temp or cache files
    assert manifests == {f"run1/.spotwatch/manifests/{name}.json"
                         for name in ("step_0", "step_100", "step_200", "emergency.pt")}
    assert len(daemon.named("notice_detected")) == 1  # seen on every poll, acted on once
    assert {e["key"] for e in daemon.named("upload_done")} >= set(expected)


def test_sigterm_flushes_everything_in_on_notice_mode(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    data = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1_000_000)
    wait_for(lambda: workspace.status().get("pending_files") == 1)  # settled, held back
    assert keys_in(s3, workspace.bucket) == set()  # on-notice: nothing until a notice
    assert daemon.stop() == 0
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data
    assert daemon.named("daemon_stopped")


def test_on_notice_mode_uploads_after_notice(workspace: Workspace, imds: ImdsEmulator,
                                             s3: Any) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    first = save_checkpoint(workspace.checkpoints / "a.pt", 10_000)
    wait_for(lambda: workspace.status().get("pending_files") == 1)  # settled, held back
    assert keys_in(s3, workspace.bucket) == set()
    imds.set_lifecycle_state("Terminated")
    daemon.wait_for_event("flush_done")
    assert object_bytes(s3, workspace.bucket, "run1/a.pt") == first
    later = save_checkpoint(workspace.checkpoints / "b.pt", 10_000)  # keeps draining
    wait_for(lambda: "run1/b.pt" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/b.pt") == later
    assert daemon.stop() == 0


@pytest.mark.usefixtures("transfer_client")
def test_rewritten_file_ends_as_final_content(workspace: Workspace, s3: Any) -> None:
    daemon = workspace.start_daemon()
    path = workspace.checkpoints / "latest.pt"
    for _ in range(4):
        path.write_bytes(os.urandom(3_000_000))
        time.sleep(0.25)  # the input: the trainer rewrites it after the settle time
    final = path.read_bytes()
    wait_for(lambda: "run1/latest.pt" in keys_in(s3, workspace.bucket)
             and object_bytes(s3, workspace.bucket, "run1/latest.pt") == final)
    assert daemon.stop() == 0
    assert object_bytes(s3, workspace.bucket, "run1/latest.pt") == final


def flush_summary(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "flush_summary")


@pytest.mark.usefixtures("transfer_client")
def test_restart_reuploads_nothing_unchanged(workspace: Workspace, s3: Any) -> None:
    paths = [workspace.checkpoints / f"shard_{i}.pt" for i in range(3)]
    for path in paths:
        save_checkpoint(path, 50_000)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml", timeout=120))["files"] == 3
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0
    same_size = os.urandom(50_000)
    paths[1].write_bytes(same_size)  # same size, new content: mtime tells
    summary = flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert summary["files"] == 1
    assert object_bytes(s3, workspace.bucket, "run1/shard_1.pt") == same_size
    # Replaced while no spotwatch ran by a file of the same size and mtime (saved with the old
    # mtime kept, then renamed over it): its inode tells.
    kept = paths[2].stat()
    replacement = paths[2].with_name("shard_2.pt.new")
    replacement.write_bytes(os.urandom(50_000))
    os.utime(replacement, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.replace(replacement, paths[2])
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    assert object_bytes(s3, workspace.bucket, "run1/shard_2.pt") == paths[2].read_bytes()
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0


def test_flush_asks_a_running_daemon(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    data = save_checkpoint(workspace.checkpoints / "x.pt", 20_000)
    result = workspace.cli("flush", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert object_bytes(s3, workspace.bucket, "run1/x.pt") == data
    assert daemon.named("flush_done")[0]["reason"] == "manual-flush"
    status = json.loads(workspace.cli("status", "-c", "config.yaml", "--json").stdout)
    assert status["daemon_pid"] == daemon.process.pid
    assert status["uploaded_objects"] == 1
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 0
    assert daemon.stop() == 0
    assert workspace.cli("status", "-c", "config.yaml", "--healthy").returncode == 1


def test_status_without_daemon(workspace: Workspace) -> None:
    save_checkpoint(workspace.checkpoints / "x.pt", 1000)
    workspace.cli("flush", "-c", "config.yaml")
    result = workspace.cli("status", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "daemon:       not running" in result.stdout
    assert "1 objects" in result.stdout


def test_second_daemon_on_same_state_is_refused(workspace: Workspace) -> None:
    daemon = workspace.start_daemon()
    result = workspace.cli("run", "-c", "config.yaml", timeout=30)
    assert result.returncode == 1
    assert "another spotwatch" in result.stderr
    assert daemon.stop() == 0


def test_signal_storm_never_wedges_the_daemon(workspace: Workspace, s3: Any) -> None:
    # Signals land between any two bytecodes of the main loop, also while it holds the lock
    # of an Event or a Queue; a handler taking that lock again would hang the daemon for good.
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    data = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and daemon.process.poll() is None:
        os.kill(daemon.process.pid, signal.SIGUSR1)
        time.sleep(0.0005)  # the input: the pace of the storm
    assert daemon.stop(timeout=40) == 0
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data
    assert daemon.named("notice_detected")  # the flush requests were heard


def _delete_and_remake(directory: Path) -> None:
    shutil.rmtree(directory)  # a trainer clearing its checkpoint directory on a fresh start
    directory.mkdir()


def _move_away_and_remake(directory: Path) -> None:
    directory.rename(directory.with_name("checkpoints.old"))
    directory.mkdir()


@pytest.mark.parametrize("replace", [_delete_and_remake, _move_away_and_remake])
def test_a_watched_directory_made_again_is_watched_again(
        workspace: Workspace, s3: Any, replace: Callable[[Path], None]) -> None:
    daemon = workspace.start_daemon()
    ckpt = workspace.checkpoints
    save_checkpoint(ckpt / "step_1" / "model.pt", 1000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    replace(ckpt)
    data = save_checkpoint(ckpt / "step_2" / "model.pt", 2000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_2/model.pt") == data
    assert daemon.named("watch_dir_back")
    later = save_checkpoint(ckpt / "step_3" / "model.pt", 3000)  # its events are seen again
    wait_for(lambda: "run1/.spotwatch/manifests/step_3.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_3/model.pt") == later
    assert daemon.stop() == 0


@pytest.mark.parametrize("configured", ["absolute", "relative"])
def test_a_watched_symlink_pointed_elsewhere_is_followed(workspace: Workspace, s3: Any,
                                                         tmp_path: Path, configured: str) -> None:
    """`checkpoints -> runs/1`, then `runs/2` for the next run: the files of the directory
    the watched path leads to now are the ones protected."""
    runs = tmp_path / "runs"
    (runs / "1").mkdir(parents=True)
    (runs / "2").mkdir()
    current = tmp_path / "current"
    current.symlink_to(runs / "1", target_is_directory=True)
    path = str(current) if configured == "absolute" else current.name  # from the config's
    workspace.write_config(watch=[{"path": path, "prefix": "run1/"}])
    daemon = workspace.start_daemon()
    first = save_checkpoint(current / "step_1" / "model.pt", 1000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == first
    repointed = tmp_path / "current.new"
    repointed.symlink_to(runs / "2", target_is_directory=True)
    repointed.replace(current)  # as `ln -sfn` does, atomically
    second = save_checkpoint(current / "step_2" / "model.pt", 2000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_2/model.pt") == second
    [back] = daemon.named("watch_dir_back")
    assert back["path"] == str(current) and back["directory"] == str(runs / "2")
    save_checkpoint(runs / "1" / "step_3" / "model.pt", 3000)  # no longer watched
    third = save_checkpoint(current / "step_4" / "model.pt", 4000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_4.json" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/step_4/model.pt") == third
    assert daemon.stop() == 0
    uploaded = {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key}
    assert uploaded == {f"run1/step_{n}/model.pt" for n in (1, 2, 4)}


def test_a_watched_path_through_a_symlink_and_dot_dot_is_the_kernels_directory(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """`link/../ckpt` is where the kernel goes (the parent of the link's target), not the
    `ckpt` beside the link that cutting `link/..` off the text would name."""
    (tmp_path / "disk" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "sub", target_is_directory=True)
    save_checkpoint(tmp_path / "disk" / "ckpt" / "step_1" / "model.pt", 100)
    save_checkpoint(tmp_path / "ckpt" / "step_2" / "model.pt", 100)  # beside the link
    workspace.write_config(watch=[{"path": str(tmp_path / "link" / ".." / "ckpt"),
                                   "prefix": "run1/"}])
    result = workspace.cli("flush", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    uploaded = {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key}
    assert uploaded == {"run1/step_1/model.pt"}


def test_files_whose_events_the_kernel_dropped_are_uploaded_all_the_same(
        workspace: Workspace, s3: Any) -> None:
    """A burst of writes while the daemon gets no CPU overflows the kernel's inotify queue:
    the events of the files written then are lost, and the files must be found anyway."""
    queue_size = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    step = workspace.checkpoints / "step_1"
    step.mkdir()  # watched from the start: its events queue up in the kernel
    daemon = workspace.start_daemon()
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        with (step / "a.log").open("w") as first, (step / "b.log").open("w") as second:
            for _ in range(queue_size):  # alternating: the kernel merges no two events
                for handle in (first, second):
                    handle.write("x")
                    handle.flush()
        for n in range(20):
            (step / f"shard_{n}.pt").write_bytes(os.urandom(100))
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    uploaded = {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key}
    assert uploaded == {f"run1/step_1/{path.name}" for path in step.iterdir()}
    assert len(uploaded) == 22
    assert daemon.named("events_lost")
    assert daemon.stop() == 0


def test_writes_through_a_memory_mapping_are_uploaded_all_the_same(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """A checkpoint kept mapped and written through the mapping (a numpy.memmap saved in place
    and flushed at each step) makes no inotify event while the mapping lives: the file as it
    was at its descriptor's close must not stay in S3, sealed, for good. The periodic scan
    finds the change, and restore brings back the bytes the trainer wrote."""
    workspace.write_config(sync={"rescan_interval": 0.5})
    daemon = workspace.start_daemon()
    step = workspace.checkpoints / "step_1"
    step.mkdir()
    path = step / "weights.bin"
    size = 256 * 1024
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    mapping = mmap.mmap(fd, size)
    mapping[:size // 2] = b"\x01" * (size // 2)  # what the trainer wrote by the close
    mapping.flush()
    os.close(fd)  # the last event: IN_CLOSE_WRITE
    wait_for(lambda: object_bytes(s3, workspace.bucket, "run1/step_1/weights.bin")[:1] == b"\x01"
             if "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket)
             else False)
    final = os.urandom(size)
    mapping[:] = final  # through the mapping alone: no event
    mapping.flush()
    try:
        wait_for(lambda: object_bytes(s3, workspace.bucket, "run1/step_1/weights.bin") == final)
    finally:
        mapping.close()  # its unmapping ends the open file: the close event comes only now
    assert daemon.stop() == 0
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(tmp_path / "back"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "back" / "step_1" / "weights.bin").read_bytes() == final


def test_symlinks_are_named_once_and_not_followed(workspace: Workspace, s3: Any,
                                                  tmp_path: Path) -> None:
    """A link out of the tree is skipped, once; one inside it is recorded, not followed: its
    set's manifest says where it leads, again each time it is pointed elsewhere."""
    ckpt = workspace.checkpoints
    elsewhere = tmp_path / "other-disk" / "weights.pt"
    save_checkpoint(elsewhere, 500)
    save_checkpoint(ckpt / "step_1" / "model.pt", 1000)
    (ckpt / "step_1" / "weights.pt").symlink_to(elsewhere)  # there before the start
    daemon = workspace.start_daemon()
    daemon.wait_for_event("symlink_skipped")
    (ckpt / "latest").symlink_to("step_1", target_is_directory=True)  # seen live
    save_checkpoint(ckpt / "step_2" / "model.pt", 2000)
    latest = "run1/.spotwatch/manifests/latest.json"
    wait_for(lambda: latest in keys_in(s3, workspace.bucket)
             and "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    (ckpt / "latest").unlink()  # the link moved on: recorded again
    (ckpt / "latest").symlink_to("step_2", target_is_directory=True)
    save_checkpoint(ckpt / "step_3" / "model.pt", 3000)
    wait_for(lambda: json.loads(object_bytes(s3, workspace.bucket, latest))["links"]
             == [{"path": "latest", "target": "step_2"}])
    wait_for(lambda: "run1/.spotwatch/manifests/step_3.json" in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0
    skipped = [event["path"] for event in daemon.named("symlink_skipped")]
    assert skipped == [str(ckpt / "step_1" / "weights.pt")]
    uploaded = {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key}
    assert uploaded == {f"run1/step_{n}/model.pt" for n in (1, 2, 3)}


def test_fifos_and_sockets_are_named_once_and_never_block_a_set(workspace: Workspace,
                                                                 s3: Any) -> None:
    ckpt = workspace.checkpoints
    save_checkpoint(ckpt / "step_1" / "model.pt", 1000)
    os.mkfifo(ckpt / "step_1" / "progress.fifo")  # there before the start
    daemon = workspace.start_daemon()
    daemon.wait_for_event("special_file_skipped")
    (ckpt / "step_2").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(ckpt / "step_2" / "rpc.sock"))  # seen live
        save_checkpoint(ckpt / "step_2" / "model.pt", 2000)
        wait_for(lambda: "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
        daemon.wait_for_event("special_file_skipped", count=2)
        assert daemon.stop() == 0
    finally:
        listener.close()
    skipped = sorted(event["path"] for event in daemon.named("special_file_skipped"))
    assert skipped == [str(ckpt / "step_1" / "progress.fifo"), str(ckpt / "step_2" / "rpc.sock")]
    uploaded = {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key}
    assert uploaded == {"run1/step_1/model.pt", "run1/step_2/model.pt"}


def test_a_notice_right_after_a_save_already_uploaded_waits_for_nothing(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    """The notice comes just after the last save, whose files went up the moment they were
    closed: the flush's scans find them newer than quiet_seconds, but uploaded as they are,
    and the flush ends without waiting for them to go quiet (before: until its time for
    files being written ran out, reporting them as still written)."""
    workspace.write_config(sync={"quiet_seconds": 600, "rescan_interval": 1},
                           log={"level": "debug"})  # debug: each scan's rescan_done
    # Made before the start, so its watch exists: a file renamed into a folder made a moment
    # before may be found by a scan without its event, and wait out quiet_seconds.
    (workspace.checkpoints / "step_1").mkdir()
    daemon = workspace.start_daemon()
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 50_000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    scans = len(daemon.named("rescan_done"))
    daemon.wait_for_event("rescan_done", count=scans + 1)  # one found the file just saved
    imds.fire_spot_interruption("terminate", in_seconds=120)
    flush = daemon.wait_for_event("flush_done", timeout=60)
    assert (flush["files"], flush["still_written"], flush["timed_out"]) == (0, 0, False)
    assert daemon.stop() == 0


def test_after_a_notice_with_a_deadline_a_closed_file_goes_without_the_settle_pause(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    """settle_seconds guards against a file reopened just after closing; against a notice's
    deadline an emergency checkpoint cannot wait it out."""
    workspace.write_config(sync={"settle_seconds": 600, "quiet_seconds": 600})
    # Made before the start, so its watch exists: a file written in a folder made a moment
    # before may be found without its close (and wait out quiet_seconds instead).
    (workspace.checkpoints / "emergency").mkdir()
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption("terminate", in_seconds=120)
    daemon.wait_for_event("notice_detected")
    data = os.urandom(50_000)
    (workspace.checkpoints / "emergency" / "model.pt").write_bytes(data)  # written in place
    wait_for(lambda: "run1/.spotwatch/manifests/emergency.json" in keys_in(s3, workspace.bucket),
             timeout=30)
    assert object_bytes(s3, workspace.bucket, "run1/emergency/model.pt") == data
    assert daemon.stop() == 0


def test_a_watched_symlink_pointed_at_another_entrys_directory_is_not_watched_there(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """Two entries; the second's symlink is pointed at the first's directory while the daemon
    runs: its files go under the first's prefix only (never twice, as a start would refuse),
    and once the link leads elsewhere again that directory is watched."""
    other = tmp_path / "other"
    other.mkdir()
    link = tmp_path / "link"
    link.symlink_to(other, target_is_directory=True)
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/"},
                                  {"path": str(link), "prefix": "run2/"}],
                           sync={"rescan_interval": 0.5},  # the rescans skip it too
                           log={"level": "debug"})  # debug: each scan's rescan_done
    daemon = workspace.start_daemon()
    repointed = tmp_path / "link.new"
    repointed.symlink_to(workspace.checkpoints, target_is_directory=True)
    repointed.replace(link)
    daemon.wait_for_event("watch_dir_overlaps")
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1000)
    wait_for(lambda: "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket))
    scans = len(daemon.named("rescan_done"))
    daemon.wait_for_event("rescan_done", count=scans + 2)  # a whole rescan since step_1
    repointed.symlink_to(other, target_is_directory=True)
    repointed.replace(link)
    save_checkpoint(other / "step_2" / "model.pt", 1000)
    wait_for(lambda: "run2/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    assert not any(key.startswith("run2/step_1") for key in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0


def test_a_same_size_rewrite_within_the_second_of_an_upload_is_uploaded_on_whole_second_mtimes(
        workspace: Workspace, s3: Any) -> None:
    """A file system that keeps whole seconds of mtime (ext4 with 128-byte inodes, FAT, some
    NFS): a same-size save in place within the second the last one was uploaded keeps size,
    mtime and inode. The mtimes such a system would give are set here by hand: the second
    the saves fall in (one a little ahead, so that the test does not race the clock)."""
    second = (int(time.time()) + 3) * 10**9
    path = workspace.checkpoints / "model.bin"
    daemon = workspace.start_daemon()
    for version in range(3):
        data = bytes([version]) * 200_000
        with path.open("r+b" if path.exists() else "wb") as handle:  # in place: one inode
            handle.write(data)
        os.utime(path, ns=(second, second))
        daemon.wait_for_event("upload_done", count=version + 1)
        assert object_bytes(s3, workspace.bucket, "run1/model.bin") == data
    wait_for(lambda: workspace.status().get("pending_files") == 0)
    # The same bytes saved again: the bytes, not the metadata, say it is the version in S3.
    with path.open("r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(second, second))
    flushed = workspace.cli("flush", "-c", "config.yaml")  # it scans first
    assert flushed.returncode == 0, flushed.stderr
    assert len(daemon.named("upload_done")) == 3
    assert daemon.stop() == 0


def test_a_flush_finds_a_write_inotify_never_reported(workspace: Workspace, s3: Any,
                                                      tmp_path: Path) -> None:
    """A shard hard-linked into the step from outside the watched directory, rewritten
    through its outside name: the kernel reports that write under the outside name only.
    `spotwatch flush` right after (well within the periodic scan's interval) scans first, so
    what it says is durable is what is on disk."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = outside / "emb.bin"
    shard.write_bytes(b"1" * 100_000)
    (workspace.checkpoints / "step_1").mkdir()
    os.link(shard, workspace.checkpoints / "step_1" / "emb.bin")
    daemon = workspace.start_daemon()
    daemon.wait_for_event("set_complete")
    with shard.open("r+b") as handle:  # in place, through the name outside
        handle.write(b"2" * 100_000)
    flushed = workspace.cli("flush", "-c", "config.yaml", timeout=60)
    assert flushed.returncode == 0, flushed.stderr
    assert object_bytes(s3, workspace.bucket, "run1/step_1/emb.bin") == b"2" * 100_000
    assert daemon.stop() == 0
