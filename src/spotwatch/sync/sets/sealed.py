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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum

from spotwatch.aws.store import ObjectMissing, ObjectStore
from spotwatch.keys import manifest_key, manifest_prefix, part_key, parts_prefix
from spotwatch.logs import get_logger
from spotwatch.model import FileVersion
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry, ManifestError
from spotwatch.sync.sets.parts import JobNode, Part

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


class SealedSets:
    """The sealed manifests (this node's parts on a job) under the watched prefixes, each
    read from S3 at most once per process: which sets have one is listed once per prefix, and
    a set's own is read when a file of it is first judged. Thread-safe; a failed request
    raises StoreError and is tried again on the next call."""

    def __init__(self, store: ObjectStore, node: JobNode | None, started_ns: int) -> None:
        self._store = store
        self._node = node
        self._started_ns = started_ns
        self._sealed_keys: dict[str, frozenset[str]] = {}  # prefix -> keys listed
        self._manifests: dict[str, Manifest | None] = {}  # key -> manifest (None: unreadable)
        self._lock = threading.Lock()

    def judge(self, prefix: str, set_name: str, key: str, version: FileVersion) -> Judged:
        manifest = self._manifest(prefix, set_name)
        if manifest is None:
            return Judged(Verdict.UPLOAD)
        entry = next((entry for entry in manifest.files if entry.key == key), None)
        return Judged(judge(entry, version, self._started_ns), entry, manifest.sealed_at)

    def _manifest(self, prefix: str, set_name: str) -> Manifest | None:
        key = self._key(prefix, set_name)
        with self._lock:
            if key in self._manifests:
                return self._manifests[key]
            listed = self._sealed_keys.get(prefix)
        if listed is None:
            listed = frozenset(found.key for found in self._store.list_objects(
                self._listed_under(prefix)))
            with self._lock:
                self._sealed_keys[prefix] = listed
        manifest = self._read(prefix, key) if key in listed else None
        with self._lock:
            self._manifests[key] = manifest
        return manifest

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
