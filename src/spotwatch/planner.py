"""The pending set and the order it is uploaded in: newest checkpoint set first.

A checkpoint set is the first path component below the watched directory: a subdirectory such
as ``step_1000/`` with everything in it, or a single file at the top level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spotwatch.uploader import Snapshot


@dataclass(frozen=True)
class PendingFile:
    path: Path
    key: str
    snapshot: Snapshot
    set_name: str

    @property
    def size(self) -> int:
        return self.snapshot.size


def set_name_of(relative_path: str) -> str:
    return relative_path.split("/", 1)[0]


class Planner:
    def __init__(self) -> None:
        self._pending: dict[Path, PendingFile] = {}
        self._order: list[PendingFile] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: Path) -> bool:
        return path in self._pending

    @property
    def pending_bytes(self) -> int:
        return sum(item.size for item in self._pending.values())

    def items(self) -> list[PendingFile]:
        return list(self._pending.values())

    def add(self, item: PendingFile) -> None:
        self._pending[item.path] = item
        self._order = None

    def remove_under(self, path: Path) -> list[PendingFile]:
        """Drop the file at path, or everything below it when it was a directory."""
        gone = [p for p in self._pending if p == path or path in p.parents]
        removed = [self._pending.pop(p) for p in gone]
        if removed:
            self._order = None
        return removed

    def take(self, count: int, busy: Callable[[Path], bool]) -> list[PendingFile]:
        """Up to count files in upload order, skipping paths still busy uploading."""
        if self._order is None:
            self._order = self._ordered()
        taken: list[PendingFile] = []
        kept: list[PendingFile] = []
        for item in self._order:
            if len(taken) < count and not busy(item.path):
                taken.append(item)
                del self._pending[item.path]
            else:
                kept.append(item)
        self._order = kept
        return taken

    def _ordered(self) -> list[PendingFile]:
        newest_in_set: dict[str, int] = {}
        for item in self._pending.values():
            newest_in_set[item.set_name] = max(newest_in_set.get(item.set_name, 0),
                                               item.snapshot.mtime_ns)
        return sorted(
            self._pending.values(),
            key=lambda i: (-newest_in_set[i.set_name], i.set_name, -i.snapshot.mtime_ns),
        )
