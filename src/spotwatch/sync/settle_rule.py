"""When a write counts as finished: the settle rule shared by the files the tracker uploads and
the staged files that only hold their set (sync.staged_writes).

A write ends settle_seconds after its close, or quiet_seconds after its last event without one
while no process holds the file open for writing (open_writers). Invariant: the quiet rule
ends no write whose file a process still holds open for writing (a trainer pausing mid-save);
such a write is looked at again after each further quiet_seconds. Only the writes the quiet
rule would end are looked up (one /proc scan for all of them, outside the lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from spotwatch.sync.open_writers import paths_held_for_writing


class Write(Protocol):
    last_event: float
    closed: bool
    recheck_at: float  # when the quiet rule may look again at a write found held open


W = TypeVar("W", bound=Write)

HeldOpen = Callable[[Iterable[Path]], set[Path]]


def take_ended(writes: dict[Path, W], lock: threading.Lock, now: float, settle_seconds: float,
               quiet_seconds: float, held_open: HeldOpen = paths_held_for_writing
               ) -> list[Path]:
    """Removes from writes (guarded by lock) the writes that ended by now, and returns their
    paths."""
    with lock:
        ended = [path for path, write in writes.items()
                 if write.closed and now - write.last_event >= settle_seconds]
        for path in ended:
            del writes[path]
        quiet = {path: write for path, write in writes.items()
                 if not write.closed and now - write.last_event >= quiet_seconds
                 and now >= write.recheck_at}
    held = held_open(quiet) if quiet else set()
    with lock:
        for path, write in quiet.items():
            if writes.get(path) is not write:
                continue  # an event came meanwhile: it decides
            if path in held:
                write.recheck_at = now + quiet_seconds
            else:
                del writes[path]
                ended.append(path)
    return ended
