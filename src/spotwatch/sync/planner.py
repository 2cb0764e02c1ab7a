"""The pending set and the order it is uploaded in: newest checkpoint set first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spotwatch.keys import object_key
from spotwatch.model import Snapshot
from spotwatch.sync.subtree import Folders


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
        # Upload order, last to go first: taking a file pops it off the end, so draining n
        # pending files costs O(n), not a list copy per take. None: sort again when asked.
        self._to_go: list[PendingFile] | None = None
        # Kept up to date on every change: status, metrics and progress read the bytes
        # often, and the sealer asks which sets still have files pending.
        self._bytes = 0
        self._files_per_set: Counter[str] = Counter()
        self._folders = Folders()

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
        self._folders.add(item.path)
        self._bytes += item.size
        self._files_per_set[item.set_key] += 1
        self._to_go = None

    def _pop(self, path: Path) -> PendingFile:
        item = self._pending.pop(path)
        self._bytes -= item.size
        self._files_per_set[item.set_key] -= 1
        if not self._files_per_set[item.set_key]:
            del self._files_per_set[item.set_key]
        return item

    def remove_under(self, path: Path) -> list[PendingFile]:
        """Drop the file at path, or everything below it when it was a directory."""
        removed = [self._pop(p) for p in self._folders.at_or_below(path, self._pending.keys())]
        if removed:
            self._to_go = None
        return removed

    def ordered(self) -> list[PendingFile]:
        """Everything pending, in upload order."""
        return self._stack()[::-1]

    def take(self, count: int, busy: Callable[[Path], bool]) -> list[PendingFile]:
        """Up to count files in upload order, skipping paths still busy uploading."""
        stack = self._stack()
        taken: list[PendingFile] = []
        kept: list[PendingFile] = []
        while stack and len(taken) < count:
            item = stack.pop()
            if busy(item.path):
                kept.append(item)
            else:
                taken.append(self._pop(item.path))
        stack.extend(reversed(kept))  # still first in line once they are free
        return taken

    def _stack(self) -> list[PendingFile]:
        if self._to_go is None:
            self._to_go = self._ordered()
            self._to_go.reverse()
        return self._to_go

    def _ordered(self) -> list[PendingFile]:
        newest_in_set: dict[str, int] = {}
        for item in self._pending.values():
            newest_in_set[item.set_key] = max(newest_in_set.get(item.set_key, 0),
                                              item.snapshot.mtime_ns)
        return sorted(
            self._pending.values(),
            key=lambda i: (-newest_in_set[i.set_key], i.set_key, -i.snapshot.mtime_ns),
        )
