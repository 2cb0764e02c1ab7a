"""The pending set and the order it is uploaded in: newest checkpoint set first."""

from __future__ import annotations

from collections import Counter
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
        # Kept up to date on every change: status, metrics and progress read the bytes
        # often, and the sealer asks which sets still have files pending.
        self._bytes = 0
        self._files_per_set: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: Path) -> bool:
        return path in self._pending

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def set_keys(self) -> set[str]:
        """The checkpoint sets that still have files pending."""
        return set(self._files_per_set)

    def add(self, item: PendingFile) -> None:
        if item.path in self._pending:
            self._pop(item.path)
        self._pending[item.path] = item
        self._bytes += item.size
        self._files_per_set[item.set_key] += 1
        self._order = None

    def _pop(self, path: Path) -> PendingFile:
        item = self._pending.pop(path)
        self._bytes -= item.size
        self._files_per_set[item.set_key] -= 1
        if not self._files_per_set[item.set_key]:
            del self._files_per_set[item.set_key]
        return item

    def remove_under(self, path: Path) -> list[PendingFile]:
        """Drop the file at path, or everything below it when it was a directory."""
        gone = [p for p in self._pending if p == path or path in p.parents]
        removed = [self._pop(p) for p in gone]
        if removed:
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
                taken.append(self._pop(item.path))
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
