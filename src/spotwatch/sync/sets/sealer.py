"""Writes a checkpoint set's manifest once every file of the set is durable and nothing of it
is still pending, uploading or being written; reports the sets that cannot be sealed."""

from __future__ import annotations

import os
import re
import stat as stat_module
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import TypeGuard

from spotwatch.aws.store import ObjectMissing, ObjectStore, StoreError
from spotwatch.keys import (
    below_prefix,
    manifest_key,
    object_key,
    part_key,
    set_name_of,
    storable_key,
    unfinished_marker,
)
from spotwatch.logs import get_logger, printable_path
from spotwatch.model import FileVersion
from spotwatch.sync.ledger import Ledger, LedgerError, LedgerRow
from spotwatch.sync.links import LinkSkipped, link_entry, linked_target
from spotwatch.sync.planner import SetRef
from spotwatch.sync.retry import FAILING_AFTER, Backoff, RetryQueue
from spotwatch.sync.sets.claim import CLOCK_SKEW_SECONDS, RankClaim
from spotwatch.sync.sets.held import HeldCopies
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, Part, sealed_by
from spotwatch.sync.sets.sealed import SealedSets
from spotwatch.sync.tracker import ChangeTracker, walk_files

log = get_logger("spotwatch.sets")

# A failed manifest write is tried again after 2 s, 4 s, 8 s ... at most every two minutes,
# for as long as it fails: a set whose files are all in S3 must not stay unsealed for good.
# (No jitter: there are few manifests, and a set's pace stays predictable.)
RETRY_SECONDS = 2.0
RETRY_CAP_SECONDS = 120.0
MANIFEST_BACKOFF = Backoff(base=RETRY_SECONDS, cap=RETRY_CAP_SECONDS, jitter=0.0)
# After this many failures in a row the set is failing, as a file is: it is reported
# (set_manifest_failed, incomplete_sets) and flushes stop waiting for it.
MAX_ATTEMPTS = FAILING_AFTER
# A set_incomplete log line names at most this many of the missing files.
MISSING_LOGGED = 20
# A missing file created or renamed this recently is still on its way (its events not yet
# seen): its set is checked again instead of being reported incomplete.
ARRIVING_NS = 2_000_000_000


@dataclass(frozen=True)
class SetCheck:
    entries: list[ManifestEntry]  # what its manifest lists, when nothing is missing
    missing: list[str]  # files (relative paths) not durable in S3 at their current version
    arriving: bool  # some missing file was just created: too early to call the set incomplete
    links: list[LinkEntry]  # its symlinks recorded as they are now (sync.links)
    # The sets of the files of other sets its links lead to that are not durable in S3 at
    # their current version (sync.links.linked_target): each is among missing.
    links_into: frozenset[str] = frozenset()
    # Those files (paths below the watched directory), also among missing.
    linked_missing: tuple[str, ...] = ()


class PartClaimed(StoreError):
    """The part in S3 was sealed by another node that may still hold this rank."""


class SetSealer:
    """Manifest uploads run on the store's threads, so the daemon's loop never waits for
    one; a set that gains a file while its manifest is on the way is sealed again after.

    clock: monotonic seconds (retry pacing); wall_clock_ns: the time files' ctimes compare to;
    node: on a node of a multi-node job, which one: it seals its part of each set
    (sync.sets.parts) instead of the set's manifest, under the same rules; claim: whether it
    may (no other live node claims its rank); revive: queues again those of the files of other
    sets a set's links need (paths below the watched directory) that retention deleted from
    S3, and says whether it queued any (SyncEngine._revive_for_links; None: none is);
    sealed_sets: the sets sealed in S3 before the start, which a manifest written here never
    lists less of than they were sealed with while they have not changed (SealedSets.inherit);
    held: the held copies of sealed versions (sync.sets.held), deleted once their set's new
    manifest is written, and not made while it is being written.
    """

    def __init__(self, ledger: Ledger, store: ObjectStore, trackers: Sequence[ChangeTracker],
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock_ns: Callable[[], int] = time.time_ns,
                 node: JobNode | None = None, claim: RankClaim | None = None,
                 revive: Callable[[SetRef, Sequence[str]], bool] | None = None,
                 sealed_sets: SealedSets | None = None,
                 held: HeldCopies | None = None, keep_written: bool = False) -> None:
        self._ledger = ledger
        self._held = held
        self._sealed_sets = sealed_sets
        self._revive = revive
        self._node = node
        self._claim = claim
        # A part is read back before it is written (_put_part): off the daemon's loop.
        self._part_writer = (ThreadPoolExecutor(1, thread_name_prefix="part-writer")
                             if node is not None and claim is not None else None)
        self._store = store
        self._wall_clock_ns = wall_clock_ns
        self._trackers = {tracker.root: tracker for tracker in trackers}
        # Set key -> its files (relative paths) not durable in S3: sets left unsealed.
        self.incomplete: dict[str, list[str]] = {}
        # Set key -> the watch's complete_when patterns none of its files matches yet: sets
        # left unsealed until the trainer writes the file that says the set is finished.
        self.awaiting: dict[str, list[str]] = {}
        # Sets held while their trainer's marker says they are still being saved: the set ->
        # its marker, sealed once it is gone (see _held_while_unfinished). By set: NeMo's
        # `x.ckpt` and `x-EMA.ckpt` share one marker.
        self._unfinished: dict[SetRef, Path] = {}
        self._dirty: dict[SetRef, int] = {}  # set -> generation, bumped by every new file
        self._sending: dict[SetRef, tuple[int, Future[None], Manifest, str]] = {}
        self._retries: RetryQueue[SetRef, SetRef] = RetryQueue(MANIFEST_BACKOFF, clock)
        # Sets the ledger holds as unsettled already: one write per change of state, not per
        # file uploaded.
        self._unsettled: set[str] = set()
        # The sets whose manifest this sealer wrote, in order, when asked to keep them (a
        # command says them; a daemon's would only grow).
        self.written: list[str] | None = [] if keep_written else None
        # Set key -> the sets left incomplete for want of a file of it their links lead to:
        # checked again whenever that set changes (a file of it uploaded).
        self._linking: dict[str, set[SetRef]] = {}

    def __bool__(self) -> bool:
        return bool(self._dirty)

    def unsealed(self) -> set[str]:
        """Keys of the sets still waiting for their manifest, but for those whose manifest
        write keeps failing: a flush reports those instead of waiting for them."""
        return {set_ref.key for set_ref in self._dirty if self._retries.waits_for(set_ref)}

    def hurry(self, until: float | None) -> None:
        """Under a flush's deadline (monotonic; None: none runs any more), a manifest write
        failing for a transient reason is tried again within seconds and waited for, as a
        file is (RetryQueue.hurry): the set's files alone are no checkpoint."""
        self._retries.hurry(until)

    def links_on_the_way(self, set_ref: SetRef) -> dict[str, str] | None:
        """The links (path: target) the set's manifest on its way lists, as they were when
        it was sent; None when none is on its way."""
        sending = self._sending.get(set_ref)
        return None if sending is None else {link.path: link.target for link in sending[2].links}

    def mark_dirty(self, set_ref: SetRef) -> None:
        self._dirty[set_ref] = self._dirty.get(set_ref, 0) + 1
        if set_ref.key not in self._unsettled:
            self._settle(set_ref.key, False)
        self.check_linking(set_ref.key)

    def check_linking(self, set_key: str) -> None:
        """A file of the set is uploaded: the sets left incomplete for want of it (their links
        lead to it) are checked again."""
        for linking in self._linking.pop(set_key, ()):
            self.mark_dirty(linking)

    def resume(self, set_refs: Iterable[SetRef]) -> None:
        """At start: the sets a stop or a crash left between a change and its manifest (see
        Ledger.unsettled_sets) are sealed again, though no file of them changes any more.

        Invariant: a set whose files are all in S3 gets its manifest whatever happened to the
        process in between (kill -9, a stop cut short by stop_timeout, a manifest write that
        never got through): otherwise restore would never see the newest checkpoint."""
        for set_ref in set_refs:
            self._unsettled.add(set_ref.key)
            self.mark_dirty(set_ref)

    def adopted(self, set_ref: SetRef) -> None:
        """A file of the set was found in S3 as the set's sealed manifest lists it
        (sync.sets.sealed): unless the set changed since, the ledger holds it settled, so
        that no start seals it again from what is on disk."""
        if set_ref not in self._dirty and set_ref not in self._sending:
            self._settle(set_ref.key, True)

    def _settle(self, set_key: str, settled: bool) -> None:
        """Keep in the ledger whether the set's manifest is up to date, for the next start."""
        try:
            self._ledger.set_settled(self._store.bucket, set_key, settled)
        except LedgerError as exc:  # a full disk: the next start seals the set again at worst
            log.warning("ledger_write_failed", set=set_key, error=str(exc))
            return
        if settled:
            self._unsettled.discard(set_key)
        else:
            self._unsettled.add(set_key)

    def reseal_after_deletions(self, keys: Iterable[str]) -> None:
        """Sets that lost objects (and so their manifest) get a new one listing what is left."""
        trackers = [(tracker.watch.prefix, tracker) for tracker in self._trackers.values()]
        for key in keys:
            found = below_prefix(key, trackers)
            if found is not None:
                tracker, relative = found
                self.mark_dirty(SetRef(tracker.watch.prefix, set_name_of(relative), tracker.root))

    def check_incomplete_again(self) -> None:
        """Invariant: a flush names as incomplete only sets that are so as it ends. Those
        reported before are checked again (a set whose missing file, or whole directory, was
        deleted since is sealed with what is left, or dropped)."""
        self.reseal_after_deletions(list(self.incomplete))

    def wait_sent(self) -> list[str]:
        """Wait for the manifest writes under way (a command's end); returns the keys of the
        sets whose manifest S3 did not take."""
        wait([future for _, future, _, _ in self._sending.values()])
        self._collect_sent()
        return sorted(set_ref.key for set_ref in self._dirty if set_ref in self._retries)

    def seal_ready(self, busy_set_keys: AbstractSet[str]) -> None:
        self._collect_sent()
        self._retries.take_due()  # their pause is over: sealed below like any other set
        blocked = None if self._claim is None else self._claim.blocked()
        busy_set_keys = set(busy_set_keys)  # and the sets of the files revived below
        ready: list[tuple[SetRef, int, Manifest]] = []
        for set_ref, generation in list(self._dirty.items()):
            if (set_ref in self._sending or set_ref.key in busy_set_keys
                    or set_ref in self._retries):
                continue
            if blocked is not None:
                self._hold(set_ref, blocked)
                continue
            check = self._check_set(set_ref)
            # A linked file still on its way: checked again, like a file just created.
            if check.arriving or check.links_into & busy_set_keys:
                continue
            self.awaiting.pop(set_ref.key, None)
            if self._revived(set_ref, check.linked_missing):
                busy_set_keys |= check.links_into  # another set linking there waits too
                continue  # checked again once they are uploaded (their set is busy then)
            if check.missing:
                for set_key in check.links_into:
                    self._linking.setdefault(set_key, set()).add(set_ref)
                self._report_incomplete(set_ref, check.missing)
                self._done(set_ref)  # sealed again once another file of it is uploaded
                continue
            self.incomplete.pop(set_ref.key, None)
            if not check.entries and not check.links:
                self._done(set_ref)  # nothing of the set is left locally: no manifest
                # Unless its watched directory is out of sight (not mounted yet): then it is
                # sealed once the directory is back (SyncEngine.collect_settled), or at the
                # next start.
                if os.path.isdir(set_ref.root):
                    self._settle(set_ref.key, True)
                continue
            try:
                markers = _awaited_markers(self._complete_when(set_ref), set_ref.root,
                                           set_ref.name, check.entries,
                                           partial(self._sealed_now, set_ref))
            except StoreError as exc:
                self._failed(set_ref, exc, "its last one not read")  # tried again, as a write
                continue
            if markers:
                self._await(set_ref, markers)
                self._done(set_ref)  # sealed once the file that finishes it is uploaded
                continue
            if self._held_while_unfinished(set_ref):
                continue
            ready.append((set_ref, generation,
                          Manifest.build(set_ref.name, set_ref.prefix, check.entries,
                                         check.links)))
        # Invariant: of the sets ready together, the newest checkpoint's manifest is sent
        # first, as its files were (sync.planner): under a notice it is the one that counts.
        ready.sort(key=lambda sealing: -sealing[2].newest_mtime_ns)
        for set_ref, generation, manifest in ready:
            self._send(set_ref, generation, manifest)

    def _send(self, set_ref: SetRef, generation: int, manifest: Manifest) -> None:
        """Send the set's manifest (on a job, its node's part)."""
        key, body = self._sealed_as(manifest)
        if self._part_writer is not None:
            future = self._part_writer.submit(self._put_part, key, body.encode())
        else:
            future = self._store.put_bytes(key, body.encode(), "application/json")
        if self._held is not None:
            future = self._held.sealing(set_ref.prefix, set_ref.name, manifest, future)
        self._sending[set_ref] = (generation, future, manifest, key)

    def _revived(self, set_ref: SetRef, linked_missing: Sequence[str]) -> bool:
        """Invariant: a set is never left incomplete for a file of another set its links need
        that retention deleted from S3 (that set was pruned) while the file stayed on disk:
        the ledger holds it retired, so nothing would upload it again, and the set, often the
        newest checkpoint, would never be sealed. Such files are queued again, and the set
        waits for them as for any linked file on its way."""
        return bool(linked_missing) and self._revive is not None and self._revive(
            set_ref, linked_missing)

    def _sealed_now(self, set_ref: SetRef) -> Manifest | None:
        """The set's manifest in S3 now (read once per process, unless this process wrote
        it); None when there is none.

        Invariant: a set whose markers are all there is not sealed while S3 does not say
        what its last manifest lists (StoreError): were its markers the last save's, the seal
        would join the shards rewritten so far to the rest of that save (stale_markers)."""
        if self._sealed_sets is None:
            return None
        return self._sealed_sets.current(set_ref.prefix, set_ref.name)

    def _held_while_unfinished(self, set_ref: SetRef) -> bool:
        """Invariant: a set is never sealed while its trainer's marker beside it says it is
        still being saved (keys.unfinished_marker: NeMo's): all its files may be durable with
        the save only half done. It is sealed once the marker is gone (release_finished)."""
        marker = unfinished_marker(set_ref.name)
        if not os.path.lexists(set_ref.root / marker):
            return False
        self._await(set_ref, [marker])
        self._unfinished[set_ref] = set_ref.root / marker
        self._done(set_ref)
        return True

    def release_finished(self) -> None:
        """The sets whose marker is gone are to be sealed (one lstat per set held: a marker's
        removal is seen also when its event was lost)."""
        for set_ref, marker in list(self._unfinished.items()):
            if not os.path.lexists(marker):
                del self._unfinished[set_ref]
                self.mark_dirty(set_ref)

    def _hold(self, set_ref: SetRef, reason: str) -> None:
        """Invariant: no part is sealed while another live node may claim this node's rank,
        so no set counts as complete on a part that lists one of the two nodes' files. While
        the claims are being checked the set just waits; with a clash it is reported, and
        left unsettled in the ledger so that the next start seals it again. So it is with
        nodes that disagree on the node count, but the set stays to be sealed once they
        agree (a node of the other count stopped)."""
        claim = self._claim
        if claim is None or (claim.rival is None and claim.beyond is None):
            return
        if self.incomplete.get(set_ref.key) != [reason]:
            log.warning("set_not_sealed", set=set_ref.key, reason=reason)
        self.incomplete[set_ref.key] = [reason]
        if claim.rival is not None:
            self._done(set_ref)

    def _sealed_as(self, manifest: Manifest) -> tuple[str, str]:
        """The key and body that seal the set: its manifest, or on a job this node's part."""
        if self._node is None:
            return manifest_key(manifest.prefix, manifest.set_name), manifest.to_json()
        key = part_key(manifest.prefix, self._node.job_id, manifest.set_name, self._node.rank)
        identity = None if self._claim is None else self._claim.identity
        return key, Part(self._node, manifest, identity).to_json()

    def _put_part(self, key: str, body: bytes) -> None:
        """Invariant: a part another node sealed is never overwritten while that node may
        still run with this rank (PartClaimed, retried like a failed write: a node gone for
        good stops blocking once its claim is stale). A part of a node gone, or without a
        node recorded (an older spotwatch), is taken over."""
        claim = self._claim
        assert claim is not None
        try:
            found = sealed_by(self._store.get_bytes(key))
        except ObjectMissing:
            found = None
        other = None if found is None else found[0]
        if found is not None and other is not None and other != claim.identity:
            sealed_at = found[1]
            if claim.may_be_live(other, sealed_at):
                if sealed_at > claim.started_at + CLOCK_SKEW_SECONDS:
                    claim.clash(other, f"its part {key}")  # sealed while this node ran
                raise PartClaimed(f"{key} was sealed by node {other}, which may still run with "
                                  f"rank {claim.rank}: not overwritten")
            log.info("part_taken_over", key=key, previous_node=other)
        self._store.put_bytes(key, body, "application/json").result()

    def _collect_sent(self) -> None:
        for set_ref, (generation, future, manifest, key) in list(self._sending.items()):
            if not future.done():
                continue
            del self._sending[set_ref]
            error = future.exception()
            if error is None:
                log.info("set_complete", set=set_ref.key, files=len(manifest.files),
                         bytes=manifest.bytes, manifest=key)
                if self.written is not None:
                    self.written.append(set_ref.key)
                self._record_links(set_ref, manifest)
                if self._dirty.get(set_ref) == generation:
                    self._done(set_ref)
                    self._settle(set_ref.key, True)
                continue
            if isinstance(error, PartClaimed) and self._claim is not None:
                if self._claim.rival is not None:
                    self._hold(set_ref, self._claim.blocked() or str(error))
                    continue
                self.incomplete[set_ref.key] = [str(error)]
            self._failed(set_ref, error)

    def _failed(self, set_ref: SetRef, error: BaseException, why: str = "not written") -> None:
        """The set's manifest was not written (why: or its last one not read): it is sealed
        again after a pause that grows with each failure."""
        # Another node holding the rank is no failure a quick retry mends.
        delay = self._retries.failed(set_ref, set_ref, permanent=isinstance(error, PartClaimed))
        attempts = self._retries.failures(set_ref)
        if self._retries.is_failing(set_ref):
            self.incomplete[set_ref.key] = [f"manifest {why}: {error}"]
        if attempts == MAX_ATTEMPTS:
            log.error("set_manifest_failed", set=set_ref.key, error=str(error),
                      attempts=attempts, retry_in=delay)
        elif attempts < MAX_ATTEMPTS:
            log.warning("set_manifest_retry", set=set_ref.key, error=str(error),
                        attempts=attempts, retry_in=delay)

    def _record_links(self, set_ref: SetRef, manifest: Manifest) -> None:
        """The set's links as its manifest in S3 now lists them: a link on disk that leads
        elsewhere has its set sealed again (SyncEngine._not_regular), also after a restart."""
        try:
            self._ledger.record_links(self._store.bucket, manifest)
        except LedgerError as exc:  # the next start seals the set again at worst
            log.warning("ledger_write_failed", set=set_ref.key, error=str(exc))

    def close(self) -> None:
        """A part write under way is abandoned, as the store's requests are."""
        if self._part_writer is not None:
            self._part_writer.shutdown(wait=False, cancel_futures=True)

    def _done(self, set_ref: SetRef) -> None:
        self._dirty.pop(set_ref, None)
        self._retries.forget(set_ref)

    def _complete_when(self, set_ref: SetRef) -> tuple[str, ...]:
        tracker = self._trackers.get(set_ref.root)
        return () if tracker is None else tracker.watch.complete_when

    def _await(self, set_ref: SetRef, markers: list[str]) -> None:
        if self.awaiting.get(set_ref.key) != markers:
            log.info("set_awaiting_marker", set=set_ref.key, waiting_for=markers)
        self.awaiting[set_ref.key] = markers

    def _report_incomplete(self, set_ref: SetRef, missing: list[str]) -> None:
        missing = [printable_path(relative) for relative in missing]
        self.incomplete[set_ref.key] = missing
        log.warning("set_incomplete", set=set_ref.key, missing=missing[:MISSING_LOGGED],
                    missing_count=len(missing))

    def _check_set(self, set_ref: SetRef) -> SetCheck:
        """The manifest entries of the set, and the files that keep it from being sealed.

        Invariant: a manifest means complete. Every regular file of the set on disk that the
        filters accept must be in the ledger at its current size and mtime, with the checksum
        S3 verified; a file pending, failed or given up is missing, and a set with any missing
        file gets no manifest. (The files that are already in S3 stay there.) A file whose
        name S3 cannot take (refused by the engine with a path_refused warning) is missing
        too: restore must never hand back the set without it, nor without the files of a
        directory spotwatch may not read (named as the directory, with a trailing slash).
        A symlink has no object to wait for: it is listed as it is now if it leads inside
        the watched directory (sync.links), else left out, as the engine said. One in a set
        directory that leads to a file of another set is listed with that file's entry, and
        the file is missing until it is in the ledger as the file is now: restore then gets
        it from the manifest, verified, whatever happens to the other set. So is one that
        leads to a directory of another set, with every regular file below it that the
        filters accept, each missing alike.
        """
        recorded = self._recorded(set_ref)
        entries: list[ManifestEntry] = []
        missing: list[str] = []
        others: list[Path] = []
        arriving = False
        # The set's files not durable, by version, and all its paths on disk (SealedSets).
        versions: dict[str, FileVersion] = {}
        present: set[str] = set()
        for relative, stat in self._local_files(set_ref, missing.append, others.append):
            present.add(relative)
            key = self._key_or_none(set_ref.prefix, relative)
            row = None if key is None else recorded.get(key)
            if not durable(row, stat):
                missing.append(relative)
                if key is not None:
                    versions[relative] = FileVersion(stat.st_size, stat.st_mtime_ns)
                arriving = arriving or (key is not None and self._arriving(stat))
                continue
            entries.append(ManifestEntry(row[0], relative, *row[2:]))
        present.update(relative for path in others
                       for relative in [self._trackers[set_ref.root].relative(path)]
                       if relative is not None)
        links: list[LinkEntry] = []
        linked_missing: list[str] = []
        for path in others:
            link = self._link(set_ref, path)
            if link is None:
                continue
            link, wanted = self._with_linked_files(set_ref, path, link)
            if not wanted:
                links.append(link)
            linked_missing.extend(wanted)
        inherited = None if self._sealed_sets is None else self._sealed_sets.inherit(
            set_ref.prefix, set_ref.name, entries, versions, present, links)
        if inherited is not None:
            entries, still_missing, links = inherited
            missing = [path for path in missing if path not in versions or path in still_missing]
        links_into = frozenset(object_key(set_ref.prefix, set_name_of(relative))
                               for relative in linked_missing)
        return SetCheck(entries, sorted(missing + linked_missing), arriving, links, links_into,
                        tuple(linked_missing))

    def _link(self, set_ref: SetRef, path: Path) -> LinkEntry | None:
        """The entry of a symlink of the set that is recorded (None for a FIFO, socket or
        device, a link not recorded, or one whose name S3 cannot take)."""
        tracker = self._trackers[set_ref.root]
        relative = tracker.relative(path)
        if relative is None or self._key_or_none(set_ref.prefix, relative) is None:
            return None
        try:
            return link_entry(tracker.root, path, relative)
        except LinkSkipped:
            return None

    def _with_linked_files(self, set_ref: SetRef, path: Path,
                           link: LinkEntry) -> tuple[LinkEntry, list[str]]:
        """The link with the entries of the files of another set it leads to, if it leads to
        a file or directory of one (sync.links.linked_target); and those files (their paths
        below the watched directory) not durable in S3 as they are now, or whose key S3
        cannot take, or directories of them that cannot be read."""
        tracker = self._trackers[set_ref.root]
        leads_to = linked_target(tracker.root, path, link.path)
        if leads_to is None:
            return link, []
        below, stat = leads_to
        directory = stat_module.S_ISDIR(stat.st_mode)
        missing: list[str] = []
        # (path as seen through the link, path below the watched directory, lstat); links
        # inside the directory are not followed (each is its own set's, if recorded at all).
        found = [(link.path, below, stat)]
        if directory:
            found = [(link.path + relative[len(below):], relative, file_stat)
                     for relative, file_stat in self._files_below(
                         tracker, tracker.root / below, missing.append, lambda _: None)]
        key = self._key_or_none(set_ref.prefix, below)
        recorded = {} if key is None else {
            row[0]: row for row in self._ledger.objects_in_set(self._store.bucket, key)}
        entries = []
        for seen, relative, file_stat in found:
            key = self._key_or_none(set_ref.prefix, relative)
            row = None if key is None else recorded.get(key)
            if not durable(row, file_stat):
                missing.append(relative)
            else:
                entries.append(ManifestEntry(row[0], seen if directory else relative, *row[2:]))
        if missing or not entries:  # a directory without files: nothing to keep
            return link, missing
        if directory:
            return replace(link, files=tuple(sorted(entries, key=lambda e: e.path))), []
        return replace(link, file=entries[0]), []

    def _arriving(self, stat: os.stat_result) -> bool:
        return 0 <= self._wall_clock_ns() - stat.st_ctime_ns < ARRIVING_NS

    def _recorded(self, set_ref: SetRef) -> dict[str, LedgerRow]:
        rows = self._ledger.objects_in_set(self._store.bucket, set_ref.key)
        return {row[0]: row for row in rows}

    def _local_files(self, set_ref: SetRef, on_unreadable: Callable[[str], None],
                     on_other: Callable[[Path], None]) -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, lstat) of the set's regular files that the filters accept; the
        directories of it that may hold such files but cannot be read go to on_unreadable,
        what is neither file nor directory (a symlink) to on_other."""
        tracker = self._trackers.get(set_ref.root)
        if tracker is None:
            return
        top = set_ref.root / set_ref.name
        try:
            top_stat = os.stat(top, follow_symlinks=False)
        except OSError:
            return
        if stat_module.S_ISDIR(top_stat.st_mode):
            yield from self._files_below(tracker, top, on_unreadable, on_other)
        elif stat_module.S_ISREG(top_stat.st_mode):
            relative = tracker.relative(top)
            if relative is not None:
                yield relative, top_stat
        else:
            on_other(top)

    @staticmethod
    def _files_below(tracker: ChangeTracker, top: Path, on_unreadable: Callable[[str], None],
                     on_other: Callable[[Path], None]) -> Iterator[tuple[str, os.stat_result]]:
        """_local_files, below the directory top."""
        def unreadable(directory: Path, error: OSError) -> None:
            if tracker.may_hold_files(directory):
                tracker.note_unreadable(directory, error)
                on_unreadable(f"{directory.relative_to(tracker.root)}/")

        for path, stat in walk_files(top, on_other, unreadable):
            relative = tracker.relative(path)
            if relative is not None:
                yield relative, stat

    def _key_or_none(self, prefix: str, relative: str) -> str | None:
        try:
            return storable_key(prefix, relative,
                                None if self._node is None else self._node.part_of)
        except ValueError:  # a name S3 cannot take: refused by the engine, never uploaded
            return None


def durable(row: LedgerRow | None, stat: os.stat_result) -> TypeGuard[LedgerRow]:
    """Whether the ledger's row says the file is in S3 as it is now (its size and mtime),
    with the checksum S3 verified."""
    return row is not None and (row[2], row[3]) == (stat.st_size, stat.st_mtime_ns) and bool(row[4])


# The Hugging Face Trainer saves checkpoint-<step>/ in place, file by file (the model's config
# and weights, then training_args.bin, the optimizer, the scheduler, the RNG states), and
# trainer_state.json last. training_args.bin says a directory is the Trainer's, and so does a
# checkpoint-<step>/ beside it holding trainer_state.json (a finished save of the same run, or
# one restored to resume it): the Trainer's files before training_args.bin (config.json,
# model.safetensors) are anyone's. Both are written by the process that writes
# trainer_state.json (process zero, on every node count), so a node that never gets one never
# waits for it.
_HF_CHECKPOINT = re.compile(r"checkpoint-[0-9]+")
_HF_OWN_FILE = "training_args.bin"
_HF_LAST_FILE = "trainer_state.json"
# What the Trainer's process zero writes first (save_pretrained: the model's or an adapter's
# config): a node whose part holds neither (other ranks' RNG states and optimizer shards)
# never gets trainer_state.json either, nor does a checkpoint-<step>/ of accelerate's
# save_state (weights, optimizer.bin, random_states_0.pkl) beside the Trainer's.
_HF_MODEL_FILE = re.compile(r"(config|adapter_config)\.json")


def implied_markers(set_name: str, entries: Sequence[ManifestEntry],
                    trainers_directory: Callable[[], bool] = lambda: False
                    ) -> tuple[str, ...]:
    """complete_when patterns a set implies by itself: a Hugging Face Trainer checkpoint
    (checkpoint-<step>/ holding training_args.bin, or, beside a finished one of the Trainer's
    (trainers_directory(), see holds_trainer_checkpoint: a scan of the watched directory, made
    only for a set holding the model's config), holding the model's config)
    waits for trainer_state.json, as if watch[].complete_when named it. Invariant: the
    Trainer's checkpoint saved in place with pauses between its files is never sealed without
    the file it writes last (with no finished one beside it, once it holds
    training_args.bin); a node's part that holds neither (another node's RNG states and
    shards) waits for nothing."""
    if not _HF_CHECKPOINT.fullmatch(set_name):
        return ()
    inside = [entry.path[len(set_name) + 1:] for entry in entries]
    if _HF_OWN_FILE in inside or (any(_HF_MODEL_FILE.fullmatch(path) for path in inside)
                                  and trainers_directory()):
        return (_HF_LAST_FILE,)
    return ()


def _awaited_markers(complete_when: Sequence[str], root: Path, set_name: str,
                    entries: Sequence[ManifestEntry],
                    sealed_now: Callable[[], Manifest | None]) -> list[str]:
    """The markers a set directory (entries: its files, paths relative to root, the watched
    directory) waits for before it is sealed (again): those complete_when names or the set
    implies (implied_markers) that no file of it matches, else those only its last save's
    files match (stale_markers; sealed_now: its manifest in S3 now, asked only then, which may
    raise StoreError)."""
    patterns = (*complete_when, *implied_markers(
        set_name, entries, partial(holds_trainer_checkpoint, root, set_name)))
    markers = unmatched(patterns, set_name, entries)
    if patterns and not markers:
        markers = stale_markers(patterns, set_name, entries, sealed_now())
    return markers


def _same_version(entry: ManifestEntry, sealed: ManifestEntry | None) -> bool:
    """Whether the file is the version sealed: its size and mtime, or its size and the
    checksum S3 verified (a file touched, or copied back with its bytes, is no new save)."""
    if sealed is None or entry.size != sealed.size:
        return False
    return entry.mtime_ns == sealed.mtime_ns or (
        entry.checksum is not None and entry.checksum == sealed.checksum
        and entry.checksum_algorithm == sealed.checksum_algorithm
        and entry.part_size == sealed.part_size)


def may_wait_for_marker(complete_when: Sequence[str], set_name: str) -> bool:
    """Whether a set may wait for a marker before it is sealed (again): complete_when names
    one, or the set may be a Hugging Face Trainer's (implied_markers)."""
    return bool(complete_when) or bool(_HF_CHECKPOINT.fullmatch(set_name))


def holds_trainer_checkpoint(root: Path, set_name: str) -> bool:
    """Whether the watched directory holds, beside set_name (a checkpoint-<step>/), a
    checkpoint-<step>/ the Trainer finished: its trainer_state.json there."""
    if not _HF_CHECKPOINT.fullmatch(set_name):
        return False
    try:
        with os.scandir(root) as entries:
            return any(entry.name != set_name and _HF_CHECKPOINT.fullmatch(entry.name)
                       and os.path.isfile(os.path.join(entry.path, _HF_LAST_FILE))
                       for entry in entries)
    except OSError:
        return False


def unmatched(complete_when: Sequence[str], set_name: str,
              entries: Sequence[ManifestEntry]) -> list[str]:
    """The complete_when patterns that no file of a set directory matches (paths relative to
    the set's directory; `*` matches across '/', as in the filters).

    Invariant: with watch[].complete_when, a set directory is sealed only once it holds, durable
    in S3 and listed in its manifest, a file matching every pattern: the file a trainer writes
    last (torch.distributed.checkpoint's `.metadata`, the Hugging Face Trainer's
    `trainer_state.json`). A set whose trainer paused between two shards longer than an
    upload takes is then never sealed with half its shards. A set that is a single top-level
    file is its own whole set: the patterns do not apply to it."""
    inside = [entry.path[len(set_name) + 1:] for entry in entries
              if entry.path.startswith(set_name + "/")]
    if not inside:
        return []
    return [pattern for pattern in complete_when
            if not any(fnmatchcase(path, pattern) for path in inside)]


def stale_markers(complete_when: Sequence[str], set_name: str,
                  entries: Sequence[ManifestEntry], sealed: Manifest | None) -> list[str]:
    """The complete_when patterns matched only by files as the set was last sealed (sealed:
    its manifest in S3 now) while a file that manifest lists was written again since.

    Invariant: a set directory saved again in place (torch.distributed.checkpoint into a
    fixed directory) is not sealed again while its marker is the last save's: the shards
    written so far and the rest of the last save would make one checkpoint of two saves. The
    last save's manifest stays, its replaced files kept as held copies (sync.sets.held). New
    files alone (a late rank's file, an evaluation's results) seal it again as ever."""
    inside = set_name + "/"
    if sealed is None or not complete_when or not any(
            entry.path.startswith(inside) for entry in entries):
        return []  # a single top-level file is its own whole set
    before = {entry.path: entry for entry in sealed.files}
    changed = [entry for entry in entries if not _same_version(entry, before.get(entry.path))]
    if not any(entry.path in before for entry in changed):
        return []
    written = [entry.path[len(inside):] for entry in changed if entry.path.startswith(inside)]
    return [pattern for pattern in complete_when
            if not any(fnmatchcase(path, pattern) for path in written)]
