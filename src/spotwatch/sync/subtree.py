"""Which paths lie below a directory: files under a watched root, or under a path that was
deleted or moved away."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path


def prefix_below(directory: Path) -> str:
    """What the string of every path below directory starts with.

    Paths are compared as strings: pathlib parses both sides again for every comparison,
    which costs seconds over 100k files, and these checks run for every file event.
    """
    return os.path.join(directory, "")


def files_at_or_below(path: Path, files: Collection[Path]) -> list[Path]:
    """The files that are path itself or lie below it (path may be a file or a directory)."""
    if path in files:
        return [path]  # a file: nothing lies below it
    below = prefix_below(path)
    return [f for f in files if str(f).startswith(below)]


class Folders:
    """The folders that ever held a file of some collection, so that a path deleted or moved
    away is matched against the collection only when something may lie below it.

    Invariant: a trainer deleting an old checkpoint file by file costs O(1) per file, not a
    pass over every pending or unsettled file of the new one (20,000 x 20,000 string checks
    on the daemon's loop). The set only grows: a stale folder costs one pass, never a miss.
    """

    def __init__(self) -> None:
        self._folders: set[Path] = set()

    def add(self, path: Path) -> None:
        """Note the folders above a file entering the collection."""
        if path.parent not in self._folders:  # else its parents are in too: the set only grows
            self._folders.update(path.parents)

    def at_or_below(self, path: Path, files: Collection[Path]) -> list[Path]:
        """files_at_or_below, without the pass when path is no folder any file was in."""
        if path in files:
            return [path]
        return files_at_or_below(path, files) if path in self._folders else []
