"""Writes under excluded names (model.pt.tmp, a step_N.tmp/ staging directory) are never
uploaded but count as the trainer still saving: they hold their set's seal and every flush."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers import Observer

from spotwatch.config import WatchDir
from spotwatch.keys import manifest_key
from spotwatch.sync.staged_writes import StagedWrites
from spotwatch.sync.tracker import ChangeTracker

from .conftest import Daemon, Workspace, holds_throughout, keys_in, object_bytes, wait_for
from .memory_store import FakeClock

SETTLE = 0.2
QUIET = 1.0


@contextmanager
def watched(root: Path, exclude: tuple[str, ...] | None = None) -> Iterator[ChangeTracker]:
    watch = WatchDir(root) if exclude is None else WatchDir(root, exclude=exclude)
    tracker = ChangeTracker(watch, settle_seconds=SETTLE, quiet_seconds=QUIET)
    observer = Observer()
    tracker.watch_with(observer)
    observer.start()
    try:
        yield tracker
    finally:
        observer.stop()
        observer.join()


@contextmanager
def steady_writer(path: Path, every: float = 0.05) -> Iterator[threading.Event]:
    """A trainer writing one file steadily, keeping it open, until the event is set; the file
    is closed when the block ends."""
    done = threading.Event()

    def write() -> None:
        with path.open("wb") as handle:
            handle.write(os.urandom(4096))  # at least one write before anyone looks
            handle.flush()
            started.set()
            while not done.wait(every):
                handle.write(os.urandom(4096))
                handle.flush()

    started = threading.Event()
    thread = threading.Thread(target=write)
    thread.start()
    started.wait(10)
    try:
        yield done
    finally:
        done.set()
        thread.join()


# -- the rule, on a fake clock ---------------------------------------------------------------

def test_a_staged_write_ends_by_the_settle_rule_and_is_not_hurried_by_its_close() -> None:
    clock = FakeClock()
    writes = StagedWrites(SETTLE, QUIET, clock)
    open_file, closed_file = Path("/r/step_2/optim.pt.tmp"), Path("/r/step_3.tmp/a.pt")
    writes.note(open_file, "step_2/optim.pt.tmp", closed=False)
    writes.note(closed_file, "step_3.tmp/a.pt", closed=True)
    assert writes.active() == {open_file: "step_2/optim.pt.tmp",
                               closed_file: "step_3.tmp/a.pt"}
    clock.advance(SETTLE)
    assert writes.active() == {open_file: "step_2/optim.pt.tmp"}  # closed: settled
    clock.advance(QUIET)
    assert writes.active() == {}  # never closed: quiet for quiet_seconds


def test_a_staged_write_held_open_past_the_quiet_interval_still_counts() -> None:
    """A trainer pausing mid-save with its staged file open: the quiet rule does not end the
    write while a process holds the file for writing; it is looked at again once per quiet
    interval, and ends once nobody holds it."""
    clock = FakeClock()
    holding = {Path("/r/step_2/optim.pt.tmp")}
    asked: list[set[Path]] = []

    def held_open(paths: Iterable[Path]) -> set[Path]:
        asked.append(set(paths))
        return holding & asked[-1]

    writes = StagedWrites(SETTLE, QUIET, clock, held_open)
    held, let_go = Path("/r/step_2/optim.pt.tmp"), Path("/r/step_3/model.pt.tmp")
    writes.note(held, "step_2/optim.pt.tmp", closed=False)
    writes.note(let_go, "step_3/model.pt.tmp", closed=False)
    assert len(writes.active()) == 2 and asked == []  # not quiet yet: nothing looked up
    clock.advance(QUIET)
    assert writes.active() == {held: "step_2/optim.pt.tmp"}
    assert asked == [{held, let_go}]
    clock.advance(QUIET / 2)
    assert writes.active() == {held: "step_2/optim.pt.tmp"} and len(asked) == 1
    holding.clear()  # the trainer closed it without a close event seen (or died)
    clock.advance(QUIET / 2)
    assert writes.active() == {}
    assert asked[-1] == {held}


def test_a_rename_or_deletion_of_a_directory_ends_the_writes_below_it() -> None:
    writes = StagedWrites(SETTLE, QUIET, FakeClock())
    for name in ("a.pt", "sub/b.pt"):
        writes.note(Path("/r/step_2.tmp") / name, f"step_2.tmp/{name}", closed=False)
    writes.note(Path("/r/step_1/x.tmp"), "step_1/x.tmp", closed=False)
    writes.end(Path("/r/step_2.tmp"))
    assert writes.active() == {Path("/r/step_1/x.tmp"): "step_1/x.tmp"}


# -- the tracker, on real files and watchdog events -----------------------------------------

def test_an_excluded_file_being_written_counts_until_it_is_renamed_into_place(
        tmp_path: Path) -> None:
    with watched(tmp_path) as tracker:
        temporary = tmp_path / "step_2" / "optim.pt.tmp"
        temporary.parent.mkdir()
        with steady_writer(temporary):
            assert wait_for(tracker.staged_writes) == {temporary: "step_2/optim.pt.tmp"}
            assert tracker.take_settled() == []  # never uploaded under its temporary name
        os.rename(temporary, tmp_path / "step_2" / "optim.pt")
        # The rename ends it, and what it published is ready at once.
        assert wait_for(tracker.take_settled, timeout=5) == [tmp_path / "step_2" / "optim.pt"]
        assert tracker.staged_writes() == {}


@pytest.mark.parametrize("relative", ["step_2.tmp/a.pt", "step_2/shards.tmp/deep/a.pt",
                                      "tmp-checkpoint-7/model.safetensors"])
def test_staging_directories_at_any_depth_count_while_written(tmp_path: Path,
                                                              relative: str) -> None:
    with watched(tmp_path) as tracker:
        path = tmp_path / relative
        path.parent.mkdir(parents=True)
        with steady_writer(path):
            assert wait_for(tracker.staged_writes) == {path: relative}


def test_a_configured_exclude_counts_only_for_staging_names(tmp_path: Path) -> None:
    """An excluded log appended all the time would hold every flush to its time limit and
    its set unsealed: only names a save stages under count, configured excludes or not."""
    with watched(tmp_path, exclude=("*.log", "*.tmp")) as tracker:
        staged = tmp_path / "step_2" / "model.pt.tmp"
        log = tmp_path / "step_2" / "train.log"
        staged.parent.mkdir()
        with steady_writer(log), steady_writer(staged):
            assert wait_for(tracker.staged_writes) == {staged: "step_2/model.pt.tmp"}
            assert log not in tracker.staged_writes()


def test_a_staging_name_counts_though_the_configured_excludes_leave_it_out(
        tmp_path: Path) -> None:
    """Excludes configured without the staging names: a staging directory still counts as a
    save under way (and is never uploaded, see ChangeTracker.relative)."""
    with watched(tmp_path, exclude=("*.log",)) as tracker:
        staged = tmp_path / "step_3.tmp" / "model.pt"
        staged.parent.mkdir()
        with steady_writer(staged):
            assert wait_for(tracker.staged_writes) == {staged: "step_3.tmp/model.pt"}
        assert tracker.relative(staged) is None


def test_a_staged_file_held_open_by_a_pausing_writer_counts_until_closed(
        tmp_path: Path) -> None:
    with watched(tmp_path) as tracker:
        path = tmp_path / "step_2" / "optim.pt.tmp"
        path.parent.mkdir()
        with path.open("wb") as handle:
            handle.write(b"half")
            handle.flush()
            wait_for(tracker.staged_writes)
            # Well past quiet_seconds with no write: still being written while it is open.
            assert holds_throughout(lambda: path in tracker.staged_writes(), 3 * QUIET)
        wait_for(lambda: path not in tracker.staged_writes(), timeout=5)


def test_a_closed_or_deleted_excluded_file_stops_counting(tmp_path: Path) -> None:
    with watched(tmp_path) as tracker:
        closed = tmp_path / "scratch.tmp"
        closed.write_bytes(b"t")
        wait_for(tracker.staged_writes)
        wait_for(lambda: not tracker.staged_writes(), timeout=5)  # settle_seconds after close
        deleted = tmp_path / "gone.tmp"
        with steady_writer(deleted) as done:
            wait_for(tracker.staged_writes)
            done.set()
        deleted.unlink()
        wait_for(lambda: not tracker.staged_writes(), timeout=5)


def test_excluded_files_that_merely_lie_there_count_for_nothing(tmp_path: Path) -> None:
    (tmp_path / "step_2.tmp").mkdir()
    (tmp_path / "step_2.tmp" / "old.pt").write_bytes(b"o")  # before the watch
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere.tmp"
    outside.mkdir()
    (outside / "moved.pt").write_bytes(b"m")
    with watched(tmp_path) as tracker:
        os.rename(outside, tmp_path / "step_3.tmp")  # moved in whole: no write here
        (tmp_path / "kept.pt").write_bytes(b"k")
        wait_for(tracker.take_settled, timeout=5)  # the events before it were seen too
        assert tracker.staged_writes() == {}


# -- end to end: the daemon as a subprocess --------------------------------------------------

def _daemon(workspace: Workspace, stop_timeout: float) -> Daemon:
    workspace.write_config(sync={"settle_seconds": SETTLE, "quiet_seconds": QUIET,
                                 "stop_timeout": stop_timeout})
    return workspace.start_daemon()


def _manifest_files(s3: Any, workspace: Workspace, set_name: str) -> set[str]:
    body = json.loads(object_bytes(s3, workspace.bucket, manifest_key("run1/", set_name)))
    return {entry["path"] for entry in body["files"]}


def _restored(workspace: Workspace) -> set[str]:
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", str(workspace.config_file), "--to", str(target))
    assert result.returncode == 0, result.stderr
    return {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()}


def test_a_set_is_not_sealed_while_a_file_of_it_is_written_under_a_temporary_name(
        workspace: Workspace, s3: Any) -> None:
    """torch.save to model.pt.tmp, rename, then optim.pt.tmp: the stop comes while optim.pt.tmp
    is still written. step_2 never gets a manifest with model.pt alone: restore gives step_1."""
    daemon = _daemon(workspace, stop_timeout=4)
    step_1 = workspace.checkpoints / "step_1"
    step_1.mkdir()
    for name in ("model.pt", "optim.pt"):
        (step_1 / name).write_bytes(os.urandom(10_000))
    wait_for(lambda: manifest_key("run1/", "step_1") in keys_in(s3, workspace.bucket))
    step_2 = workspace.checkpoints / "step_2"
    step_2.mkdir()
    (step_2 / "model.pt.tmp").write_bytes(os.urandom(10_000))
    os.rename(step_2 / "model.pt.tmp", step_2 / "model.pt")
    with steady_writer(step_2 / "optim.pt.tmp"):
        wait_for(lambda: "run1/step_2/model.pt" in keys_in(s3, workspace.bucket))
        # The sealer has looked at step_2 once status reports it (or, before, sealed it).
        wait_for(lambda: "run1/step_2" in workspace.status().get("unsealed_sets", [])
                 or manifest_key("run1/", "step_2") in keys_in(s3, workspace.bucket))
        wait_for(lambda: workspace.status().get("unsettled_files", 0) >= 1)  # status says so
        assert daemon.stop() == 1  # the final flush gave up on the file still written
    incomplete = daemon.named("flush_incomplete")[-1]
    assert incomplete["unsettled"] >= 1 and "run1/step_2" in incomplete["unsealed_sets"]
    assert manifest_key("run1/", "step_2") not in keys_in(s3, workspace.bucket)
    assert _restored(workspace) == {"step_1/model.pt", "step_1/optim.pt"}


@pytest.mark.parametrize("filters", [
    {"exclude": ["*.log"]},
    {"exclude": ["*"], "include": ["step_*/*.pt"]},
    {"exclude": ["*"], "include": ["step_[!x]*/*"]},
])
def test_a_staging_directory_is_never_uploaded_whatever_the_filters(
        workspace: Workspace, s3: Any, filters: dict[str, list[str]]) -> None:
    """Configured excludes replace the defaults, and an include may take a staging name back
    in: step_3.tmp/ half saved was sealed and restored as the newest checkpoint (model.pt
    alone, under the staging name). Staging names are never uploaded, whatever the filters,
    and hold their set as with the defaults: restore gives step_2."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   **filters}],
                           sync={"settle_seconds": SETTLE, "quiet_seconds": QUIET})
    for step in ("step_1", "step_2"):
        staging = workspace.checkpoints / f"{step}.tmp"
        staging.mkdir()
        for name in ("model.pt", "optim.pt"):
            (staging / name).write_bytes(os.urandom(10_000))
        staging.rename(workspace.checkpoints / step)
    (workspace.checkpoints / "step_3.tmp").mkdir()
    (workspace.checkpoints / "step_3.tmp" / "model.pt").write_bytes(os.urandom(10_000))
    result = workspace.cli("flush", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    keys = keys_in(s3, workspace.bucket)
    assert manifest_key("run1/", "step_2") in keys
    assert not [key for key in keys if "step_3" in key], keys
    assert _restored(workspace) == {"step_2/model.pt", "step_2/optim.pt"}


def test_a_set_is_not_sealed_while_the_trainer_pauses_with_a_temporary_file_open(
        workspace: Workspace, s3: Any) -> None:
    """model.pt renamed into place, then optim.pt.tmp opened, half written, and left open past
    quiet_seconds: step_2 is not sealed with model.pt alone, and a stop then gives up on it."""
    daemon = _daemon(workspace, stop_timeout=4)
    step_2 = workspace.checkpoints / "step_2"
    step_2.mkdir()
    (step_2 / "model.pt.tmp").write_bytes(os.urandom(10_000))
    os.rename(step_2 / "model.pt.tmp", step_2 / "model.pt")
    with (step_2 / "optim.pt.tmp").open("wb") as handle:
        handle.write(os.urandom(10_000))
        handle.flush()
        wait_for(lambda: "run1/step_2/model.pt" in keys_in(s3, workspace.bucket))
        sealed = manifest_key("run1/", "step_2")
        assert holds_throughout(lambda: sealed not in keys_in(s3, workspace.bucket),
                                4 * QUIET)
        assert "run1/step_2" in workspace.status().get("unsealed_sets", [])
        assert daemon.stop() == 1  # the final flush gave up on the file still open
    assert sealed not in keys_in(s3, workspace.bucket)


def test_the_final_flush_waits_for_a_staging_directory_renamed_into_place(
        workspace: Workspace, s3: Any) -> None:
    """SIGTERM while the trainer writes step_2.tmp/: the final flush waits for the writes,
    takes step_2/ once it is renamed into place, seals it, and exits 0."""
    daemon = _daemon(workspace, stop_timeout=30)
    staging = workspace.checkpoints / "step_2.tmp"
    staging.mkdir()
    (staging / "a.pt").write_bytes(os.urandom(50_000))
    with steady_writer(staging / "b.pt", every=0.1) as done:
        # Events come in order: once step_1 is sealed, the writes before it were seen.
        (workspace.checkpoints / "step_1").mkdir()
        (workspace.checkpoints / "step_1" / "m.pt").write_bytes(b"m")
        wait_for(lambda: manifest_key("run1/", "step_1") in keys_in(s3, workspace.bucket))
        daemon.process.terminate()
        daemon.wait_for_event("shutdown_started")
        # The trainer goes on for a while into the final flush, then finishes.
        for _ in range(10):
            assert daemon.process.poll() is None, daemon.log_path.read_text()
            done.wait(0.1)
    os.rename(staging, workspace.checkpoints / "step_2")
    assert daemon.process.wait(timeout=60) == 0, daemon.log_path.read_text()
    assert _manifest_files(s3, workspace, "step_2") == {"step_2/a.pt", "step_2/b.pt"}
    assert _restored(workspace) == {"step_2/a.pt", "step_2/b.pt"}  # the newest step
