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
