"""Deletes from S3: mirrored local deletions (`sync.delete`) and retention (`sync.keep_sets`).

Only what the ledger records is ever mirrored: a key is deleted because the ledger says its
local file was in S3 (uploaded here, restored here, or found here as its sealed set lists it:
sync.sets.sealed) and is now gone, so an empty directory on a fresh instance deletes nothing.
Retention keeps the newest `keep_sets` complete sets and removes older sets named by their
manifests. Keys the watch's filters exclude are never deleted. A set's manifest goes
before its files, so no set ever looks complete while its files are being removed. The rules
are enforced in one place, `plan_deletions`.

On a node of a multi-node job the sets are the job's (sync.sets.parts): retention keeps the
newest `keep_sets` sets complete for the whole job, and `job_deletions` narrows the plan to what
this node may delete (see there).
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import DELETE_BATCH, ObjectStore, S3ObjectStore, StoreError
from spotwatch.config import Config, WatchDir
from spotwatch.errors import SpotwatchError
from spotwatch.keys import (
    belongs_to_set,
    below_prefix,
    held_key_of,
    held_of_set,
    held_prefix,
    is_reserved,
    manifest_key,
    object_key,
    part_key,
    series_of,
    set_name_of,
    step_number,
    step_order,
)
from spotwatch.logs import get_logger
from spotwatch.state import StateDir
from spotwatch.sync.commits import uncommitted
from spotwatch.sync.filters import PathFilter
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.out_of_sight import (
    holds_none_recorded,
    is_gone,
    unreadable,
    why_none_held,
)
from spotwatch.sync.overlaps import overlapping, resolved
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, JobSet
from spotwatch.sync.sets.remote import bare_etag, is_intact, list_job_sets, list_manifests
from spotwatch.sync.sets.sealer import SetSealer
from spotwatch.sync.tracker import ChangeTracker

log = get_logger("spotwatch.prune")


class PruneCancelled(Exception):
    """The prune was told to stop before it finished planning."""


@dataclass(frozen=True)
class Deletion:
    key: str
    reason: str  # "deleted locally" or "retention"
    seal: bool = False  # a set's manifest, or a node's part of it: deleted before its files
    # A seal's set, as the key of its directory (object_key(prefix, set name)): the set to
    # seal again once its manifest went for a local deletion, whether its files went or not.
    set_key: str | None = None
    # A held copy of a dropped set's file (sync.sets.held): no file's, so no ledger row, and
    # nothing to seal again.
    held: bool = False

    @property
    def retires(self) -> bool:
        """Retention deletes only the S3 copy: the local file stays and is not re-uploaded."""
        return self.reason == "retention"


def keys_to_reseal(deleted: Iterable[Deletion]) -> list[str]:
    """What SetSealer.reseal_after_deletions takes for these deletions: the keys of the files
    deleted locally, and the sets whose manifest went for one. Invariant: a set whose manifest
    went is sealed again even when the deletion of its files failed after it (a refusal, an
    outage): it is whole without them, and would otherwise be no checkpoint for good."""
    return [(deletion.set_key or deletion.key) if deletion.seal else deletion.key
            for deletion in deleted if not deletion.retires and not deletion.held]


def resealed(watches: Sequence[WatchDir], deleted: Iterable[Deletion]) -> list[str]:
    """The sets (keys of their directories) these deletions make sealed again: those whose
    manifest goes for a local deletion while something of them is still on disk (a set
    deleted whole gets no manifest)."""
    sets = []
    for set_key in dict.fromkeys(deletion.set_key for deletion in deleted
                                 if deletion.seal and not deletion.retires and deletion.set_key):
        found = below_prefix(set_key, ((watch.prefix, watch) for watch in watches))
        if found is not None and not is_gone(found[0].path / found[1]):
            sets.append(set_key)
    return sets


class Pruner:
    def __init__(self, store: ObjectStore, ledger: Ledger, mirror_deletes: bool,
                 keep_sets: int, node: JobNode | None = None) -> None:
        """node: this node of a multi-node job (None: a single node)."""
        self._store = store
        self._node = node
        self._bucket = store.bucket
        self._ledger = ledger
        self._mirror_deletes = mirror_deletes
        self._keep_sets = keep_sets
        # Set from another thread to stop between requests: planning raises PruneCancelled,
        # apply returns what it deleted so far. Stopping between batches is safe because
        # manifests go first: no set is left looking complete without its files.
        self.cancelled = threading.Event()

    @property
    def enabled(self) -> bool:
        return self._mirror_deletes or self._keep_sets > 0

    def plan(self, watches: Iterable[WatchDir]) -> list[Deletion]:
        """What would be deleted, manifests before the files they list."""
        watches = tuple(watches)
        # Each root resolved once: its files are looked for where it led when its overlaps
        # were checked, not wherever its symlink was pointed since.
        directories = [resolved(watch.path) for watch in watches]
        overlaps = overlapping(watches, directories)
        deletions: list[Deletion] = []
        for index, watch in enumerate(watches):
            self._stop_if_cancelled()
            deletions += self._plan_watch(watch, directories[index] or watch.path,
                                          overlaps.get(index))
        return deletions

    def apply(self, deletions: list[Deletion]) -> list[Deletion]:
        """Delete in order; returns what was deleted (a failure stops the rest, kept for later).

        Invariant: no set looks complete while it goes. A batch holds seals (manifests, parts)
        or files, never both: one DeleteObjects request may delete a set's files and refuse
        its manifest, and the plan puts the seals first so that a refusal stops before any
        file of theirs goes."""
        done: list[Deletion] = []
        start = 0
        for batch in _batches(deletions):
            # Once a manifest is gone, its set's files go too, cancelled or not: no later plan
            # finds them (it finds a dropped set's files through its manifest).
            if self.cancelled.is_set() and not any(deletion.seal for deletion in done):
                log.info("prune_cancelled", deleted=len(done), remaining=len(deletions) - start)
                return done
            start += len(batch)
            try:
                failed = self._store.delete_many([d.key for d in batch])
            except StoreError as exc:
                log.warning("prune_failed", error=str(exc), remaining=len(deletions) - len(done))
                return done
            for deletion in batch:
                if deletion.key in failed:
                    log.warning("delete_failed", key=deletion.key, error=failed[deletion.key])
                    continue
                self._forget(deletion)
                done.append(deletion)
                log.info("object_deleted", key=deletion.key, reason=deletion.reason)
            if failed:
                return done
        return done

    def _stop_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise PruneCancelled

    def _forget(self, deletion: Deletion) -> None:
        if deletion.held:
            return
        try:
            if deletion.retires:
                self._ledger.retire(self._bucket, deletion.key)
            else:
                self._ledger.forget(self._bucket, deletion.key)
        except LedgerError as exc:
            log.error("ledger_write_failed", key=deletion.key, error=str(exc))

    def _plan_watch(self, watch: WatchDir, directory: Path,
                    overlap: str | None) -> list[Deletion]:
        """directory: where watch.path leads; overlap: why it is not watched, or None."""
        prefix = object_key(watch.prefix, "")
        gone = self._gone_locally(watch, prefix, directory, overlap) if self._mirror_deletes else []
        if not self._keep_sets and not gone:
            return []
        accepts = PathFilter.for_watch(watch).accepts
        held = [listed.key for listed in self._store.list_objects(held_prefix(watch.prefix))]
        if self._node is None:
            manifests = list_manifests(self._store, watch.prefix)
            gone = self._not_saved_again(watch, directory, gone,
                                         {manifest.set_name: manifest for manifest in manifests})
            not_committed = self._uncommitted(manifests)
            return plan_deletions(
                watch.prefix, accepts, manifests, gone, self._keep_sets,
                lambda manifest: manifest.set_name not in not_committed
                and self._is_intact(manifest), held)
        job_sets = list_job_sets(self._store, watch.prefix, self._node.job_id, self._node.nodes)
        gone = self._not_saved_again(watch, directory, gone, {
            job_set.set_name: job_set.parts.get(self._node.rank) for job_set in job_sets})
        gone = gone_for_job(gone, job_sets, self._node.rank)
        not_committed = self._uncommitted([job_set.whole for job_set in job_sets])
        # A set some of whose files only restore can check (nodes wrote them with other
        # transfer settings, JobSet.other_checksums) never counts as a complete set to keep:
        # retention must not drop an older set for one that restore may refuse.
        problems = {job_set.set_name: job_set.problem() or (
            "checked only on restore" if job_set.other_checksums else None)
            for job_set in job_sets}
        by_name = {job_set.set_name: job_set for job_set in job_sets}

        def complete_for_job(whole: Manifest) -> bool:
            parts = by_name[whole.set_name].parts.values()
            return (problems[whole.set_name] is None and whole.set_name not in not_committed
                    and self._is_intact(whole, [entry for part in parts
                                                for entry in part.files]))

        planned = plan_deletions(watch.prefix, accepts, [s.whole for s in job_sets], gone,
                                 self._keep_sets, complete_for_job, held)
        return job_deletions(planned, watch.prefix, job_sets, self._node)

    def _uncommitted(self, manifests: Sequence[Manifest]) -> set[str]:
        """Invariant: retention never counts a step newer than the one the trainer's pointer
        names (sync.commits) among the sets it keeps: it may be half a save, and the committed
        step, which restore then brings back, must stay. Such a step is kept, uncounted."""
        if not self._keep_sets:
            return set()
        return {found.set_name for found in uncommitted(self._store, manifests)}

    def _gone_locally(self, watch: WatchDir, prefix: str, directory: Path,
                      overlap: str | None) -> list[str]:
        """The keys spotwatch uploaded from the watched directory whose files are gone.

        Invariant: only a file the file system says is not there counts as deleted. A watched
        directory that does not exist (moved away), is empty (the mount point of a volume
        not mounted yet) or holds none of the sets recorded from it, retired ones included (a
        freshly made volume mounted there, with only its lost+found, or an instance store
        wiped by a stop and start) mirrors nothing (and the sets it lost are set aside at
        the next start or restore: sync.out_of_sight), nor does a file that
        cannot be looked at (permission denied, an I/O error, a stale network mount): their
        files were not deleted, only out of sight. Nor does one that leads into, onto or over
        another entry's directory (overlap: a watched symlink pointed there): it is not
        watched then, and its own files are elsewhere, not gone. A key's file is looked for
        where the key says, below the watched directory as configured now (directory: where
        its path leads), not where the ledger saw it: a watched directory moved to another
        path (the config following it) has all its files still."""
        if overlap:
            log.warning("mirror_skipped", path=str(watch.path), reason=overlap)
            return []
        cannot_read = unreadable(directory)
        if cannot_read:
            log.warning("mirror_skipped", path=str(watch.path), reason=cannot_read)
            return []
        if holds_none_recorded(self._ledger, self._bucket, prefix, directory):
            log.warning("mirror_skipped", path=str(watch.path), reason=why_none_held(directory))
            return []
        uploaded = self._ledger.in_sight_keys(self._bucket, prefix)
        return self._still_ours(
            prefix, [key for key in uploaded
                     if is_gone(directory / key[len(prefix):], as_file=True)])

    def _not_saved_again(self, watch: WatchDir, directory: Path, gone: list[str],
                         sealed: Mapping[str, Manifest | None]) -> list[str]:
        """The keys of gone less those of sets being saved again (sealed: this node's manifest
        of each set in S3 now).

        Invariant: a file deleted from a set directory a file of whose manifest was written
        again since (on disk at another size or mtime than its entry lists: a trainer that
        empties its directory, or drops a rank's shard, then saves into it anew) is not
        mirrored until the set is sealed again: till then the last manifest and its held
        copies are the set's only whole version in S3, whatever the new save waits for (its
        marker, its uploads, a held seal). A set none of whose files was written again mirrors
        its deletions at once."""
        prefix = object_key(watch.prefix, "")
        by_set: dict[str, list[str]] = defaultdict(list)
        for key in gone:
            by_set[set_name_of(key[len(prefix):])].append(key)
        mirrored: list[str] = []
        for set_name, keys in by_set.items():
            manifest = sealed.get(set_name)
            if manifest is not None and _written_again(directory, manifest):
                log.info("mirror_deferred", set=object_key(watch.prefix, set_name), files=len(keys),
                         reason="a file of its manifest was written again since: the set is "
                         "being saved anew")
                continue
            mirrored += keys
        return mirrored

    def _still_ours(self, prefix: str, keys: list[str]) -> list[str]:
        """The keys whose objects are still the ones spotwatch uploaded, or gone already.

        Invariant: mirroring deletes only what spotwatch uploaded. An object written over
        since (by hand, another tool) has another ETag than the ledger recorded: it is
        someone else's, and stays. One listing per set, as retention's check."""
        by_set: dict[str, list[str]] = {}
        for key in keys:
            by_set.setdefault(object_key(prefix, set_name_of(key[len(prefix):])), []).append(key)
        ours = []
        for set_key, set_keys in by_set.items():
            self._stop_if_cancelled()
            recorded = {row[0]: row[7] for row in self._ledger.objects_in_set(self._bucket,
                                                                                set_key)}
            now = {listed.key: listed.etag for listed in self._store.list_objects(set_key)
                   if listed.key in recorded}
            for key in set_keys:
                uploaded, there = recorded.get(key), now.get(key)
                if uploaded and there and bare_etag(uploaded) != bare_etag(there):
                    log.warning("not_deleted", key=key,
                                reason="replaced in S3 since spotwatch uploaded it")
                    continue
                ours.append(key)
        return ours

    def _is_intact(self, manifest: Manifest,
                   sealed: Iterable[ManifestEntry] | None = None) -> bool:
        self._stop_if_cancelled()  # between the requests of a long plan
        return is_intact(self._store, manifest, sealed)


def _written_again(directory: Path, manifest: Manifest) -> bool:
    """Whether a file the manifest lists is on disk below directory (the watched directory)
    at another size or mtime than its entry says; a file that cannot be looked at counts as
    written again (out of sight, not deleted)."""
    for entry in manifest.files:
        try:
            stat = (directory / entry.path).lstat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted: what mirroring is for
        except OSError:
            return True
        if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
            return True
    return False


def _batches(deletions: Sequence[Deletion]) -> Iterator[list[Deletion]]:
    """Runs of deletions of one kind (Deletion.seal), in order, DELETE_BATCH at most each."""
    for _, run in groupby(deletions, key=lambda deletion: deletion.seal):
        batch = list(run)
        for start in range(0, len(batch), DELETE_BATCH):
            yield batch[start:start + DELETE_BATCH]


def plan_deletions(watch_prefix: str, accepts: Callable[[str], bool],
                   manifests: Sequence[Manifest], gone_locally: Collection[str],
                   keep_sets: int, complete: Callable[[Manifest], bool],
                   held: Collection[str] = ()) -> list[Deletion]:
    """What to delete under one watch: manifests first, then files, then held copies.

    manifests: the sets in S3, newest first; gone_locally: keys the ledger says spotwatch
    uploaded whose local files are gone; complete: whether a set's files are all in S3;
    held: the held copies under the watch's prefix (sync.sets.held): those of a set whose
    manifest goes go with it (nothing is sealed for them to stand in for any more).

    Invariant: only what spotwatch uploaded goes, never an object a kept set's manifest lists,
    a file of an older set that a kept set's link leads to included (Manifest.linked_files).
    A file is deleted only if it is under the prefix, not spotwatch's own, accepted by the filters,
    listed by no kept manifest, and either recorded in the ledger with its local file gone, or
    inside the own directory of a set dropped by retention whose manifest lists it. A set that
    lists a file gone locally loses its manifest too (the daemon seals it again with what is
    left), so deleting the file leaves no kept set incomplete.

    Retention keeps the newest keep_sets complete sets of each series of names (keys.series_of):
    a file beside the steps that is rewritten at every save (DeepSpeed's `latest`) is always
    the newest set, and counted with the steps it would leave none of them.

    Invariant: it also keeps the keep_sets highest steps of each series of steps (names that
    call a number a step or hold one number, keys.step_number), complete, and any incomplete
    one above them. A file written
    later into an old step (an evaluation's results) makes that step the newest by its files'
    dates; the steps after it, still the trainer's latest work, stay in S3 all the same
    (restore says so, --set takes one).
    """
    prefix = object_key(watch_prefix, "")

    def deletable(key: str) -> bool:
        relative = key[len(prefix):] if key.startswith(prefix) else None
        return relative is not None and not is_reserved(relative) and accepts(relative)

    gone = {key for key in gone_locally if deletable(key)}
    known: dict[str, bool] = {}  # complete(), asked once a set (a listing each)

    def is_complete(manifest: Manifest) -> bool:
        if manifest.set_name not in known:
            known[manifest.set_name] = complete(manifest)
        return known[manifest.set_name]

    mirrored = {manifest.set_name for manifest in manifests
                if any(entry.key in gone for entry in manifest.files)}
    highest = (_highest_steps([m for m in manifests if m.set_name not in mirrored], keep_sets,
                              is_complete) if keep_sets else set())
    dropped: list[tuple[Manifest, str]] = []
    kept: list[Manifest] = []
    complete_kept: Counter[str] = Counter()  # by series
    for manifest in manifests:
        series = series_of(manifest.set_name)
        if manifest.set_name in mirrored:
            dropped.append((manifest, "deleted locally"))
        elif (keep_sets and complete_kept[series] >= keep_sets
              and manifest.set_name not in highest):
            dropped.append((manifest, "retention"))
        else:
            kept.append(manifest)
            if keep_sets and is_complete(manifest):
                complete_kept[series] += 1
    # A kept set needs the files of older sets its links lead to as much as its own.
    listed_by_kept = {entry.key for manifest in kept
                      for entry in (*manifest.files, *manifest.linked_files)}
    files = dict.fromkeys(gone - listed_by_kept, "deleted locally")
    for manifest, reason in dropped:
        if reason != "retention":
            continue
        own = object_key(watch_prefix, manifest.set_name)
        for entry in manifest.files:
            if (deletable(entry.key) and belongs_to_set(entry.key, own)
                    and entry.key not in listed_by_kept):
                files.setdefault(entry.key, reason)
    return ([Deletion(manifest_key(watch_prefix, m.set_name), reason, seal=True,
                      set_key=object_key(watch_prefix, m.set_name))
             for m, reason in dropped]
            + [Deletion(key, reason) for key, reason in sorted(files.items())]
            + [Deletion(key, reason, held=True) for m, reason in dropped
               for key in sorted(held) if held_of_set(watch_prefix, m.set_name, key)])


def _highest_steps(manifests: Sequence[Manifest], keep_sets: int,
                   complete: Callable[[Manifest], bool]) -> set[str]:
    """The sets of each series of steps (keys.step_number) from its highest step down to its
    keep_sets-th complete one."""
    by_series: dict[str, list[Manifest]] = defaultdict(list)
    for manifest in manifests:
        if step_number(manifest.set_name) is not None:
            by_series[series_of(manifest.set_name)].append(manifest)
    highest: set[str] = set()
    for series in by_series.values():
        counted = 0
        for manifest in sorted(series, key=lambda m: step_order(m.set_name), reverse=True):
            if counted >= keep_sets:
                break
            highest.add(manifest.set_name)
            counted += complete(manifest)
    return highest


def job_deletions(planned: Sequence[Deletion], watch_prefix: str, job_sets: Sequence[JobSet],
                  node: JobNode) -> list[Deletion]:
    """What this node of a job deletes of a plan made on the job's sets (their parts' files
    together, as plan_deletions' manifests): each set manifest deletion becomes deletions
    of parts, and the files stay in the plan's order, parts first.

    Every node deletes its own part of a dropped set and the files its part lists, and mirrors
    its own local deletions. Rank 0 alone also deletes the other nodes' parts and files of sets
    dropped by retention, so a set whose nodes are gone for good (replaced, or a rank missing)
    is still removed. Only a subset of plan_deletions' plan: nothing a kept set lists goes.

    Invariant: a node's local deletion never deletes an object another node's part lists
    (several ranks writing the same file, a config.json beside their shards): only this
    node's part goes, to be sealed again without it (gone_for_job).
    """
    sets = {manifest_key(watch_prefix, job_set.set_name): job_set for job_set in job_sets}
    own_files = {entry.key for job_set in job_sets if node.rank in job_set.parts
                 for entry in job_set.parts[node.rank].files}
    peers_files = _listed_by_peers(job_sets, node.rank)
    planned = [deletion for deletion in planned if deletion.retires or deletion.held
               or deletion.key in sets or deletion.key not in peers_files]
    # Held copies are each node's own, as its files are: another node may be between its
    # rewrite of a file and sealing its part again (sync.sets.held).
    own_held = {held_key_of(watch_prefix, key) for key in own_files}
    deletions: list[Deletion] = []
    for deletion in planned:
        if deletion.held:
            if (node.rank == 0 and deletion.retires) or deletion.key in own_held:
                deletions.append(deletion)
            continue
        job_set = sets.get(deletion.key)
        if job_set is None:
            if node.rank == 0 or not deletion.retires or deletion.key in own_files:
                deletions.append(deletion)
            continue
        whole_job = node.rank == 0 and deletion.retires
        deletions += [Deletion(part_key(watch_prefix, node.job_id, job_set.set_name, rank),
                               deletion.reason, seal=True, set_key=deletion.set_key)
                      for rank in sorted(job_set.parts) if whole_job or rank == node.rank]
    return deletions


def _listed_by_peers(job_sets: Sequence[JobSet], rank: int) -> set[str]:
    return {entry.key for job_set in job_sets for other, part in job_set.parts.items()
            if other != rank for entry in (*part.files, *part.linked_files)}


def gone_for_job(gone: Sequence[str], job_sets: Sequence[JobSet], rank: int) -> list[str]:
    """The keys this node's local deletions mirror on a job (gone: recorded in its ledger,
    their local files gone).

    Invariant: an object another node's part lists stays (a config.json every rank wrote).
    While this node's own part lists it too, the key counts as gone, so that the part goes
    and is sealed again without it (job_deletions keeps the object); once the part no longer
    lists it, the key waits, recorded, until no part lists it, and only then is the object
    deleted: so two nodes letting go of it at the same moment, each seeing the other's part,
    never leave it behind for good."""
    own = {entry.key for job_set in job_sets if rank in job_set.parts
           for entry in (*job_set.parts[rank].files, *job_set.parts[rank].linked_files)}
    peers = _listed_by_peers(job_sets, rank)
    return [key for key in gone if key in own or key not in peers]


@dataclass(frozen=True)
class PruneReport:
    planned: list[Deletion]
    deleted: list[Deletion]  # a dry run deletes nothing
    unsealed: list[str]  # sets whose manifest went with a deleted file and was not written again
    resealed: list[str] = field(default_factory=list)  # those whose new manifest was written


def prune_once(config: Config, bucket: str, mirror_deletes: bool, keep_sets: int,
               dry_run: bool) -> PruneReport:
    """`spotwatch prune`: plan, and unless dry_run, delete."""
    ledger = Ledger(StateDir(config.state_dir).ledger)
    try:
        client = make_s3_client(resolve_region(config), config.transfer)
        store = S3ObjectStore(client, bucket, config.transfer)
        node = JobNode.of(config.job)
        pruner = Pruner(store, ledger, mirror_deletes, keep_sets, node)
        try:
            deletions = pruner.plan(config.watch)
        except StoreError as exc:
            raise SpotwatchError(f"cannot list s3://{bucket}: {exc}") from None
        if dry_run:
            return PruneReport(deletions, [], [])
        deleted = pruner.apply(deletions)
        return PruneReport(deletions, deleted, *_reseal(config, store, ledger, node, deleted))
    finally:
        ledger.close()


def _reseal(config: Config, store: ObjectStore, ledger: Ledger, node: JobNode | None,
            deleted: list[Deletion]) -> tuple[list[str], list[str]]:
    """Seals again, with the files that are left, the sets whose manifest went with a file
    deleted locally, as the daemon does after its own prunes; returns the sets whose new
    manifest could not be written, and those whose was. (A set with a file not uploaded at its
    current version gets none, as ever: the daemon or the next flush uploads the file, then
    seals the set.)"""
    sealer = SetSealer(ledger, store, [ChangeTracker(watch, config.sync.settle_seconds,
                                                     config.sync.quiet_seconds)
                                       for watch in config.watch], node=node, keep_written=True)
    sealer.reseal_after_deletions(keys_to_reseal(deleted))
    sealer.seal_ready(frozenset())
    unsealed = sealer.wait_sent()
    return unsealed, list(sealer.written or ())
