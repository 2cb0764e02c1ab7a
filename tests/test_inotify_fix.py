"""watchdog's inotify bookkeeping survives a watch forgotten twice (sync.inotify_fix)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from spotwatch.sync import inotify_fix

from .conftest import wait_for

inotify = pytest.importorskip("watchdog.observers.inotify")


def bare_group(by_watch: dict[int, bytes], by_path: dict[bytes, int]) -> object:
    """An InotifyWatchGroup holding only the two maps the removal keeps."""
    group = object.__new__(inotify.InotifyWatchGroup)
    group._active_callbacks_by_watch = by_watch
    group._active_callbacks_by_path = by_path
    return group


def test_a_watch_whose_path_a_newer_watch_took_and_lost_is_forgotten_without_an_error() -> None:
    """`rm -rf step; mv step.tmp step`: the new directory's watch took the path and ended
    first, then the old watch's end came. Unpatched, that raised KeyError on the thread that
    reads inotify for every watch, and no event came again."""
    inotify_fix.install()
    inotify_fix.install()  # once is enough; a second call changes nothing
    group = bare_group({1: b"/ckpt/step"}, {})
    group._remove_watch_internally(1)  # type: ignore[attr-defined]
    assert group._active_callbacks_by_watch == {}  # type: ignore[attr-defined]
    # The path still belongs to a newer watch: kept for it.
    group = bare_group({1: b"/ckpt/step", 2: b"/ckpt/step"}, {b"/ckpt/step": 2})
    group._remove_watch_internally(1)  # type: ignore[attr-defined]
    assert group._active_callbacks_by_path == {b"/ckpt/step": 2}  # type: ignore[attr-defined]
    group._remove_watch_internally(2)  # type: ignore[attr-defined]
    assert group._active_callbacks_by_path == {}  # type: ignore[attr-defined]
    group._remove_watch_internally(2)  # type: ignore[attr-defined]  # twice: no error


def test_a_subdirectory_of_a_staging_directory_renamed_at_once_is_watched(
        tmp_path: Path) -> None:
    """`mkdir -p step_K.tmp/sub`, files, `mv step_K.tmp step_K`, as trainers save: watchdog
    walked step_K.tmp for subdirectories only when it handled its creation, often after the
    rename, and never watched sub; a later write of step_K/sub/x.pt went unseen (6 of 12
    rounds unpatched). Every round's rewrite is seen."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    inotify_fix.install()
    seen: list[tuple[str, str]] = []

    class Seen(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            seen.append((event.event_type, os.fsdecode(event.src_path)))

    def was_seen(kind: str, path: Path) -> Callable[[], bool]:
        return lambda: (kind, str(path)) in seen

    observer = Observer()
    observer.schedule(Seen(), str(tmp_path), recursive=True)
    observer.start()
    try:
        for step in range(12):
            staging = tmp_path / f"step_{step}.tmp"
            (staging / "sub").mkdir(parents=True)
            (staging / "sub" / "x.pt").write_bytes(b"1")
            (staging / "top.pt").write_bytes(b"1")
            staging.rename(tmp_path / f"step_{step}")
            assert wait_for(was_seen("moved", staging), timeout=10)
            rewritten = tmp_path / f"step_{step}" / "sub" / "x.pt"
            rewritten.write_bytes(b"22")
            assert wait_for(was_seen("closed", rewritten), timeout=10), step
    finally:
        observer.stop()
        observer.join()
