"""The tracker on real watchdog events: only complete files settle."""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.observers import Observer

from spotwatch.config import WatchDir
from spotwatch.keys import restore_temporary_name
from spotwatch.sync.tracker import ChangeTracker, walk_files

from .conftest import wait_for

SETTLE = 0.2


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[ChangeTracker]:
    watched = tmp_path / "ckpt"
    watched.mkdir()
    tracker = ChangeTracker(WatchDir(watched), settle_seconds=SETTLE, quiet_seconds=1.5)
    observer = Observer()
    tracker.watch_with(observer)
    observer.start()
    yield tracker
    observer.stop()
    observer.join()


def settled_within(tracker: ChangeTracker, seconds: float) -> set[Path]:
    found: set[Path] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found.update(tracker.take_settled())
        time.sleep(0.02)
    return found


def test_closed_file_settles(tracker: ChangeTracker) -> None:
    path = tracker.root / "model.pt"
    path.write_bytes(b"weights")
    assert wait_for(tracker.take_settled, timeout=5) == [path]


def test_file_open_for_writing_does_not_settle(tracker: ChangeTracker) -> None:
    path = tracker.root / "big.pt"
    with path.open("wb") as handle:
        for _ in range(4):
            handle.write(os.urandom(1024))
            handle.flush()
            time.sleep(SETTLE)  # the input: a writer pausing longer than settle, less than quiet
            assert tracker.take_settled() == []
    assert settled_within(tracker, 1.0) == {path}


def test_file_held_open_past_quiet_interval_does_not_settle(tracker: ChangeTracker) -> None:
    # A writer pausing mid-save longer than quiet_seconds (1.5), the file still open: it is
    # still being written; its close settles it.
    path = tracker.root / "held-open.bin"
    handle = path.open("wb")
    try:
        handle.write(b"x")
        handle.flush()
        assert settled_within(tracker, 3.5) == set()
        assert path in tracker.unsettled_paths()
    finally:
        handle.close()
    assert wait_for(tracker.take_settled, timeout=5) == [path]


def test_temp_then_rename(tracker: ChangeTracker) -> None:
    # In the watched root, so the rename is seen as a move: settles well before the quiet interval.
    final = tracker.root / "model.pt"
    temp = final.with_name("model.pt.tmp")
    temp.write_bytes(os.urandom(4096))
    os.rename(temp, final)
    assert settled_within(tracker, 1.0) == {final}


def test_renamed_files_are_ready_at_once_closed_ones_settle(tmp_path: Path) -> None:
    watched = tmp_path / "ckpt"
    watched.mkdir()
    slow = ChangeTracker(WatchDir(watched), settle_seconds=3.0, quiet_seconds=30)
    observer = Observer()
    slow.watch_with(observer)
    observer.start()
    try:
        (watched / "model.pt.tmp").write_bytes(b"m")
        os.rename(watched / "model.pt.tmp", watched / "model.pt")
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "a.pt").write_bytes(b"a")
        os.rename(staging, watched / "step_2")
        (watched / "log.txt").write_bytes(b"written in place")
        assert settled_within(slow, 1.0) == {watched / "model.pt", watched / "step_2" / "a.pt"}
        assert settled_within(slow, 3.0) == {watched / "log.txt"}
    finally:
        observer.stop()
        observer.join()


def test_file_in_a_new_directory_settles(tracker: ChangeTracker) -> None:
    # The file may land before watchdog watches the new directory; it then shows up as a plain
    # creation of unknown state, which settles after the quiet interval at the latest.
    final = tracker.root / "step_10" / "model.pt"
    final.parent.mkdir()
    temp = final.with_name("model.pt.tmp")
    temp.write_bytes(os.urandom(4096))
    os.rename(temp, final)
    assert settled_within(tracker, 2.5) == {final}


def test_directory_renamed_into_place(tracker: ChangeTracker, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a.pt").write_bytes(b"a")
    (staging / "b.pt").write_bytes(b"b")
    os.rename(staging, tracker.root / "step_20")
    assert settled_within(tracker, 1.0) == {tracker.root / "step_20" / "a.pt",
                                            tracker.root / "step_20" / "b.pt"}


def test_a_link_to_a_directory_in_a_directory_renamed_into_place_is_not_followed(
        tracker: ChangeTracker) -> None:
    """Its own path settles (the engine records it as a link); the files it leads to are
    another set's, and settle under their own names only."""
    older = tracker.root / "step_100" / "tokenizer"
    older.mkdir(parents=True)
    (older / "vocab.json").write_bytes(b"v")
    wait_for(lambda: tracker.root / "step_100" / "tokenizer" / "vocab.json"
             in tracker.take_settled(), timeout=5)
    staging = tracker.root / "step_200.tmp"
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"m")
    (staging / "tokenizer").symlink_to("../step_100/tokenizer")
    os.rename(staging, tracker.root / "step_200")
    settled = settled_within(tracker, 1.5)
    assert tracker.root / "step_200" / "model.pt" in settled
    assert not any(path.is_relative_to(tracker.root / "step_200" / "tokenizer")
                   and path != tracker.root / "step_200" / "tokenizer" for path in settled), settled


def test_staging_directory_inside_the_tree_settles_only_under_its_final_name(
        tracker: ChangeTracker) -> None:
    staging = tracker.root / "step_30.tmp"
    staging.mkdir()
    (staging / "a.pt").write_bytes(b"a")
    assert settled_within(tracker, 2.0) == set()  # never uploaded under the temporary key
    os.rename(staging, tracker.root / "step_30")
    assert settled_within(tracker, 1.0) == {tracker.root / "step_30" / "a.pt"}


def test_excluded_files_never_settle(tracker: ChangeTracker) -> None:
    (tracker.root / "scratch.tmp").write_bytes(b"t")
    (tracker.root / "__pycache__").mkdir()
    (tracker.root / "__pycache__" / "m.pyc").write_bytes(b"c")
    (tracker.root / "kept.pt").write_bytes(b"k")
    assert settled_within(tracker, 1.0) == {tracker.root / "kept.pt"}


def test_deleted_file_is_forgotten(tracker: ChangeTracker) -> None:
    path = tracker.root / "gone.pt"
    with path.open("wb") as handle:
        handle.write(b"x")
        handle.flush()
        path.unlink()
    assert settled_within(tracker, 0.6) == set()
    assert path in wait_for(tracker.take_removed, timeout=2)


def test_walk_does_not_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "real.pt").write_text("r")
    (tmp_path / "tree" / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "tree" / "filelink").symlink_to(tmp_path / "outside" / "secret")
    assert [p for p, _ in walk_files(tmp_path / "tree")] == [tmp_path / "tree" / "real.pt"]


def test_files_saved_right_after_mkdir_are_not_lost(tmp_path: Path) -> None:
    """A new step_N/ directory filled at once races the watch on it: files written before the
    watch existed are still found, and settle at the latest after the quiet interval."""
    for trial in range(8):
        watched = tmp_path / f"ckpt{trial}"
        watched.mkdir()
        tracker = ChangeTracker(WatchDir(watched), settle_seconds=SETTLE, quiet_seconds=1.0)
        observer = Observer()
        tracker.watch_with(observer)
        observer.start()
        try:
            step = watched / "step_1"
            step.mkdir()
            for name in ("a.pt", "b.pt"):
                (step / f"{name}.tmp").write_bytes(os.urandom(100_000))
                os.replace(step / f"{name}.tmp", step / name)
            assert settled_within(tracker, 2.0) == {step / "a.pt", step / "b.pt"}
        finally:
            observer.stop()
            observer.join()


def test_relative_names_only_paths_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    tracker = ChangeTracker(WatchDir(root, "run/"), 0.1, 1.0)
    assert tracker.relative(root / "step_1" / "model.pt") == "step_1/model.pt"
    assert tracker.relative(root) is None
    assert tracker.relative(tmp_path / "ckpt2" / "model.pt") is None  # a sibling sharing a prefix
    assert tracker.relative(tmp_path / "model.pt") is None
    assert tracker.relative(root / "model.pt.tmp") is None  # filtered out
    whole_disk = ChangeTracker(WatchDir(Path("/"), "run/"), 0.1, 1.0)
    assert whole_disk.relative(Path("/data/model.pt")) == "data/model.pt"
    assert whole_disk.relative(Path("/")) is None


def test_a_restores_temporary_never_settles_the_file_it_becomes_does(
        tracker: ChangeTracker) -> None:
    final = tracker.root / "step_1" / "model.pt"
    final.parent.mkdir()
    temp = final.with_name(restore_temporary_name("model.pt"))
    temp.write_bytes(os.urandom(4096))  # closed: a file like any other would settle now
    assert settled_within(tracker, 3 * SETTLE) == set()
    os.rename(temp, final)
    assert settled_within(tracker, 1.0) == {final}



def settled_while_watching(tracker: ChangeTracker, seconds: float) -> set[Path]:
    """settled_within, with the tracker looking after its watch as the engine's loop does."""
    found: set[Path] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tracker.keep_watching()
        found.update(tracker.take_settled())
        time.sleep(0.02)
    return found


def test_a_root_deleted_and_made_again_is_watched_again(tracker: ChangeTracker) -> None:
    root = tracker.root
    shutil.rmtree(root)
    assert settled_while_watching(tracker, 0.3) == set()  # nothing to watch meanwhile
    root.mkdir()
    early = root / "step_2" / "model.pt"  # may be written before the new watch exists
    early.parent.mkdir()
    early.write_bytes(b"early")
    assert settled_while_watching(tracker, 2.5) == {early}
    late = root / "step_3.pt"
    late.write_bytes(b"late")  # seen through the new watch: settles once closed
    assert settled_while_watching(tracker, 1.0) == {late}


def test_a_rescan_leaves_a_just_closed_file_to_its_settle_interval(tmp_path: Path) -> None:
    """A rescan (periodic, or after lost events) finds a file just closed, its mtime fresh:
    what the close event said stands, and it settles after settle_seconds, not after the
    quiet interval of a file never seen closed (during a notice, that wait is time lost)."""
    watched = tmp_path / "ckpt"
    watched.mkdir()
    tracker = ChangeTracker(WatchDir(watched), settle_seconds=SETTLE, quiet_seconds=60)
    path = watched / "model.pt"
    path.write_bytes(b"m")
    tracker.mark(path, closed=True)  # as its close-write event does
    tracker.mark_quiet_for(path, 0.0)  # as a rescan does for a file with a fresh mtime
    assert wait_for(tracker.take_settled, timeout=10) == [path]


def test_a_watch_that_cannot_be_made_is_said_once_and_tried_again(
        tracker: ChangeTracker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root made again while the kernel refuses more watches (fs.inotify.max_user_watches):
    an error names it once, and it is watched once a watch can be made."""
    observer = tracker._observer
    assert observer is not None
    real_schedule = observer.schedule

    def refused(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    root = tracker.root
    shutil.rmtree(root)
    tracker.keep_watching()
    root.mkdir()
    monkeypatch.setattr(observer, "schedule", refused)
    with capture_logs() as logs:
        assert not tracker.keep_watching()
        assert not tracker.keep_watching()
    assert [(e["event"], e["error"]) for e in logs] == [("watch_failed", os.strerror(errno.ENOSPC))]
    monkeypatch.setattr(observer, "schedule", real_schedule)
    assert tracker.keep_watching()
