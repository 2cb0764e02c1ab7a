"""Two races in watchdog's inotify bookkeeping, mended in place.

A subdirectory made in a staging directory that is renamed into place at once (`mkdir -p
step_3.tmp/sub; ...; mv step_3.tmp step_3`, as trainers save) may never be watched: watchdog
watches a new directory when it handles the directory's creation, and walks it for
subdirectories then, but by that time the directory may have been renamed, so its
subdirectories are not found under the old name; on the rename it moves the watches it has
and adds none, as the directory itself was watched. No later write below `step_3/sub` was
seen (6 in 12 tries), status said nothing was pending. After a directory moved in, every
subdirectory of it not watched yet is watched here (_watch_moved_in_subdirectories).

The other race:

watchdog (7.1) forgets a watch twice when a watched subdirectory is deleted and another moved
into its name in quick succession (`rm -rf step; mv step.tmp step`, over and over): the
kernel's notice that the old watch ended can come after the new one took its path, and
InotifyWatchGroup._remove_watch_internally then pops a path already gone (KeyError). That runs
on the one thread that reads inotify for every watch, so the error ended it: no event came
again for any watched directory, status said all was well, and the observer's teardown raised
the same error at exit. A watch already forgotten is forgotten here without a word.
"""

from __future__ import annotations

import os
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


def _watch_moved_in_subdirectories(group: Any, event: Any) -> None:
    """After a directory moved in (recursive watches): watch each subdirectory of it that is
    not watched yet. Files already there are reported by the move's own events."""
    if not (event.is_moved_to and event.is_directory and group.is_recursive):
        return
    with group._lock:
        if not group.is_active:
            return
        moved = group._build_event_source_path(event)
        if moved is None:
            return
        for root, dirnames, _ in os.walk(moved, followlinks=group.follow_symlink):
            for dirname in dirnames:
                path = os.path.join(root, dirname)
                if path in group._active_callbacks_by_path:
                    continue
                if not group.follow_symlink and os.path.islink(path):
                    continue
                group._add_callback(path)


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
    on_event = getattr(group, "on_event", None)
    if on_event is None or not hasattr(group, "_add_callback"):
        return

    def on_event_then_watch(self: Any, event: Any) -> None:
        on_event(self, event)
        _watch_moved_in_subdirectories(self, event)

    group.on_event = on_event_then_watch
