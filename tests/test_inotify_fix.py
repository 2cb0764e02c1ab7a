"""watchdog's inotify bookkeeping survives a watch forgotten twice (sync.inotify_fix)."""

from __future__ import annotations

import pytest

from spotwatch.sync import inotify_fix

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
