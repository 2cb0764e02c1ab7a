"""The files this run uploaded, by name and by inode: what the ledger's size and mtime cannot
tell, a file replaced under its name by another of the same size and mtime, and the other
names of a file hard-linked under several.

Every look-up is by key, never a scan of all files, but for a directory deleted while it held
uploaded files: a trainer deleting old checkpoints file by file must not cost the daemon's loop
a pass over every file uploaded so far for each of them.
"""

from __future__ import annotations

from pathlib import Path

from spotwatch.model import Snapshot
from spotwatch.sync.subtree import Folders


class UploadedThisRun:
    def __init__(self) -> None:
        self._by_path: dict[Path, Snapshot] = {}
        self._by_inode: dict[int, set[Path]] = {}
        self._folders = Folders()  # folders that held an uploaded file

    def add(self, path: Path, snapshot: Snapshot) -> None:
        self._discard(path)
        self._by_path[path] = snapshot
        self._by_inode.setdefault(snapshot.inode, set()).add(path)
        self._folders.add(path)

    def get(self, path: Path) -> Snapshot | None:
        return self._by_path.get(path)

    def other_names(self, path: Path, inode: int) -> list[Path]:
        """The other paths uploaded with this inode."""
        return [other for other in self._by_inode.get(inode, ()) if other != path]

    def forget_at_or_below(self, path: Path) -> None:
        """A path deleted or renamed away: the file, or every file below the folder."""
        self._discard(path)
        for gone in self._folders.at_or_below(path, self._by_path.keys()):
            self._discard(gone)

    def _discard(self, path: Path) -> None:
        snapshot = self._by_path.pop(path, None)
        if snapshot is None:
            return
        names = self._by_inode.get(snapshot.inode)
        if names is not None:
            names.discard(path)
            if not names:
                del self._by_inode[snapshot.inode]
