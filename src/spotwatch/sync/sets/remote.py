"""Checkpoint sets as they are in S3: their manifests, and whether all their files are there."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from spotwatch.aws.store import ListedObject, ObjectMissing, ObjectStore, StoreError
from spotwatch.keys import (
    NaturalKey,
    held_key,
    manifest_key,
    manifest_prefix,
    natural_order,
    object_key,
    part_key,
    parts_prefix,
    set_name_of,
)
from spotwatch.logs import get_logger
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry, ManifestError
from spotwatch.sync.sets.parts import JobSet, Part

log = get_logger("spotwatch.sets")


def list_manifests(store: ObjectStore, prefix: str,
                   unreadable: list[str] | None = None) -> list[Manifest]:
    """Every valid manifest under the configured prefix, newest checkpoint first.

    All of them are read: when a manifest was written says nothing about how new its
    checkpoint is. A malformed one is skipped with a warning and never hides the others;
    unreadable gets the name of its set, as its key names it."""
    manifests = []
    for listed in store.list_objects(manifest_prefix(prefix)):
        try:
            manifest = _read_manifest(store, prefix, listed.key)
        except ManifestError as exc:
            log.warning("manifest_skipped", key=listed.key, reason=str(exc))
            if unreadable is not None:
                unreadable.append(
                    listed.key.removeprefix(manifest_prefix(prefix)).removesuffix(".json"))
            continue
        if manifest is not None:
            manifests.append(manifest)
    return sorted(manifests, key=_newest_first, reverse=True)


def _newest_first(manifest: Manifest) -> tuple[float, NaturalKey]:
    """The one order of "newest" for restore and retention alike (sorted by it, reversed).

    Invariant: a set is as new as its newest file, but never newer than its seal. A file
    dated in the future (a clock set wrong, a copy that kept its mtime) would otherwise make
    its set outrank every checkpoint sealed after it. Where two sets are dated alike (copied
    or unpacked with second-granular mtimes), the higher step of the series is the newer
    (keys.natural_order), never the one that happened to be sealed last."""
    # A float (never an int overflow) only where the seal is the earlier one.
    written_ns = min(manifest.newest_mtime_ns, manifest.sealed_at * 1e9)
    return written_ns, natural_order(manifest.set_name)


def list_job_sets(store: ObjectStore, prefix: str, job_id: str, nodes: int) -> list[JobSet]:
    """Every set of the job under the configured prefix that has at least one valid part,
    complete or not, newest checkpoint first by the files of all its parts (the order of
    list_manifests). A malformed part is skipped with a warning: its set lacks that rank.
    nodes: the job's node count now (see _as_sealed)."""
    by_set: dict[str, dict[int, dict[int, Part]]] = defaultdict(lambda: defaultdict(dict))
    for listed in store.list_objects(parts_prefix(prefix, job_id)):
        part = _read_part(store, prefix, job_id, listed.key)
        if part is not None:
            by_set[part.manifest.set_name][part.node.nodes][part.node.rank] = part
    job_sets = [_as_sealed(name, by_size, nodes) for name, by_size in by_set.items()]
    return sorted(job_sets, key=lambda job_set: _newest_first(job_set.whole), reverse=True)


def _as_sealed(set_name: str, by_size: dict[int, dict[int, Part]], nodes: int) -> JobSet:
    """The set as the nodes that sealed it saw the job.

    Invariant: a set is complete for the node count its parts were sealed with, so a job
    launched again with fewer or more nodes (an elastic launch after spot capacity changed)
    still restores, and keeps, the checkpoints written before. Where parts of several node
    counts name one set, the one with every rank wins, then the job's count now, then the
    latest sealed."""
    sets = [JobSet(set_name, size, {rank: part.manifest for rank, part in parts.items()},
                   {rank: part.identity for rank, part in parts.items()
                    if part.identity is not None})
            for size, parts in by_size.items()]
    return min(sets, key=lambda job_set: (bool(job_set.missing_ranks()), job_set.nodes != nodes,
                                          -job_set.whole.sealed_at))


def versions_in_other_parts(store: ObjectStore, prefix: str, job_id: str, set_name: str,
                            rank: int) -> dict[str, set[str | None]]:
    """By key, the ETags the other nodes' parts of the set list for it (None: a version
    whose ETag the part does not record). One listing of the set's parts, a GET each."""
    found: dict[str, set[str | None]] = defaultdict(set)
    for listed in store.list_objects(parts_prefix(prefix, job_id) + set_name + "/"):
        part = _read_part(store, prefix, job_id, listed.key)
        if part is None or part.node.rank == rank or part.manifest.set_name != set_name:
            continue
        for entry in part.manifest.files:
            found[entry.key].add(bare_etag(entry.etag))
    return found


def _read_part(store: ObjectStore, prefix: str, job_id: str, key: str) -> Part | None:
    try:
        part = Part.from_json(store.get_bytes(key), prefix, job_id)
    except ObjectMissing:
        return None
    except ManifestError as exc:
        log.warning("part_skipped", key=key, reason=str(exc))
        return None
    if key != part_key(prefix, job_id, part.manifest.set_name, part.node.rank):
        log.warning("part_skipped", key=key, reason=f"describes node {part.node.rank}'s part "
                    f"of set {part.manifest.set_name!r}, not the one it is named for")
        return None
    return part


def _read_manifest(store: ObjectStore, prefix: str, key: str) -> Manifest | None:
    """The manifest at key; None when it is gone. ManifestError when it is malformed or
    describes another set than its key names."""
    try:
        body = store.get_bytes(key)
    except ObjectMissing:
        return None  # deleted since the listing (a prune): no set any more
    manifest = Manifest.from_json(body, prefix)
    if key != manifest_key(prefix, manifest.set_name):
        raise ManifestError(f"describes set {manifest.set_name!r}, not the one it is named for")
    return manifest


_REPLACED = "replaced since the upload"


def is_complete(store: ObjectStore, manifest: Manifest) -> bool:
    """Every file the manifest lists is in the store with the listed size (restore's test: it
    then checks the bytes themselves against the manifest's checksums)."""
    return not_there(store, manifest) is None


def not_there(store: ObjectStore, manifest: Manifest,
              held: dict[str, str] | None = None) -> tuple[str, str] | None:
    """is_complete's answer as the first file (key, why) that is not in the store, or None.

    Invariant: a file of another set that a link of this one leads to (Manifest.linked_files)
    counts as the set's own: a set whose linked file is gone from S3, or replaced by another
    size, is incomplete, whether or not the set it belongs to is still there.

    held: restore's; gets, by key, the held copy that stands in for its object (see
    stand_in)."""
    return _mismatch(store, manifest, None, held)


def stand_in(entry: ManifestEntry, there: ListedObject | None,
             held: ListedObject | None) -> bool:
    """Whether the entry's held copy (sync.sets.held) stands in for the object at its key.

    Invariant: a set whose file was being replaced when its successor's seal never came (the
    instance gone between the new version's upload and the new manifest) stays restorable.
    The object at the key is then missing, of another size, or of the listed size with
    another ETag than the entry records, and a held copy of the entry's size holds the sealed
    version. Only its size is judged here: its bytes are verified against the entry's
    checksum as any file's are."""
    return (held is not None and held.size == entry.size
            and not _is_sealed_version(entry, there))


def is_intact(store: ObjectStore, manifest: Manifest,
              sealed: Iterable[ManifestEntry] | None = None) -> bool:
    """Retention's test: every file the manifest lists is in the store as it was uploaded, with
    the listed size and, where the manifest recorded the ETag S3 gave the upload, that ETag.

    Invariant: retention cannot read the bytes, so a set counts toward keep_sets only when
    intact. An object replaced after sealing, even by as many other bytes, has another ETag
    (an MD5 of the bytes, or with SSE-KMS one of its own per upload): its set does not count,
    so an older set is kept rather than lost to one whose bytes may not be those sealed.
    (Restore reads the bytes, and refuses the set only when they do not match the manifest's
    checksum: another ETag alone may be the same bytes uploaded again.) An entry without an
    ETag (a manifest written before they were recorded) is judged by its size alone.

    sealed: the entries that name each key's uploads (default: the manifest's files); on a
    job every node's part, since nodes that write one file alike each upload it and the
    object is the last of those uploads. An entry without a checksum makes the set one that
    restore refuses (it cannot verify the bytes), so such a set never counts either."""
    unverifiable = next((entry.key for entry in (*manifest.files, *manifest.linked_files)
                         if entry.checksum is None), None)
    if unverifiable is not None:
        log.warning("set_not_counted", set=manifest.set_name, key=unverifiable,
                    reason="the manifest has no checksum to verify it by")
        return False
    uploads: dict[str, set[str | None]] = defaultdict(set)
    for entry in [*(manifest.files if sealed is None else sealed), *manifest.linked_files]:
        uploads[entry.key].add(bare_etag(entry.etag))
    mismatch = _mismatch(store, manifest, uploads)
    if mismatch is not None and mismatch[1] == _REPLACED:
        log.warning("set_not_counted", set=manifest.set_name, key=mismatch[0],
                    reason="an object was replaced in S3 since the set was sealed")
    return mismatch is None


def _mismatch(store: ObjectStore, manifest: Manifest,
              uploads: Mapping[str, set[str | None]] | None,
              held: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The first listed file (key, why) that is not in the store as the manifest says, or None.

    One listing of each set's keys (a request per 1,000 objects) rather than a HEAD per file:
    every key a valid manifest lists is the prefix, then its set's name, then the rest; the
    files links lead to (Manifest.linked_files) are listed with their own sets.
    uploads: by key, the ETags its uploads got (None among them: one not recorded); None:
    sizes alone. held: gets the held copies that stand in (stand_in); the held copies of a
    set are listed only when an object of it is not as its entry says."""
    entries = [*manifest.files, *manifest.linked_files]
    wanted: dict[str, set[str]] = defaultdict(set)  # set key -> the keys wanted in it
    for entry in entries:
        wanted[object_key(manifest.prefix, set_name_of(entry.path))].add(entry.key)
    found: dict[str, ListedObject] = {}
    try:
        for set_key, keys in wanted.items():
            for listed in store.list_objects(set_key):
                if listed.key in keys:
                    found[listed.key] = listed
    except StoreError as exc:
        return "", f"cannot list: {exc}"
    held_copies: dict[str, ListedObject] | None = None
    for entry in entries:
        there = found.get(entry.key)
        if held is not None and not _is_sealed_version(entry, there):
            if held_copies is None:
                try:
                    held_copies = _held_copies(store, manifest, wanted)
                except StoreError as exc:
                    return "", f"cannot list: {exc}"
            copy = held_copies.get(held_key(manifest.prefix, entry.path))
            if copy is not None and stand_in(entry, there, copy):
                held[entry.key] = copy.key
                continue
        if there is None or there.size != entry.size:
            return entry.key, "missing or of another size"
        etags = set() if uploads is None else uploads[entry.key]
        if etags and None not in etags and bare_etag(there.etag) not in etags:
            return entry.key, _REPLACED
    return None


def _is_sealed_version(entry: ManifestEntry, there: ListedObject | None) -> bool:
    """Whether the object at the entry's key is the version sealed, as far as a listing
    tells (its size, and its ETag where both record one)."""
    return there is not None and there.size == entry.size and (
        entry.etag is None or there.etag is None
        or bare_etag(there.etag) == bare_etag(entry.etag))


def _held_copies(store: ObjectStore, manifest: Manifest,
                 wanted: Mapping[str, set[str]]) -> dict[str, ListedObject]:
    """The held copies of the files of the sets wanted lists (by set key), by their key."""
    found: dict[str, ListedObject] = {}
    for set_key in wanted:
        set_name = set_key.removeprefix(object_key(manifest.prefix, ""))
        for listed in store.list_objects(held_key(manifest.prefix, set_name)):
            found[listed.key] = listed
    return found


def bare_etag(etag: str | None) -> str | None:
    """An ETag without the quotes S3 puts around it (some compatible stores leave them out)."""
    return None if etag is None else etag.strip('"')
