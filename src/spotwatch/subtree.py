"""Which of many tracked files lie at or below a path that was deleted or moved away."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path


def files_at_or_below(path: Path, files: Collection[Path]) -> list[Path]:
    """The files that are path itself or lie below it (path may be a file or a directory).

    Compared as strings: building every file's parents costs seconds with 100k files, and
    this runs for each deletion the trainer makes.
    """
    if path in files:
        return [path]  # a file: nothing lies below it
    below = os.path.join(path, "")
    return [f for f in files if str(f).startswith(below)]
