"""Which watch entries lead, right now, into, onto or over another entry's directory.

Config loading refuses such entries, but a watched symlink may be pointed at another watched
directory while spotwatch runs (the tracker then stops watching it: watch_dir_overlaps), or
between loading the config and looking at the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spotwatch.config import WatchDir, nested


def resolved(path: Path) -> Path | None:
    """Where path leads now; None: nowhere that can be named (a symlink loop)."""
    try:
        return path.absolute().resolve()
    except (OSError, RuntimeError):
        return None


def overlapping(watches: Sequence[WatchDir],
                directories: Sequence[Path | None]) -> dict[int, str]:
    """Index of each entry whose directory (directories, resolved, one per watch) is at, in
    or above another entry's -> why. Both of a pair are named: which of them was pointed
    there cannot be told from the paths alone."""
    found: dict[int, str] = {}
    for index, mine in enumerate(directories):
        for other, theirs in enumerate(directories):
            if (index != other and mine is not None and theirs is not None
                    and nested(mine, theirs)):
                found[index] = (f"it leads where watch[{other}] ({watches[other].path}) "
                                f"watches: not watched until it leads elsewhere")
                break
    return found
