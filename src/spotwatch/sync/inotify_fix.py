"""Keeps watchdog's inotify reader alive through a race in its own bookkeeping.

watchdog (7.1) forgets a watch twice when a watched subdirectory is deleted and another moved
into its name in quick succession (`rm -rf step; mv step.tmp step`, over and over): the
kernel's notice that the old watch ended can come after the new one took its path, and
InotifyWatchGroup._remove_watch_internally then pops a path already gone (KeyError). That runs
on the one thread that reads inotify for every watch, so the error ended it: no event came
again for any watched directory, status said all was well, and the observer's teardown raised
the same error at exit. A watch already forgotten is forgotten here without a word.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_spotwatch_tolerant"


def _remove_watch_internally(group: Any, wd: Any) -> None:
    """watchdog's own removal, but a descriptor or path already removed is no error."""
    path = group._active_callbacks_by_watch.pop(wd, None)
    if path is None:
        return
    current = group._active_callbacks_by_path.pop(path, None)
    if current is not None and current != wd:  # the path belongs to a newer watch: kept
        group._active_callbacks_by_path[path] = current


def install() -> None:
    """Once per process; a watchdog without this method (another design), or without inotify
    (not Linux), is left as it is."""
    try:
        from watchdog.observers import inotify
    except ImportError:
        return
    group = getattr(inotify, "InotifyWatchGroup", None)
    original = getattr(group, "_remove_watch_internally", None)
    if group is None or original is None or getattr(original, _PATCHED, False):
        return
    setattr(_remove_watch_internally, _PATCHED, True)
    group._remove_watch_internally = _remove_watch_internally
