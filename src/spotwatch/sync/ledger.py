"""Durable record (SQLite) of what is in S3, so a restart re-uploads nothing unchanged.

It also remembers which multipart uploads were started and not yet finished, so the orphans
of a killed process can be aborted on the next start. A write that fails (a full disk) raises
LedgerError: the caller logs it and carries on, since the object itself is safe in S3.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from spotwatch.errors import SpotwatchError
from spotwatch.keys import object_key, set_name_of
from spotwatch.model import FileVersion
from spotwatch.sync.sets.manifest import Manifest


class LedgerError(Exception):
    """A ledger write failed; the message says why (e.g. database or disk is full)."""

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
);
CREATE TABLE IF NOT EXISTS multipart_started (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (bucket, key)
);
CREATE TABLE IF NOT EXISTS settled_sets (
    bucket TEXT NOT NULL,
    set_key TEXT NOT NULL,
    PRIMARY KEY (bucket, set_key)
);
CREATE TABLE IF NOT EXISTS links (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (bucket, key)
);
"""
# Objects deleted from S3 by retention while the local file stays: not re-uploaded, not listed.
_RETIRED_COLUMN = "ALTER TABLE objects ADD COLUMN retired INTEGER NOT NULL DEFAULT 0"
# Every upload asks for its set's retired objects (revive_retired): this index holds only
# those, so the question costs nothing while retention has retired none (otherwise each upload
# of a set of n files would scan its n rows: n squared for the set).
_RETIRED_INDEX = ("CREATE INDEX IF NOT EXISTS retired_objects ON objects (bucket, key)"
                  " WHERE retired = 1")
# The part size of a multipart upload: its composite checksum is over parts of this size.
_PART_SIZE_COLUMN = "ALTER TABLE objects ADD COLUMN part_size INTEGER"
# What made the checksum: CRC32 and CRC32C checksums look alike.
_ALGORITHM_COLUMN = "ALTER TABLE objects ADD COLUMN checksum_algorithm TEXT"
# The ETag S3 gave the upload: retention tells by it that an object is still the one uploaded.
_ETAG_COLUMN = "ALTER TABLE objects ADD COLUMN etag TEXT"
# The inode of the file uploaded: a file replaced while the daemon was down by another of the
# same size and mtime (saved with the old mtime kept, then renamed over it) has another.
# Stored as SQLite's signed 64-bit integer (stored_inode): some file systems use the top bit.
_INODE_COLUMN = "ALTER TABLE objects ADD COLUMN inode INTEGER"
# Set aside (sync.out_of_sight): its file went with the file system, not deleted; never
# mirrored. A new record of the key (an upload, a restore) is in sight again.
_OUT_OF_SIGHT_COLUMN = "ALTER TABLE objects ADD COLUMN out_of_sight INTEGER NOT NULL DEFAULT 0"


# File systems that keep whole seconds of mtime (ext4 with 128-byte inodes, FAT's two
# seconds, some NFS servers): a version recorded this soon after its mtime may not be the
# last one of that mtime.
COARSE_MTIME_SECONDS = 2.5


def racy(mtime_ns: int, uploaded_at: float) -> bool:
    """Invariant: a file rewritten in place with the same size, on a file system whose mtimes
    are whole seconds, within the second its last version was uploaded in, is uploaded again:
    its size, mtime and inode are those the ledger holds. So a row whose mtime is a whole
    second and not COARSE_MTIME_SECONDS older than its upload does not say the file is current
    by itself (as git's index treats an entry racily clean): the file's bytes are compared
    with the checksum recorded (SyncEngine._known) whenever it is looked at. A nanosecond
    mtime that is a whole second by chance costs one read of the file more."""
    return mtime_ns % 1_000_000_000 == 0 and mtime_ns / 1e9 + COARSE_MTIME_SECONDS > uploaded_at


def stored_inode(inode: int | None) -> int | None:
    """An inode number (unsigned 64-bit) as the ledger stores it (signed 64-bit)."""
    return None if inode is None else inode - (1 << 64) if inode >= 1 << 63 else inode


# A set's key, or a key below it: those sort between "<set>/" and "<set>0" ('0' follows '/'),
# a range the primary key index answers without reading the whole table (see _set_range).
_IN_SET = "(key = ? OR (key >= ? AND key < ?))"
# Which rows Ledger._keys lists.
_LIVE = "retired = 0"
_RETIRED = "retired = 1"
_IN_SIGHT = "retired = 0 AND out_of_sight = 0"
_SET_ASIDE = "out_of_sight = 1"


def _set_range(set_key: str) -> tuple[str, str, str]:
    """The parameters of _IN_SET for the set."""
    return set_key, set_key + "/", set_key + "0"


@dataclass(frozen=True)
class Recorded:
    """What the ledger holds of the object's version: S3's checksum of it (part_size for a
    composite one, the algorithm where recorded), and whether the record is racy."""

    checksum: str | None
    part_size: int | None
    checksum_algorithm: str | None
    racy: bool


# key, path, size, mtime_ns, checksum, part_size, checksum_algorithm, etag
LedgerRow = tuple[str, str, int, int, "str | None", "int | None", "str | None", "str | None"]


@dataclass(frozen=True)
class SavedSet:
    """A set's rows (every column, retired ones too) and whether it was settled."""

    bucket: str
    set_key: str
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    settled: bool


@dataclass(frozen=True)
class LedgerSummary:
    objects: int
    bytes: int
    last_upload: float | None


def _add_column(db: sqlite3.Connection, statement: str) -> None:
    """Adds a column to a ledger of an older version; one that another process (the daemon and
    a restore opening the same ledger) added since we looked is as good."""
    try:
        db.execute(statement)
    except sqlite3.OperationalError as exc:
        if "duplicate column name" not in str(exc):
            raise


def _refuse_read_only(path: Path) -> None:
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        file = path.with_name(name)
        if os.path.lexists(file) and not os.access(file, os.W_OK):
            raise sqlite3.OperationalError(f"attempt to write a readonly database ({name} may "
                                           f"not be written by uid {os.geteuid()})")


def _open_for_reading(path: Path) -> sqlite3.Connection:
    """The ledger opened read-only, as it is, nothing made or migrated. Read by another user
    than the daemon's, a WAL ledger whose shared-memory file that user cannot make or write
    (the daemon removes it when it stops) is read as its last checkpoint left it: all a
    stopped daemon leaves but the writes of its last moments before a kill -9."""
    uri = path.absolute().as_uri()
    error: sqlite3.Error | None = None
    for mode in ("mode=ro", "mode=ro&immutable=1"):
        try:
            db = sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False,
                                 isolation_level=None)
        except sqlite3.Error as exc:
            error = exc
            continue
        try:
            db.execute("SELECT COUNT(*) FROM objects").fetchone()
            return db
        except sqlite3.Error as exc:
            db.close()
            error = exc
    raise SpotwatchError(f"cannot open ledger {path}: {error}")


class Ledger:
    def __init__(self, path: Path, only_reading: bool = False) -> None:
        """only_reading: for a reader that writes nothing (status), which may run as another
        user than the daemon and then may only read it."""
        self._lock = threading.RLock()  # a transaction holds it across its writes
        if only_reading:
            self._db = _open_for_reading(path)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(objects)")}
            for name, added_by in (("retired", _RETIRED_COLUMN), ("part_size", _PART_SIZE_COLUMN),
                                   ("checksum_algorithm", _ALGORITHM_COLUMN),
                                   ("etag", _ETAG_COLUMN), ("inode", _INODE_COLUMN),
                                   ("out_of_sight", _OUT_OF_SIGHT_COLUMN)):
                if name not in columns:
                    _add_column(self._db, added_by)
            self._db.execute(_RETIRED_INDEX)
            # Invariant: no ledger runs read-only. SQLite opens a file it may not write (another
            # user's) read-only, and with its WAL there every statement above passes. Asked of
            # the files, not by a write: that would wait for a daemon's transaction to end.
            _refuse_read_only(path)
        except (OSError, sqlite3.Error) as exc:
            raise SpotwatchError(f"cannot open ledger {path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def recorded_version(self, bucket: str, key: str, version: FileVersion,
                         inode: int | None = None) -> Recorded | None:
        """The object's record when it holds this version of the file by its size and mtime,
        and its inode where both are known (a row without one: recorded by a restore, or
        before inodes were recorded); None otherwise."""
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, inode, uploaded_at, checksum, part_size,"
                " checksum_algorithm FROM objects WHERE bucket = ? AND key = ?",
                (bucket, key)).fetchone()
        if (row is None or FileVersion(row[0], row[1]) != version
                or not (row[2] is None or inode is None or row[2] == stored_inode(inode))):
            return None
        return Recorded(row[4], row[5], row[6], racy(row[1], row[3]))

    def recorded_size(self, bucket: str, key: str) -> int | None:
        """The size of the version the object holds (None: no version recorded, retired or
        not)."""
        with self._lock:
            row = self._db.execute(
                "SELECT size FROM objects WHERE bucket = ? AND key = ?", (bucket, key)).fetchone()
        return None if row is None else int(row[0])

    def _write(self, sql: str, parameters: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self._db.execute(sql, parameters)
            except (sqlite3.Error, UnicodeEncodeError) as exc:
                # UnicodeEncodeError: a path SQLite cannot store, one not valid UTF-8 above
                # the watched directory (keys are checked before they get here).
                raise LedgerError(str(exc)) from None

    def record(self, bucket: str, key: str, path: Path, version: FileVersion,
               checksum: str | None, part_size: int | None = None,
               checksum_algorithm: str | None = None, etag: str | None = None,
               inode: int | None = None, uploaded_at: float | None = None) -> None:
        """uploaded_at: when the object was written to S3 (default: now)."""
        self._write(
            "INSERT OR REPLACE INTO objects (bucket, key, path, size, mtime_ns, checksum,"
            " uploaded_at, retired, part_size, checksum_algorithm, etag, inode)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (bucket, key, str(path), version.size, version.mtime_ns, checksum,
             time.time() if uploaded_at is None else uploaded_at,
             part_size, checksum_algorithm, etag, stored_inode(inode)),
        )

    def retire(self, bucket: str, key: str) -> None:
        self._write("UPDATE objects SET retired = 1 WHERE bucket = ? AND key = ?", (bucket, key))

    def revive_retired(self, bucket: str, set_key: str) -> list[str]:
        """Forget the set's objects retention deleted from S3 (their local files stayed), so
        that they are uploaded again; returns their keys. For a set that changed after it was
        pruned: sealed again, its manifest must list every file of it, and those are gone.
        set_key may also be the key of a file or directory of a set: the objects at or below
        it (those a link of another set needs)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT key FROM objects WHERE bucket = ? AND retired = 1 AND {_IN_SET}",
                (bucket, *_set_range(set_key)),
            ).fetchall()
        for (key,) in rows:
            self.forget(bucket, key)
        return [key for (key,) in rows]

    def live_keys(self, bucket: str, prefix: str) -> list[str]:
        """The key of every object recorded under the prefix and not retired."""
        return self._keys(bucket, prefix, _LIVE)

    def in_sight_keys(self, bucket: str, prefix: str) -> list[str]:
        """live_keys less those set aside (sync.out_of_sight): the ones deletions mirror."""
        return self._keys(bucket, prefix, _IN_SIGHT)

    def retired_keys(self, bucket: str, prefix: str) -> list[str]:
        """The key of every object under the prefix that retention deleted from S3 while its
        local file stayed."""
        return self._keys(bucket, prefix, _RETIRED)

    def _keys(self, bucket: str, prefix: str, which: str) -> list[str]:
        """which: one of the row conditions below (never anything from outside)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT key FROM objects WHERE bucket = ? AND {which}"
                " AND substr(key, 1, ?) = ?", (bucket, len(prefix), prefix)).fetchall()
        return [key for (key,) in rows]

    def set_out_of_sight(self, bucket: str, prefix: str) -> int:
        """Set aside the records under the prefix of objects still in S3 (not retired): their
        files went out of sight (sync.out_of_sight). Returns how many."""
        with self._lock:
            try:
                return self._db.execute(
                    "UPDATE objects SET out_of_sight = 1 WHERE bucket = ? AND retired = 0"
                    " AND out_of_sight = 0 AND substr(key, 1, ?) = ?",
                    (bucket, len(prefix), prefix)).rowcount
            except sqlite3.Error as exc:
                raise LedgerError(str(exc)) from None

    def out_of_sight_keys(self, bucket: str, prefix: str) -> list[str]:
        """The keys under the prefix whose records are set aside."""
        return self._keys(bucket, prefix, _SET_ASIDE)

    def bring_into_sight(self, bucket: str, set_key: str) -> None:
        """The set's records set aside count again: its files are in sight again."""
        self._write(f"UPDATE objects SET out_of_sight = 0 WHERE bucket = ? AND {_IN_SET}",
                    (bucket, *_set_range(set_key)))

    def multipart_started(self, bucket: str, key: str) -> None:
        self._write("INSERT OR REPLACE INTO multipart_started VALUES (?, ?)", (bucket, key))

    def multipart_finished(self, bucket: str, key: str) -> None:
        self._write("DELETE FROM multipart_started WHERE bucket = ? AND key = ?", (bucket, key))

    def unfinished_multipart(self, bucket: str) -> list[str]:
        """Keys of multipart uploads started and never finished."""
        with self._lock:
            rows = self._db.execute("SELECT key FROM multipart_started WHERE bucket = ?",
                                    (bucket,)).fetchall()
        return [key for (key,) in rows]

    def objects_in_set(self, bucket: str, set_key: str) -> list[LedgerRow]:
        """(key, path, size, mtime_ns, checksum, part_size, checksum_algorithm, etag) of the
        set's objects: set_key or below it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, path, size, mtime_ns, checksum, part_size, checksum_algorithm,"
                f" etag FROM objects WHERE bucket = ? AND retired = 0 AND {_IN_SET}",
                (bucket, *_set_range(set_key)),
            ).fetchall()
        return [tuple(row) for row in rows]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes of the block, all or none (LedgerError when it cannot commit)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(str(exc)) from None
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(str(exc)) from None
                raise

    def saved_set(self, bucket: str, set_key: str) -> SavedSet:
        """What the ledger holds of the set, for put_back."""
        with self._lock:
            cursor = self._db.execute(f"SELECT * FROM objects WHERE bucket = ? AND {_IN_SET}",
                                      (bucket, *_set_range(set_key)))
            columns = tuple(column[0] for column in cursor.description)
            rows = tuple(tuple(row) for row in cursor.fetchall())
            settled = self._db.execute(
                "SELECT 1 FROM settled_sets WHERE bucket = ? AND set_key = ?",
                (bucket, set_key)).fetchone() is not None
        return SavedSet(bucket, set_key, columns, rows, settled)

    def put_back(self, saved: SavedSet) -> None:
        """The set's rows and settledness as saved_set found them, in one transaction."""
        names = ", ".join(saved.columns)
        marks = ", ".join("?" for _ in saved.columns)
        with self.transaction():
            self._write(f"DELETE FROM objects WHERE bucket = ? AND {_IN_SET}",
                        (saved.bucket, *_set_range(saved.set_key)))
            for row in saved.rows:
                self._write(f"INSERT INTO objects ({names}) VALUES ({marks})", row)
            self.set_settled(saved.bucket, saved.set_key, saved.settled)

    def set_settled(self, bucket: str, set_key: str, settled: bool) -> None:
        """Whether the set's manifest (or part) says what the ledger holds of it: it is
        unsettled from a change to it until a manifest made after that change is written."""
        if settled:
            self._write("INSERT OR REPLACE INTO settled_sets VALUES (?, ?)", (bucket, set_key))
        else:
            self._write("DELETE FROM settled_sets WHERE bucket = ? AND set_key = ?",
                        (bucket, set_key))

    def unsettled_sets(self, bucket: str, prefix: str) -> list[str]:
        """The names of the sets under the key prefix with objects recorded (not retired)
        that are not settled: a stop or a crash came between a change and its manifest."""
        with self._lock:
            settled = {key for (key,) in self._db.execute(
                "SELECT set_key FROM settled_sets WHERE bucket = ?", (bucket,))}
        names = {set_name_of(key[len(prefix):]) for key in self.live_keys(bucket, prefix)}
        return sorted(name for name in names if prefix + name not in settled)

    def link_target(self, bucket: str, key: str) -> str | None:
        """The target of the link at key as its set's manifest in S3 lists it (None: none)."""
        with self._lock:
            row = self._db.execute("SELECT target FROM links WHERE bucket = ? AND key = ?",
                                   (bucket, key)).fetchone()
        return None if row is None else str(row[0])

    def record_links(self, bucket: str, manifest: Manifest) -> None:
        """The set's links as this manifest, now in S3, lists them, instead of those recorded
        before. (A write cut short leaves fewer: the set is sealed again.)"""
        set_key = object_key(manifest.prefix, manifest.set_name)
        self._write(f"DELETE FROM links WHERE bucket = ? AND {_IN_SET}",
                    (bucket, *_set_range(set_key)))
        for link in manifest.links:
            self._write("INSERT OR REPLACE INTO links VALUES (?, ?, ?)",
                        (bucket, object_key(manifest.prefix, link.path), link.target))

    def forget(self, bucket: str, key: str) -> None:
        self._write("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))

    def summary(self, bucket: str) -> LedgerSummary:
        with self._lock:
            count, total, last = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(uploaded_at) FROM objects"
                " WHERE bucket = ? AND retired = 0",
                (bucket,),
            ).fetchone()
        return LedgerSummary(count, total, last)
