"""Writes to paths the filters exclude (``model.pt.tmp``, a ``step_N.tmp/`` staging directory):
never uploaded, but the trainer is still saving while they go on.

Invariant: an excluded file being written holds its set's seal and every flush exactly as an
included file being written does (SyncEngine.being_written), by the same settle rule: until
settle_seconds after its close, or quiet_seconds after its last write without one while no
process holds it open for writing (sync.settle_rule); a rename or deletion ends it at once. A
trainer pausing between two writes of one staged file must not have the set around it sealed
without that file. Only writes count: an excluded file that merely lies there (found by
a scan, moved in whole) holds nothing. Unlike an included file, a closed one is not hurried at
a notice or a stop (ChangeTracker.settle_all_closed): its close is not the save's end, the
rename that follows is, and a flush that ended between the two would miss the checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spotwatch.sync.open_writers import paths_held_for_writing
from spotwatch.sync.settle_rule import HeldOpen, take_ended
from spotwatch.sync.subtree import Folders


@dataclass
class _Write:
    relative: str
    last_event: float
    closed: bool
    recheck_at: float = float("-inf")  # when a write found held open is looked at again


class StagedWrites:
    """held_open: which of these paths a process holds open for writing (a /proc scan, run
    only for writes the quiet rule would end, and then once per quiet interval each)."""

    def __init__(self, settle_seconds: float, quiet_seconds: float,
                 clock: Callable[[], float],
                 held_open: HeldOpen = paths_held_for_writing
                 ) -> None:
        self._settle = settle_seconds
        self._quiet = quiet_seconds
        self._clock = clock
        self._held_open = held_open
        self._writes: dict[Path, _Write] = {}
        self._folders = Folders()
        self._lock = threading.Lock()

    def note(self, path: Path, relative: str, closed: bool) -> None:
        """A write to (or the close of) an excluded file at path (relative below the root)."""
        with self._lock:
            if path not in self._writes:
                self._folders.add(path)
            self._writes[path] = _Write(relative, self._clock(), closed)

    def end(self, path: Path) -> None:
        """The file (or every file below the directory) at path was renamed or deleted."""
        with self._lock:
            for written in self._folders.at_or_below(path, self._writes.keys()):
                del self._writes[written]

    def active(self) -> dict[Path, str]:
        """The excluded files still being written -> their path relative below the root;
        those whose writes settled are dropped."""
        take_ended(self._writes, self._lock, self._clock(), self._settle, self._quiet,
                   self._held_open)
        with self._lock:
            return {path: write.relative for path, write in self._writes.items()}
