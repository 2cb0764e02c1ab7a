"""Durable record (SQLite) of what is in S3, so a restart re-uploads nothing unchanged."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spotwatch.errors import SpotwatchError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    checksum TEXT,
    uploaded_at REAL NOT NULL,
    PRIMARY KEY (bucket, key)
)
"""


@dataclass(frozen=True)
class FileVersion:
    """What identifies one version of a local file's content."""

    size: int
    mtime_ns: int


# key, path, size, mtime_ns, checksum
LedgerRow = tuple[str, str, int, int, "str | None"]


@dataclass(frozen=True)
class LedgerSummary:
    objects: int
    bytes: int
    last_upload: float | None


class Ledger:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SpotwatchError(f"cannot open ledger {path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def is_current(self, bucket: str, key: str, version: FileVersion) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns FROM objects WHERE bucket = ? AND key = ?", (bucket, key)
            ).fetchone()
        return row is not None and FileVersion(*row) == version

    def record(self, bucket: str, key: str, path: Path, version: FileVersion,
               checksum: str | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                (bucket, key, str(path), version.size, version.mtime_ns, checksum, time.time()),
            )

    def objects_in_set(self, bucket: str, set_key: str) -> list[LedgerRow]:
        """(key, path, size, mtime_ns, checksum) of the set's objects: set_key or below it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, path, size, mtime_ns, checksum FROM objects WHERE bucket = ?"
                " AND (key = ? OR substr(key, 1, ?) = ?)",
                (bucket, set_key, len(set_key) + 1, set_key + "/"),
            ).fetchall()
        return [tuple(row) for row in rows]

    def forget(self, bucket: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))

    def summary(self, bucket: str) -> LedgerSummary:
        with self._lock:
            count, total, last = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(uploaded_at) FROM objects"
                " WHERE bucket = ?",
                (bucket,),
            ).fetchone()
        return LedgerSummary(count, total, last)
