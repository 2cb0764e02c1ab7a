"""The pending set and the order it is uploaded in: newest checkpoint set first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spotwatch.checkpoint_sets import object_key
from spotwatch.uploader import Snapshot


@dataclass(frozen=True)
class SetRef:
    """The checkpoint set a file belongs to: its name below a watched directory."""

    prefix: str
    name: str
    root: Path  # the watched directory
    key: str = field(init=False, compare=False)  # read for every pending file, so kept

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", object_key(self.prefix, self.name))


@dataclass(frozen=True)
class PendingFile:
    path: Path
    key: str
    snapshot: Snapshot
    set_ref: SetRef

    @property
    def size(self) -> int:
        return self.snapshot.size

    @property
    def set_key(self) -> str:
        return self.set_ref.key


class Planner:
    def __init__(self) -> None:
        self._pending: dict[Path, PendingFile] = {}
        self._order: list[PendingFile] | None = None
        # Kept up to date on every change: status, metrics and progress read it often.
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: Path) -> bool:
        return path in self._pending

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def items(self) -> list[PendingFile]:
        return list(self._pending.values())

    def add(self, item: PendingFile) -> None:
        replaced = self._pending.get(item.path)
        self._bytes += item.size - (replaced.size if replaced else 0)
        self._pending[item.path] = item
        self._order = None

    def remove_under(self, path: Path) -> list[PendingFile]:
        """Drop the file at path, or everything below it when it was a directory."""
        gone = [p for p in self._pending if p == path or path in p.parents]
        removed = [self._pending.pop(p) for p in gone]
        if removed:
            self._bytes -= sum(item.size for item in removed)
            self._order = None
        return removed

    def ordered(self) -> list[PendingFile]:
        """Everything pending, in upload order."""
        if self._order is None:
            self._order = self._ordered()
        return list(self._order)

    def take(self, count: int, busy: Callable[[Path], bool]) -> list[PendingFile]:
        """Up to count files in upload order, skipping paths still busy uploading."""
        if self._order is None:
            self._order = self._ordered()
        taken: list[PendingFile] = []
        kept: list[PendingFile] = []
        looked_at = 0
        for item in self._order:
            if len(taken) == count:
                break
            looked_at += 1
            if busy(item.path):
                kept.append(item)
            else:
                taken.append(item)
                del self._pending[item.path]
                self._bytes -= item.size
        self._order = kept + self._order[looked_at:]
        return taken

    def _ordered(self) -> list[PendingFile]:
        newest_in_set: dict[str, int] = {}
        for item in self._pending.values():
            newest_in_set[item.set_key] = max(newest_in_set.get(item.set_key, 0),
                                              item.snapshot.mtime_ns)
        return sorted(
            self._pending.values(),
            key=lambda i: (-newest_in_set[i.set_key], i.set_key, -i.snapshot.mtime_ns),
        )
