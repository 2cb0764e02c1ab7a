"""What S3 already holds of a set this host's ledger knows nothing of: the manifest (on a job,
this node's part) it was sealed with, and what that means for a local file of it.

A daemon that starts with a state directory of its own on a disk that already holds
checkpoints (a kept or reattached volume, a restore killed half way, an earlier boot's files)
finds files the ledger has no record of. Uploading them as new would overwrite good objects
with stale local copies, and sealing the set again from what is on disk would write a manifest
that lists fewer files than the one in S3: restore would then hand back part of a checkpoint.

Invariant: a file the start's scan finds whose key the ledger has no row for is judged
against its set's sealed manifest before it is uploaded (SyncEngine._judge_against_sealed).
A file in the version the manifest lists is adopted (recorded as uploaded and the set as
settled; nothing is sent and the set is not sealed again); a file older than that version,
and on disk since before this process started, is a stale copy and is not uploaded (S3 keeps
the version sealed); only a newer write, or a file the manifest does not list, is uploaded.
On a job, a file another rank's part lists in its version (a whole set restored onto this
node) is adopted too, as restore records it.

Invariant: a set sealed in S3 before this process started, and neither written to nor deleted
from since, is never sealed again with less than it was sealed with (SealedSets.inherit): a
file of it absent from disk keeps its entry, and a stale copy on disk counts as the version
sealed. Something else can still make such a set dirty (a symlink of it, a file it did not
list, a retried upload), and what is on disk of it is then only part of it. A set the trainer
writes to, or deletes from, after the start is sealed as it is on disk, as any set is.
"""

from __future__ import annotations

import threading
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import Enum

from spotwatch.aws.store import ObjectMissing, ObjectStore
from spotwatch.keys import manifest_key, manifest_prefix, object_key, part_key, parts_prefix
from spotwatch.logs import get_logger
from spotwatch.model import FileVersion
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry, ManifestError
from spotwatch.sync.sets.parts import JobNode, Part
from spotwatch.sync.sets.remote import bare_etag

log = get_logger("spotwatch.sets")


class Verdict(Enum):
    UPLOAD = "upload"  # not in the sealed set, or newer than its version there
    ADOPT = "adopt"  # the very version the sealed set lists: in S3 already
    STALE = "stale"  # older than the version the sealed set lists: S3's stays


@dataclass(frozen=True)
class Judged:
    verdict: Verdict
    entry: ManifestEntry | None = None  # the sealed set's entry for the file
    sealed_at: float | None = None  # when that set was sealed


def judge(entry: ManifestEntry | None, version: FileVersion, started_ns: int) -> Verdict:
    """What a local file unknown to the ledger is, against its sealed set's entry (None: the
    set lists no such file). started_ns: when this process started (wall clock). A file
    written since is a write this process saw happen and always goes up, whatever the clocks
    of the host that sealed the set said."""
    if entry is None:
        return Verdict.UPLOAD
    if FileVersion(entry.size, entry.mtime_ns) == version:
        return Verdict.ADOPT
    if version.mtime_ns <= entry.mtime_ns and version.mtime_ns < started_ns:
        return Verdict.STALE
    return Verdict.UPLOAD


@dataclass(frozen=True)
class _Sealed:
    """What S3 holds of one set: this node's manifest (its part, on a job), and on a job the
    other ranks' parts."""

    own: Manifest | None
    others: tuple[Manifest, ...] = ()

    def entry(self, key: str, version: FileVersion) -> ManifestEntry | None:
        """The entry judging the file: this node's, else another rank's listing the very
        version, else another rank's listing the key at all."""
        own = None if self.own is None else _entry_of(self.own, key)
        if own is not None:
            return own
        theirs = [entry for part in self.others for entry in [_entry_of(part, key)]
                  if entry is not None]
        same = [entry for entry in theirs if FileVersion(entry.size, entry.mtime_ns) == version]
        found = same or theirs
        return found[0] if found else None


def _entry_of(manifest: Manifest, key: str) -> ManifestEntry | None:
    return next((entry for entry in manifest.files if entry.key == key), None)


class SealedSets:
    """The sealed manifests (this node's parts on a job) under the watched prefixes, each
    read from S3 at most once per process: which sets have one is listed once per prefix, and
    a set's own is read when a file of it is first judged. Thread-safe; a failed request
    raises StoreError and is tried again on the next call."""

    def __init__(self, store: ObjectStore, node: JobNode | None, started_ns: int) -> None:
        self._store = store
        self._node = node
        self.started_ns = started_ns
        self._listed: dict[str, frozenset[str]] = {}  # prefix -> the sealed keys under it
        self._sets: dict[tuple[str, str], _Sealed] = {}  # (prefix, set) -> what S3 holds
        self._touched: set[tuple[str, str]] = set()  # sets a deletion was seen in since
        # Each set's manifest (this node's part) in S3 now, for held copies (sealed_entry):
        # the one this process last wrote, or read (None: none), by (prefix, set). Apart from
        # _sets, which holds what S3 held at the start for judging and inheriting.
        self._now: dict[tuple[str, str], Manifest | None] = {}
        self._reread: set[tuple[str, str]] = set()  # sets whose manifest write failed
        # The ETags of each set's objects when a file of it was first adopted (_holds_entry).
        self._objects: dict[tuple[str, str], dict[str, str | None]] = {}
        self._lock = threading.Lock()

    def judge(self, prefix: str, set_name: str, key: str, version: FileVersion) -> Judged:
        """Invariant: a file is adopted (recorded as in S3, not sent) only while the object at
        its key is the version its entry lists. A file restored from a held copy
        (sync.sets.held) has that version while S3 holds a later, unsealed one at its key:
        adopted, a later seal would list its entry over other bytes. It goes up instead."""
        sealed = self._sealed(prefix, set_name)
        entry = sealed.entry(key, version)
        if entry is None:
            return Judged(Verdict.UPLOAD)
        when = sealed.own.sealed_at if sealed.own is not None else None
        verdict = judge(entry, version, self.started_ns)
        if verdict is Verdict.ADOPT and not self._holds_entry(prefix, set_name, sealed, entry):
            verdict = Verdict.UPLOAD
        return Judged(verdict, entry, when)

    def _holds_entry(self, prefix: str, set_name: str, sealed: _Sealed,
                     entry: ManifestEntry) -> bool:
        """Whether the object at the entry's key is a version the set lists for it (on a job,
        any node's part may list its own upload of a file several nodes wrote; an entry with
        no ETag recorded is taken as held), by one listing of the set's keys."""
        listed_etags = {bare_etag(other.etag) for part in (sealed.own, *sealed.others)
                        if part is not None for other in part.files
                        if other.key == entry.key and other.etag}
        if entry.etag is None or not listed_etags:
            return True
        with self._lock:
            etags = self._objects.get((prefix, set_name))
        if etags is None:
            set_key = object_key(prefix, set_name)
            below = set_key if entry.key == set_key else set_key + "/"  # one file, or a folder
            etags = {listed.key: bare_etag(listed.etag)
                     for listed in self._store.list_objects(below)
                     if listed.key == set_key or listed.key.startswith(set_key + "/")}
            with self._lock:
                self._objects[(prefix, set_name)] = etags
        return etags.get(entry.key) in listed_etags

    def sealed_entry(self, prefix: str, set_name: str, key: str) -> ManifestEntry | None:
        """The entry for key of the set's manifest (this node's part) in S3 now (current);
        None when none lists the key."""
        manifest = self.current(prefix, set_name)
        return None if manifest is None else _entry_of(manifest, key)

    def current(self, prefix: str, set_name: str) -> Manifest | None:
        """The set's manifest (this node's part) in S3 now: the one this process last wrote,
        else the one S3 held at the start (read once), or after a write of it failed, the one
        S3 holds now (read once more); None: none.

        Invariant: once this process has written a set's manifest, this answers from that
        manifest (sealed_here), never from an older one: a held copy is made if-match the
        ETag of the version sealed last, and one made against an older ETag would fail, leaving
        the version just sealed unprotected while a new one replaces it."""
        with self._lock:
            known = (prefix, set_name) in self._now
            manifest = self._now.get((prefix, set_name))
            at_start = self._sets.get((prefix, set_name))
            reread = (prefix, set_name) in self._reread
        if not known:
            manifest = (at_start.own if at_start is not None and not reread
                        else self._read_own(prefix, set_name, reread))
            with self._lock:
                manifest = self._now.setdefault((prefix, set_name), manifest)
        return manifest

    def sealed_here(self, prefix: str, set_name: str, manifest: Manifest | None) -> None:
        """This process wrote the set's manifest (None: deleted it)."""
        with self._lock:
            self._now[(prefix, set_name)] = manifest

    def forget(self, prefix: str, set_name: str) -> None:
        """A write of the set's manifest failed: it may have landed all the same (a reply
        lost), so sealed_entry reads the one in S3 again."""
        with self._lock:
            self._now.pop((prefix, set_name), None)
            self._reread.add((prefix, set_name))

    def touched(self, prefix: str, set_name: str) -> None:
        """A deletion in the set was seen since the start: it is sealed as it is on disk."""
        with self._lock:
            self._touched.add((prefix, set_name))

    def inherit(self, prefix: str, set_name: str, entries: list[ManifestEntry],
                missing: dict[str, FileVersion], present: AbstractSet[str],
                links: list[LinkEntry]) -> tuple[list[ManifestEntry], list[str],
                                                 list[LinkEntry]] | None:
        """What the set's manifest lists when it was sealed in S3 before the start (and read
        here, judging a file of it) and has not changed since (see the module's second
        invariant): entries (those durable now) with the sealed entries of the files absent
        from disk and of the local files missing from the ledger that judge ADOPT or STALE
        against theirs, the files still missing, and links with the sealed ones absent from
        disk. None when this does not apply: the set is sealed as it is on disk.

        missing: the set's regular files on disk that are not durable, by version; present:
        the relative path of everything of the set on disk."""
        with self._lock:
            sealed = self._sets.get((prefix, set_name))
            touched = (prefix, set_name) in self._touched
        manifest = None if sealed is None else sealed.own
        if manifest is None or touched or any(
                version.mtime_ns >= self.started_ns
                for version in [*(FileVersion(e.size, e.mtime_ns) for e in entries),
                                *missing.values()]):
            return None
        by_path = {entry.path: entry for entry in manifest.files}
        entries = list(entries)
        still_missing = []
        for path, version in missing.items():
            entry = by_path.get(path)
            if entry is not None and judge(entry, version, self.started_ns) is not Verdict.UPLOAD:
                entries.append(entry)
            else:
                still_missing.append(path)
        entries += [entry for entry in manifest.files if entry.path not in present]
        links = list(links) + [link for link in manifest.links if link.path not in present]
        return entries, still_missing, links

    def _sealed(self, prefix: str, set_name: str) -> _Sealed:
        with self._lock:
            if (prefix, set_name) in self._sets:
                return self._sets[(prefix, set_name)]
        listed = self._listing(prefix)
        own_key = self._key(prefix, set_name)
        own = self._read(prefix, own_key) if own_key in listed else None
        others: tuple[Manifest, ...] = ()
        if self._node is not None:  # every other rank's part of the set
            below = parts_prefix(prefix, self._node.job_id) + f"{set_name}/"
            others = tuple(part for key in sorted(listed)
                           if key.startswith(below) and key != own_key
                           for part in [self._read(prefix, key)] if part is not None)
        sealed = _Sealed(own, others)
        with self._lock:
            self._sets[(prefix, set_name)] = sealed
        return sealed

    def _listing(self, prefix: str) -> frozenset[str]:
        """The keys of the manifests (this job's parts) under the prefix, listed once."""
        with self._lock:
            listed = self._listed.get(prefix)
        if listed is None:
            listed = frozenset(found.key for found in self._store.list_objects(
                self._listed_under(prefix)))
            with self._lock:
                self._listed[prefix] = listed
            # Once per prefix: files the ledger did not know are judged from here on.
            log.info("sealed_sets_listed", prefix=prefix, sealed=len(listed))
        return listed

    def _read_own(self, prefix: str, set_name: str, reread: bool) -> Manifest | None:
        """The set's manifest (this node's part) in S3; None: none. Looked for where the
        listing made at first holds it, or (reread) wherever it is now."""
        own_key = self._key(prefix, set_name)
        return (self._read(prefix, own_key) if reread or own_key in self._listing(prefix)
                else None)

    def _key(self, prefix: str, set_name: str) -> str:
        if self._node is None:
            return manifest_key(prefix, set_name)
        return part_key(prefix, self._node.job_id, set_name, self._node.rank)

    def _listed_under(self, prefix: str) -> str:
        if self._node is None:
            return manifest_prefix(prefix)
        return parts_prefix(prefix, self._node.job_id)

    def _read(self, prefix: str, key: str) -> Manifest | None:
        """The manifest at key; None when it is gone or cannot be read (sealing the set
        again replaces such a one, as before)."""
        try:
            body = self._store.get_bytes(key)
        except ObjectMissing:
            return None
        try:
            if self._node is None:
                return Manifest.from_json(body, prefix)
            return Part.from_json(body, prefix, self._node.job_id).manifest
        except ManifestError as exc:
            log.warning("manifest_skipped", key=key, reason=str(exc))
            return None
