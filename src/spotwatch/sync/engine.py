"""The sync engine shared by `run` and `flush`: settled files in, durable S3 objects out.

It owns the pending set, the ledger and the uploader, and is driven by one thread calling
``pump``; upload results arrive from other threads through a queue.
"""

from __future__ import annotations

import os
import queue
import stat as stat_module
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

from spotwatch.keys import object_key, set_name_of, storable_key
from spotwatch.logs import get_logger, printable_path
from spotwatch.model import FileVersion, Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync import formats
from spotwatch.sync.backslashes import BACKSLASH, BackslashKeys
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.links import LinkSkipped, link_entry
from spotwatch.sync.orphans import MultipartNotes
from spotwatch.sync.planner import PendingFile, Planner, SetRef
from spotwatch.sync.retry import RetryQueue
from spotwatch.sync.scan_rule import recorded_as_is, scanned_files, storable_version
from spotwatch.sync.sets.claim import RankClaim
from spotwatch.sync.sets.held import HeldCopies
from spotwatch.sync.sets.parts import JobNode
from spotwatch.sync.sets.sealed import SealedSets, Verdict
from spotwatch.sync.sets.sealer import SetSealer, may_wait_for_marker
from spotwatch.sync.subtree import files_at_or_below
from spotwatch.sync.throughput import ThroughputMeter
from spotwatch.sync.tracker import ChangeTracker, events_were_lost
from spotwatch.sync.uploaded import UploadedThisRun
from spotwatch.sync.uploader import Uploader

log = get_logger("spotwatch.engine")

# How often finished checkpoint sets are looked for while uploads are still running.
SEAL_CHECK_SECONDS = 0.25
# A rescan also looks at files changed this long before the last scan began: timestamps are
# coarse on some file systems (2 s on FAT), and a change is never missed for want of a tick.
RESCAN_MARGIN_NS = 2 * 10**9
# How long new uploads wait, at a flush, for those taken back to come back (put_newest_first).
WITHDRAWN_HOLD_SECONDS = 2.0
# How long one call may spend on a periodic scan before handing the loop back.
RESCAN_SLICE_SECONDS = 0.05


@dataclass
class Progress:
    """Counters since some moment (a flush's start, the daemon's start)."""

    files: int = 0
    bytes: int = 0
    failures: int = 0


class SyncEngine:
    def __init__(
        self,
        trackers: Sequence[ChangeTracker],
        ledger: Ledger,
        uploader_factory: Callable[[Callable[[UploadResult], None]], Uploader],
        wake: Callable[[], None] = lambda: None,
        retries: RetryQueue[Path, PendingFile] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        node: JobNode | None = None,
        claim: RankClaim | None = None,
    ) -> None:
        """clock: monotonic seconds for retries and sealing (the trackers have their own);
        wall_clock_ns: the time files' ctimes are compared to; node: this node of a multi-node
        job, which seals its part of each set (None: a single node); claim: whether it may
        (see SetSealer)."""
        self.trackers = tuple(trackers)
        self.ledger = ledger
        self.planner = Planner()
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._results: queue.Queue[UploadResult] = queue.Queue()
        self._wake = wake
        self.uploader = uploader_factory(self._deliver)
        self.bucket = self.uploader.bucket
        self._in_flight_limit = max(2, self.uploader.max_concurrency * 2)
        # Failed uploads wait here (botocore has retried each request already).
        self.retries: RetryQueue[Path, PendingFile] = (
            RetryQueue(clock=clock) if retries is None else retries)  # an empty one is falsy
        self._uploading: dict[UploadJob, PendingFile] = {}
        # Uploads taken back before they began (see put_newest_first): pending again once
        # their result (CANCELLED) comes.
        self._withdrawn: set[UploadJob] = set()
        self._withdrawn_hold_until = 0.0  # new submissions wait for them until then
        self._refused: set[Path] = set()  # names S3 cannot take, warned about once
        self._skipped: set[Path] = set()  # symlinks not recorded, FIFOs, ...: warned once
        self._cut_short_seen: dict[Path, Snapshot] = {}  # file_cut_short said for this version
        self._uploaded = UploadedThisRun()
        self.totals = Progress()
        self.last_upload_at: float | None = None
        self._observers: list[Callable[[UploadResult], None]] = []
        self._part_of = None if node is None else node.part_of
        # Sets sealed before this process knew of them (a disk that outlived its state
        # directory): files the ledger has no row for are judged against them first.
        self._sealed_sets = SealedSets(self.uploader.store, node, wall_clock_ns())
        self._backslashes = BackslashKeys(self.uploader.store)
        # Sealed versions kept restorable while new ones replace them (sync.sets.held).
        markers = {tracker.watch.prefix: tracker.watch.complete_when for tracker in self.trackers}
        self._held = HeldCopies(
            self.uploader.store, self._sealed_sets, node=node,
            multipart=MultipartNotes(ledger, self.bucket),
            waits_for_marker=lambda prefix, name: may_wait_for_marker(markers.get(prefix, ()),
                                                                      name))
        self.sealer = SetSealer(ledger, self.uploader.store, self.trackers, clock, wall_clock_ns,
                                node, claim, self._revive_for_links, self._sealed_sets,
                                self._held)
        # Files the start's scan found that the ledger has no row for, by the version found:
        # judged against their set's sealed manifest before they are sent (once each).
        self._unjudged: dict[Path, FileVersion] = {}
        # Those judged to be uploaded, posted from the uploader's threads (a failure of their
        # upload is then an upload's failure, not one of judging them).
        self._judged_to_upload: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._starting = False  # the start's scan is under way
        # Files older than the version their sealed set holds in S3, by the version found
        # (sync.sets.sealed): not uploaded over it, nor queued again until they change.
        self._stale: dict[Path, FileVersion] = {}
        # Files retention had deleted from S3 that are uploaded again for a link of another set
        # alone (see _revive_for_links): their own pruned set is not revived with them.
        # With the version revived (size, mtime_ns): a later version is the set's own change.
        self._for_links_only: dict[Path, tuple[int, int]] = {}
        self.throughput = ThroughputMeter()
        self._seal_due = 0.0
        self._last_scan = clock()  # the start's scan (reconcile), then each rescan
        self._scan_owed = False  # a flush asked for a scan now (scan_soon)
        self._awaited_scan = False  # the scan under way is one a flush asked for
        self._failures: dict[Path, str] = {}  # failing files: why the last upload failed
        self._last_scan_wall_ns = wall_clock_ns()
        self._periodic: Iterator[bool] | None = None  # a periodic scan under way
        self._periodic_queued = 0  # files it queued so far
        # Uploads and local deletions seen so far, only ever counted up: a pruner compares
        # it with the count when it last pruned, and never writes it.
        self.changes = 0

    def add_observer(self, observer: Callable[[UploadResult], None]) -> None:
        self._observers.append(observer)

    def _deliver(self, result: UploadResult) -> None:
        self._results.put(result)
        self._wake()

    def reconcile(self, quiet_seconds: float) -> int:
        """Startup scan: queue what the ledger lacks; recently changed files must settle first;
        seal the sets left unsealed (SetSealer.resume)."""
        for tracker in self.trackers:
            self._resume_unsettled(tracker)
        self._last_scan, self._last_scan_wall_ns = self._clock(), self._wall_clock_ns()
        self._starting = True
        try:
            return sum(self._scan(tracker, quiet_seconds) for tracker in self.trackers)
        finally:
            self._starting = False

    def _resume_unsettled(self, tracker: ChangeTracker) -> None:
        self.sealer.resume(_set_ref(tracker, name) for name in self.ledger.unsettled_sets(
            self.bucket, object_key(tracker.watch.prefix, "")))

    def _scan(self, tracker: ChangeTracker, quiet_seconds: float,
              changed_since_ns: int | None = None) -> int:
        """Queue what the ledger lacks; changed_since_ns: only files changed (mtime, or ctime:
        renamed or linked into place) since then, which every scan before has compared."""
        return sum(self._scan_steps(tracker, quiet_seconds, changed_since_ns))

    def _scan_steps(self, tracker: ChangeTracker, quiet_seconds: float,
                    changed_since_ns: int | None) -> Iterator[bool]:
        """_scan, one file at a time: whether each file looked at was queued. None of a root
        that leads where another entry watches (ChangeTracker.overlapping): theirs."""
        now_ns = self._wall_clock_ns()
        newest_allowed = now_ns - int(quiet_seconds * 1e9)
        for path, stat, relative in scanned_files(tracker, partial(self._not_regular, tracker),
                                                  tracker.note_unreadable, changed_since_ns):
            if relative is None:
                yield False
            elif stat.st_mtime_ns > newest_allowed:  # may still be being written
                # Invariant: a file uploaded (or uploading) in the version found waits for
                # nothing: had it changed since, its size or mtime would say so, or its inode
                # had it been replaced (_known: the same test a settled file meets). Marked
                # unsettled, the newest save, uploaded the moment it closed, would hold a
                # notice's flush for quiet_seconds after its last write.
                if not self._has_version(tracker, path, relative, stat):
                    tracker.mark_quiet_for(path, (now_ns - stat.st_mtime_ns) / 1e9)
                yield False
            else:
                yield self._queue_if_changed(tracker, path, relative, stat)

    def _rescan_if_events_lost(self) -> None:
        """Invariant: files whose events the kernel dropped (its inotify queue overflowed
        under a burst of writes) are found all the same: every watched directory is scanned
        again, as at a start, every file compared (a directory renamed in keeps its files'
        mtimes and ctimes, older than the last scan: only the lost event spoke of them)."""
        if not events_were_lost():
            return
        log.warning("events_lost", detail="the kernel dropped file events (inotify queue "
                    "overflow): scanning the watched directories again")
        self._rescan("events_lost", every_file=True)

    def rescan_when_due(self, interval: float) -> None:
        """Scan every watched directory again once `interval` seconds passed since the last
        scan. Invariant: a change inotify never reports is uploaded all the same, within the
        interval: writes through a memory mapping (numpy.memmap, a storage mapped from the
        file) make no event after the file's descriptor is closed, and the file as uploaded at
        that close would otherwise stay in S3, sealed, for good.

        Invariant: the loop that drives the engine gets its turn back within about
        RESCAN_SLICE_SECONDS, however many files the directories hold (every file is stat'ed,
        a network round trip each on a shared file system): it tells the trainer of notices
        and keeps systemd's watchdog fed meanwhile. The scan goes on at the next call."""
        if self._periodic is None:
            if self._clock() - self._last_scan < interval and not self._scan_owed:
                return
            self._awaited_scan, self._scan_owed = self._scan_owed, False
            since = self._rescan_since(every_file=False)
            self._periodic = chain.from_iterable(
                self._scan_steps(tracker, tracker.quiet_seconds, since)
                for tracker in self.trackers)
            self._periodic_queued = 0
        slice_ends = time.monotonic() + RESCAN_SLICE_SECONDS
        for queued in self._periodic:
            self._periodic_queued += queued
            if time.monotonic() >= slice_ends:
                return
        self._periodic = None
        self._awaited_scan = False
        # Said when it found something: a periodic scan that finds nothing is the usual case.
        (log.info if self._periodic_queued else log.debug)(
            "rescan_done", reason="periodic", pending=self._periodic_queued,
            unsettled=self.unsettled())

    def scan_soon(self) -> None:
        """A flush starts: the next rescan_when_due scans at once (right after the one under
        way, if any), and the flush settles only once that scan is done, or its time for
        files being written is over (flush_settled). Invariant: a flush misses no change
        inotify never reported (a write through a memory mapping, or through a hard link from
        outside the watched directory) because the last scan was a moment before it."""
        self._scan_owed = True

    def _scan_awaited(self) -> bool:
        """A scan a flush asked for (scan_soon) is still to come or under way."""
        return self._scan_owed or self._awaited_scan

    def _rescan(self, reason: str, every_file: bool = False) -> None:
        """Scan again, at once, for files changed since the last scan began (see
        _rescan_since); every_file: compare every file, whatever its timestamps."""
        since = self._rescan_since(every_file)
        queued = sum(self._scan(tracker, tracker.quiet_seconds, since)
                     for tracker in self.trackers)
        log.info("rescan_done", reason=reason, pending=queued, unsettled=self.unsettled())

    def _rescan_since(self, every_file: bool) -> int | None:
        """When a scan starting now looks for changes from: the last scan's start, less a
        margin for the coarse timestamps of some file systems (the ledger is asked about those
        files alone); None with every_file. Records this scan as the last one."""
        now, now_wall_ns = self._clock(), self._wall_clock_ns()
        # The last scan's start by the wall clock then, or by the monotonic time elapsed since,
        # whichever is earlier: a wall clock stepped back since (NTP) gives later changes
        # mtimes before the wall time it read then.
        began_ns = min(self._last_scan_wall_ns,
                       now_wall_ns - int((now - self._last_scan) * 1e9))
        self._last_scan, self._last_scan_wall_ns = now, now_wall_ns
        return None if every_file else began_ns - RESCAN_MARGIN_NS

    def collect_settled(self) -> None:
        self._rescan_if_events_lost()
        for tracker in self.trackers:
            if tracker.keep_watching(self.trackers):  # back: its sets a start left unsealed
                self._resume_unsettled(tracker)
            removed = tracker.take_removed()
            self._cancel_stale_uploads([*removed, *tracker.take_written()])
            for path in removed:
                self.changes += 1
                relative = tracker.relative(path)
                if relative is not None:
                    self._sealed_sets.touched(tracker.watch.prefix, set_name_of(relative))
                for item in self.planner.remove_under(path):
                    log.debug("pending_dropped", path=str(item.path), reason="deleted")
                for gone in files_at_or_below(path, list(self.retries.waiting_keys())):
                    self.retries.forget(gone)
                self._uploaded.forget_at_or_below(path)
                # What is remembered of a file's version found (judged, stale, cut short).
                for remembered in (self._unjudged, self._stale, self._cut_short_seen):
                    for gone in files_at_or_below(path, list(remembered)):
                        del remembered[gone]
            for path in tracker.take_settled():
                try:
                    stat = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    closed = (tracker.closed_folder(path) if isinstance(exc, PermissionError)
                              else None)
                    if closed is not None:  # a folder closed after it was watched
                        tracker.note_unreadable(closed, exc, watched=True)
                        continue
                    log.warning("file_unreadable", path=str(path), error=exc.strerror)
                    continue
                if not _is_regular(stat) and not stat_module.S_ISDIR(stat.st_mode):
                    self._not_regular(tracker, path)
                    continue
                if not self._consider(tracker, path, stat):
                    continue
                if self.uploader.is_uploading(path):
                    # A newer version settled while the old one uploads: stop the stale upload.
                    self.uploader.cancel(path)
                if stat.st_nlink > 1:
                    self._mark_other_links(path, stat)

    def _mark_other_links(self, path: Path, stat: os.stat_result) -> None:
        """Invariant: a file hard-linked under several names ends equal to its final bytes
        under each of them. inotify reports a write only under the name it went through, so
        when a new version of a linked file settles, the other names uploaded with its inode
        are looked at again as if just closed (only a changed version gets here, so two names
        never keep marking each other)."""
        for other in self._uploaded.other_names(path, stat.st_ino):
            for tracker in self.trackers:
                tracker.mark(other, closed=True)  # only the tracker whose root holds it

    def _cancel_stale_uploads(self, touched: list[Path]) -> None:
        """Invariant: an upload whose file is deleted, renamed away or written to stops as
        soon as the tracker hears of it, not once the new version settles or the last byte
        is sent (the CRT would send the file it opened to the end), as far as the store can
        stop it without a request landing later (a single PutObject on the CRT runs to its
        response: ObjectStore.upload_file). The uploader removes what a cancelled upload of a
        vanished file may have written; a changed file is uploaded again once it settles."""
        if not touched or not self._uploading:
            return
        uploading = {job.path: job for job in self._uploading}
        stale = {path for touched_path in touched
                 for path in files_at_or_below(touched_path, uploading.keys())}
        for path in stale:
            if not _is_unchanged(uploading[path]):
                self.uploader.cancel(path)

    def _consider(self, tracker: ChangeTracker, path: Path, stat: os.stat_result) -> bool:
        relative = tracker.relative(path)
        return relative is not None and self._queue_if_changed(tracker, path, relative, stat)

    def _queue_if_changed(self, tracker: ChangeTracker, path: Path, relative: str,
                          stat: os.stat_result) -> bool:
        """Queue a file the ledger does not have in this version; True when queued."""
        found = self._version(tracker, path, relative, stat, refuse=True)
        if found is None or self._known(path, *found):
            return False
        key, snapshot = found
        if self._cut_short(tracker, path, key, snapshot):
            return False
        if self._starting and self.ledger.recorded_size(self.bucket, key) is None:
            self._unjudged[path] = snapshot.version
        self.planner.add(PendingFile(path, key, snapshot, _set_ref(tracker, relative)))
        self.retries.drop_waiting(path)  # the new version goes now; the old retry is moot
        return True

    def _cut_short(self, tracker: ChangeTracker, path: Path, key: str,
                   snapshot: Snapshot) -> bool:
        """Invariant: a file whose own format says it is cut short (sync.formats: a trainer
        killed mid-save in place, its close reported by the kernel like any other) is never
        uploaded: the object in S3 keeps the version before, and its set's manifest stays as
        it was. The file counts as still being written (ChangeTracker.hold_cut_short: its set
        unsealed, a flush waiting for it and then reporting it), and is looked at again at its
        next event or quiet interval, whichever comes first. Said once per version."""
        try:
            verdict = formats.check(path)
        except Exception:  # unreadable, gone, or cut while read: the upload meets it as it is
            return False
        if not verdict.cut_short:
            self._cut_short_seen.pop(path, None)
            return False
        tracker.hold_cut_short(path)
        if self._cut_short_seen.get(path) != snapshot:
            self._cut_short_seen[path] = snapshot
            log.warning("file_cut_short", path=printable_path(path), format=verdict.format,
                        reason=verdict.reason, size=snapshot.size,
                        detail="not uploaded: S3 keeps the version before; uploaded once a "
                               "complete version is written")
        return True

    def _known(self, path: Path, key: str, snapshot: Snapshot) -> bool:
        """Whether this version of the file is uploaded, uploading or waiting to retry.
        Invariant: one version of a file is uploaded once. The same version may settle again
        while it uploads (a directory renamed into place also reports each file moved)."""
        return ((self._recorded_as_is(path, key, snapshot)
                 and not self._rewritten_since_upload(path, snapshot))
                or self._stale.get(path) == snapshot.version
                or UploadJob(path, key, snapshot) in self._uploading
                or self._retry_waits_for(path, snapshot))

    def _recorded_as_is(self, path: Path, key: str, snapshot: Snapshot) -> bool:
        """scan_rule.recorded_as_is: the rule `spotwatch status` counts by too."""
        return recorded_as_is(self.ledger, self.bucket, path, key, snapshot)

    def _has_version(self, tracker: ChangeTracker, path: Path, relative: str,
                     stat: os.stat_result) -> bool:
        """Whether a file a scan found is known (see _known) in the version found."""
        found = self._version(tracker, path, relative, stat, refuse=False)
        return found is not None and self._known(path, *found)

    def _version(self, tracker: ChangeTracker, path: Path, relative: str,
                 stat: os.stat_result, *, refuse: bool) -> tuple[str, Snapshot] | None:
        """The key and version of a regular file that can be stored; None for any other (a
        name S3 cannot take is refused, and said, when refuse is set)."""
        if not _is_regular(stat):
            return None
        try:
            return storable_version(tracker, relative, stat, self._part_of)
        except ValueError as exc:
            if refuse:
                self._refuse(path, str(exc))
            return None

    def _retry_waits_for(self, path: Path, snapshot: Snapshot) -> bool:
        """Whether this very version already waits for its next attempt: a scan that finds it
        again must not cut its backoff short (a file that fails for good would otherwise be
        tried again at every scan)."""
        waiting = self.retries.waiting(path)
        return waiting is not None and waiting.snapshot.version == snapshot.version

    def _rewritten_since_upload(self, path: Path, snapshot: Snapshot) -> bool:
        """Invariant: a file replaced by another of the same size and mtime (saved under a
        temporary name with the old mtime, then renamed over it) is uploaded again: its inode
        tells, where the size and mtime the ledger keeps cannot. Not its ctime: linking the
        file under another name or changing its mode changes that, not its bytes, and a
        trainer linking an unchanged shard into every step would upload it again each time."""
        uploaded = self._uploaded.get(path)
        return uploaded is not None and uploaded.inode != snapshot.inode

    def refused(self) -> list[Path]:
        """The files still there whose names S3 cannot take (path_refused): not uploaded, their
        sets left unsealed. A file renamed since (to a name S3 takes) is uploaded as any."""
        return sorted(path for path in self._refused if os.path.lexists(path))

    def _refuse(self, path: Path, reason: str) -> None:
        """A file S3 cannot store is skipped with one warning, however often it settles: one
        odd name must never stop the others."""
        if path not in self._refused:
            self._refused.add(path)
            log.warning("path_refused", path=printable_path(path), reason=reason)

    def _not_regular(self, tracker: ChangeTracker, path: Path) -> None:
        """Only regular files are uploaded. A symlink that leads to something inside the
        watched directory is recorded instead (sync.links): its set is sealed again whenever
        the link leads elsewhere than the set's manifest in S3 says (a trainer re-pointing
        `last.ckpt` at every save). Any other link is not followed (its target may lie
        outside the watched directory and change with no event seen), and a FIFO, socket or
        device holds no bytes to keep. Either is neither uploaded nor listed in its set's
        manifest, and says so once, so that a set saved with one is not thought whole."""
        relative = tracker.relative(path)
        if relative is None:
            return
        if not os.path.islink(path):
            self._skip(path, "special_file_skipped",
                       detail="not a regular file (a FIFO, socket or device): not uploaded")
            return
        try:
            key = storable_key(tracker.watch.prefix, relative, self._part_of)
        except ValueError as exc:
            self._refuse(path, str(exc))
            return
        try:
            link = link_entry(tracker.root, path, relative)
        except LinkSkipped as exc:
            link = None
            self._skip(path, "symlink_skipped", reason=str(exc),
                       detail="symlinks are not followed: save the file itself to upload it")
        set_ref = _set_ref(tracker, relative)
        # What S3 lists of the link: a manifest on its way lists the links as they were when
        # it was sent, while the ledger still holds those of the manifest before it.
        on_the_way = self.sealer.links_on_the_way(set_ref)
        sealed = (self.ledger.link_target(self.bucket, key) if on_the_way is None
                  else on_the_way.get(relative))
        if sealed != (None if link is None else link.target):
            self.sealer.mark_dirty(set_ref)
            self._revive_retired(set_ref)  # a set retention removed changed: whole again

    def _skip(self, path: Path, event: str, **fields: str) -> None:
        if path not in self._skipped:
            self._skipped.add(path)
            log.warning(event, path=printable_path(path), **fields)

    def pump(self, upload: bool) -> None:
        """Handle finished uploads, then (when allowed) start more, newest set first."""
        self._handle_results()
        self._release_retries()
        self._seal_finished_sets()
        # The withdrawn go first in line once all are back; not waited for longer than
        # WITHDRAWN_HOLD_SECONDS (s3transfer may dequeue a cancelled multipart upload only
        # once the parts ahead of it went): then they go in their set's turn as they come.
        if not upload or (self._withdrawn and self._clock() < self._withdrawn_hold_until):
            return
        # Those taken back send nothing more: they hold no room.
        room = self._in_flight_limit - (self.uploader.in_flight() - len(self._withdrawn))
        if room <= 0 or not self.planner:
            return
        for item in self.planner.take(room, self.uploader.is_uploading):
            job = UploadJob(item.path, item.key, item.snapshot)
            self._uploading[job] = item
            if self.uploader.uses_multipart(job.snapshot.size):
                # Remembered so that a kill -9 mid-upload leaves no parts behind (see orphans).
                self._ledger_write(self.ledger.multipart_started, job.key)
            self.uploader.submit(job, partial(
                self._before_upload, job, item.set_ref,
                self._unjudged.get(job.path) == job.snapshot.version))

    def _before_upload(self, job: UploadJob, set_ref: SetRef,
                       unjudged: bool) -> UploadResult | Future[None] | None:
        """On the uploader's precheck thread, before the file is sent: a file the start
        found unknown to the ledger is judged against its sealed set (None: it is uploaded),
        and the sealed version the upload replaces is held (sync.sets.held: the copy the
        upload waits for; its StoreError fails the upload, to be retried)."""
        if BACKSLASH in job.key and not self._backslashes.kept(set_ref.prefix):
            # Invariant: no file is sent under a key the store would keep as another (over
            # that one's object, where no restore finds it): it fails for good, named.
            return UploadResult(job, Outcome.FAILED, 0.0, permanent=True, error=(
                "the store takes '\\' in a key for '/' (it would keep this file under "
                "another name, over that one's object): rename it"))
        if unjudged:
            judged = self._judge_against_sealed(job, set_ref)
            if judged is not None:
                return judged
        return self._held.protect(set_ref.prefix, set_ref.name, job.key)

    def _judge_against_sealed(self, job: UploadJob, set_ref: SetRef) -> UploadResult | None:
        """On an uploader thread, before a file the start found and the ledger has no row
        for is sent: the result that stands for its upload when its set's sealed manifest
        in S3 lists this version or a newer one (see sync.sets.sealed); None to upload it.

        Only files found at the start are judged: those are what a disk that outlived its
        state directory holds, and until they are judged this process has changed nothing
        of their sets (a set waits for its pending files), so what it read of S3 for them
        still holds. A file written or revived since is this process's own to upload."""
        judged = self._sealed_sets.judge(set_ref.prefix, set_ref.name, job.key,
                                         job.snapshot.version)
        entry = judged.entry
        if judged.verdict is Verdict.UPLOAD or entry is None:
            self._judged_to_upload.put(job.path)
            return None
        if judged.verdict is Verdict.STALE:
            return UploadResult(job, Outcome.STALE, 0.0, checksum=entry.checksum)
        return UploadResult(job, Outcome.ADOPTED, 0.0, checksum=entry.checksum,
                            part_size=entry.part_size,
                            checksum_algorithm=entry.checksum_algorithm, etag=entry.etag,
                            sealed_at=judged.sealed_at)

    def _ledger_write(self, write: Callable[..., None], *args: object) -> bool:
        """Ledger writes may fail (disk full); the upload itself is safe, so carry on."""
        try:
            write(self.bucket, *args)
        except LedgerError as exc:
            log.error("ledger_write_failed", error=str(exc), key=str(args[0]))
            return False
        return True

    def put_newest_first(self) -> None:
        """Invariant: a flush uploads newest set first, also when a backlog of older sets
        was handed to the store before it began (the store runs them in the order given, so
        the newest checkpoint would wait for all of them). Uploads that have not begun are
        taken back and go pending again, to be handed over anew in the planner's order."""
        taken = [job for job in list(self._uploading)
                 if job not in self._withdrawn and self.uploader.withdraw(job.path)]
        if taken:
            self._withdrawn.update(taken)
            self._withdrawn_hold_until = self._clock() + WITHDRAWN_HOLD_SECONDS
            log.info("uploads_taken_back", files=len(taken), keys=[job.key for job in taken][:20],
                     detail="not begun: they go again in newest-set-first order")

    def remaining_work(self) -> list[PendingFile]:
        """What a flush still has to upload, in order: uploading first, then pending."""
        return list(self._uploading.values()) + self.retries.items() + self.planner.ordered()

    def pending_files(self) -> int:
        """Files not yet durable: queued, waiting to retry, or uploading.

        Invariant 8 (status and metrics never report less pending work than exists) rests on
        this count and on outstanding_bytes: both cover all three places a file can wait in.
        """
        return len(self.planner) + len(self.retries) + len(self._uploading)

    def outstanding_bytes(self) -> int:
        """Bytes still to upload: pending, waiting to retry, or uploading."""
        return (self.planner.pending_bytes + sum(i.snapshot.size for i in self.retries.items())
                + sum(job.snapshot.size for job in self._uploading))

    def _uploads_left(self) -> bool:
        """Files pending, uploading or waiting to be retried."""
        return bool(self.planner or self.retries or self._uploading)

    def flush_settled(self, deadline: float | None, writes_until: float | None = None) -> bool:
        """A flush with this deadline (monotonic) has nothing left to wait for: every file is
        durable, or failing, or due for its retry only after the deadline (see
        RetryQueue.holds_up), and every set that can be sealed is sealed.

        Invariant: a flush waits for files being written only until writes_until (None: for
        as long as they are written). A file that never settles (a log appended to all the
        time) must not hold a flush forever; the flush reports it (see being_written), and
        its set, held by it, stays unsealed."""
        if self.planner or self._uploading:
            return False
        # A scan the flush asked for holds it as a file being written does: only so long.
        if ((self.unsettled() or self._scan_awaited())
                and (writes_until is None or self._clock() < writes_until)):
            return False
        if any(self.retries.holds_up(path, deadline) for path in self.retries.waiting_keys()):
            return False
        held = {item.set_key for item in self.retries.items()} | self._set_keys_being_written()
        return self.sealer.unsealed() <= held

    def being_written(self) -> list[Path]:
        """Files still being written (not settled), in path order; those under an excluded
        name too (staged_writes: the trainer is still saving)."""
        return sorted(path for tracker in self.trackers
                      for paths in (tracker.unsettled_paths(), tracker.staged_writes())
                      for path in paths)

    def left_behind(self, deadline: float | None) -> list[PendingFile]:
        """Files waiting to retry that a flush with this deadline does not wait for."""
        return [item for item in self.retries.items()
                if not self.retries.holds_up(item.path, deadline)]

    def idle(self) -> bool:
        """Nothing pending, uploading or waiting for its set's manifest."""
        return not self._uploads_left() and not self.sealer

    def _seal_finished_sets(self) -> None:
        self.sealer.release_finished()
        now = self._clock()
        # Throttled while uploads run (the check walks every file still being written and
        # every set touched since its manifest), but not once the last upload is done: at the
        # end of a flush the manifest is the last thing missing.
        if not self.sealer or (self._uploads_left() and now < self._seal_due):
            return
        self._seal_due = now + SEAL_CHECK_SECONDS
        self.sealer.seal_ready(self._busy_set_keys())

    def report_sets_left_behind(self, deadline: float | None) -> None:
        """A flush is over: the sets it could not seal because of files it left behind (see
        left_behind) are checked now, so each is reported incomplete (log, status, metric)
        instead of waiting in silence for a retry that may never succeed."""
        left = {item.path for item in self.left_behind(deadline)}
        if left:
            self.sealer.seal_ready(self._busy_set_keys(left_behind=left))

    def _busy_set_keys(self, left_behind: AbstractSet[Path] = frozenset()) -> set[str]:
        """Sets that may still change: a file queued, uploading, being written, or waiting
        for a retry that may still succeed (one a flush would wait for). A set held back only
        by failing files is not busy: the sealer reports it incomplete."""
        busy = self.planner.set_keys()
        busy.update(item.set_key for item in self.retries.items()
                    if item.path not in left_behind and self.retries.holds_up(item.path, None))
        busy.update(item.set_key for item in self._uploading.values())
        return busy | self._set_keys_being_written()

    def hurry(self, until: float | None) -> None:
        """A flush's deadline runs until then (monotonic; None: none runs any more): files and
        manifest writes failing for a transient reason are retried within seconds and waited
        for (RetryQueue.hurry), both, since a set's files alone are no checkpoint."""
        self.retries.hurry(until)
        self.sealer.hurry(until)
        self._held.hurry(until)
        self.uploader.store.hurry(until is not None)

    def sets_with_files_pending(self) -> set[str]:
        """Sets with a file queued, uploading or waiting for a retry: not sealed as they are
        now, whether or not the sealer has heard of them yet (it hears of a set from its first
        upload's result)."""
        return (self.planner.set_keys() | {item.set_key for item in self.retries.items()}
                | {item.set_key for item in self._uploading.values()})

    def _set_keys_being_written(self) -> set[str]:
        """Sets with a file being written (not settled yet), under an excluded name too: a
        model.pt.tmp still written in step_2/ holds step_2 (see staged_writes)."""
        keys: set[str] = set()
        for tracker in self.trackers:
            for path in tracker.unsettled_paths():
                relative = tracker.relative(path)
                if relative is not None:
                    keys.add(_set_ref(tracker, relative).key)
            keys.update(_set_ref(tracker, relative).key
                        for relative in tracker.staged_writes().values())
        return keys

    def reseal_after_deletions(self, keys: list[str]) -> None:
        self.sealer.reseal_after_deletions(keys)

    def unsettled(self) -> int:
        return sum(t.unsettled_count() + len(t.staged_writes()) for t in self.trackers)

    def _release_retries(self) -> None:
        for item in self.retries.take_due():
            if item.path not in self.planner:
                self.planner.add(item)

    def _handle_results(self) -> None:
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return
            # Observers (metrics, the flush's progress) hear what the engine made of it: an
            # upload whose ledger entry could not be written is a failure, not a file done.
            result = self._handle(result)
            for observer in self._observers:
                observer(result)

    def failure_of(self, path: Path) -> str | None:
        """Why the file's last upload failed, while it is failing (the flush names it)."""
        return self._failures.get(path)

    def _handle(self, result: UploadResult) -> UploadResult:
        job = result.job
        item = self._uploading.pop(job)
        self._failures.pop(job.path, None)  # its last word, if it fails again, is set below
        if self.uploader.uses_multipart(job.snapshot.size) and not result.multipart_leftovers:
            self._ledger_write(self.ledger.multipart_finished, job.key)
        if job in self._withdrawn:
            self._withdrawn.discard(job)
            if result.outcome is Outcome.CANCELLED and _is_unchanged(job):
                self.planner.add(item)  # never began: pending again, in its set's turn
                return result
        fields = {"path": str(job.path), "key": job.key, "size": job.snapshot.size,
                  "seconds": round(result.seconds, 3)}
        if result.outcome in (Outcome.DONE, Outcome.ADOPTED) and not self._ledger_write(
                self.ledger.record, job.key, job.path, job.snapshot.version, result.checksum,
                result.part_size, result.checksum_algorithm, result.etag, job.snapshot.inode,
                result.sealed_at):
            # Unrecorded, the file could be left out of its set's manifest: keep it pending
            # (its set stays unsealed) and upload it again once the ledger can be written.
            result = UploadResult(job, Outcome.FAILED, result.seconds, error="ledger not written")
        while not self._judged_to_upload.empty():
            self._unjudged.pop(self._judged_to_upload.get(), None)
        if result.outcome not in (Outcome.CANCELLED, Outcome.FAILED):  # else judged again
            self._unjudged.pop(job.path, None)
        if result.outcome is Outcome.ADOPTED:
            # Its set's manifest lists it as it is: nothing to seal again.
            self.retries.succeeded(job.path)
            self._uploaded.add(job.path, job.snapshot)
            self.sealer.adopted(item.set_ref)
            log.info("upload_skipped", **fields, reason="its set is sealed in S3 with this "
                     "version already")
        elif result.outcome is Outcome.STALE:
            self.retries.succeeded(job.path)
            self._stale[job.path] = job.snapshot.version
            log.warning("stale_local_file", **fields, reason="older than the version its "
                        "set was sealed with in S3, which is kept: not uploaded over it")
        elif result.outcome is Outcome.DONE:
            self.changes += 1
            self.totals.files += 1
            self.totals.bytes += job.snapshot.size
            self.last_upload_at = time.time()
            self.throughput.record(job.snapshot.size, result.seconds)
            self.retries.succeeded(job.path)
            self._uploaded.add(job.path, job.snapshot)
            log.info("upload_done", **fields, checksum=result.checksum)
            revived = self._for_links_only.pop(job.path, None)
            if revived == (job.snapshot.size, job.snapshot.mtime_ns):
                # The sets whose links need it are checked again (SetSealer._revived); its own
                # set, pruned, stays so: sealed again, it would want all its files uploaded.
                self.sealer.check_linking(item.set_ref.key)
            else:
                self.sealer.mark_dirty(item.set_ref)
                self._revive_retired(item.set_ref)
        elif result.outcome in (Outcome.CHANGED, Outcome.CANCELLED):
            # The tracker sees the newer write and queues it again once it settles; if it
            # already settled, it is pending now. Requeue from disk to be sure nothing is lost.
            log.info("upload_superseded", **fields, reason=result.outcome.value)
            self._requeue_from_disk(job.path)
        elif result.outcome is Outcome.VANISHED:
            self.retries.forget(job.path)
            self._for_links_only.pop(job.path, None)
            log.info("upload_skipped", **fields, reason="file deleted",
                     object_removed=result.object_removed)
            if result.object_removed:
                # Any older version the ledger lists is gone from S3 too: forget it, and
                # rewrite the set's manifest without it.
                self._ledger_write(self.ledger.forget, job.key)
                self.sealer.mark_dirty(item.set_ref)
        else:
            self.totals.failures += 1
            self._failures[job.path] = result.error or result.outcome.value
            delay = self.retries.failed(job.path, item, permanent=result.permanent)
            # Invariant: a set with a file that failed is never out of sight, even when no
            # file of it got through: unsealed while the file may still, incomplete (log,
            # status, metric) once it is failing. Not one whose file failed before it was
            # judged against the set sealed in S3 (S3 unreachable): sealed from disk, that set
            # could lose what it was sealed with; the file stays pending, and failing.
            if self._unjudged.get(job.path) != job.snapshot.version:
                self.sealer.mark_dirty(item.set_ref)
            log.warning("upload_failed", **fields, error=result.error,
                        attempts=self.retries.failures(job.path),
                        failing=self.retries.is_failing(job.path), retry_in=round(delay, 1))
        return result

    def _revive_retired(self, set_ref: SetRef,
                        below: str | None = None) -> list[tuple[Path, os.stat_result]]:
        """Invariant: a set pruned by retention that changes again (a file rewritten or added,
        or a link pointed elsewhere, while the others stay as they were) is uploaded whole
        again. Its unchanged files were
        deleted from S3 but are current in the ledger: never uploaded again, they would keep
        the set from being sealed for good, and its new work out of reach of restore.

        below: only the objects at or below this key (a file or directory of the set's watched
        directory), instead of the set's. Returns the files queued again."""
        key = set_ref.key if below is None else below
        try:
            keys = self.ledger.revive_retired(self.bucket, key)
        except LedgerError as exc:
            log.error("ledger_write_failed", error=str(exc), key=key)
            return []
        tracker = next((t for t in self.trackers if t.root == set_ref.root), None)
        if tracker is None:
            return []
        prefix = object_key(set_ref.prefix, "")
        queued = []
        for key in keys:
            # Where the key says, below the watched directory as configured now.
            path = set_ref.root / key[len(prefix):]
            try:
                stat = os.stat(path, follow_symlinks=False)
            except OSError:
                continue  # gone: the set is sealed without it
            if self._consider(tracker, path, stat):
                queued.append((path, stat))
        return queued

    def _revive_for_links(self, set_ref: SetRef, linked: Sequence[str]) -> bool:
        """The files of other sets (paths below set_ref's watched directory) that set_ref's
        links need and that retention deleted from S3 are queued again, alone (see
        SetSealer._revived); whether any was. Once durable they are kept in S3 while a kept
        set's manifest lists them (Manifest.linked_files)."""
        queued = [revived for relative in linked
                  for revived in self._revive_retired(set_ref,
                                                     object_key(set_ref.prefix, relative))]
        if queued:
            log.info("linked_files_revived", set=set_ref.key, files=len(queued),
                     paths=[printable_path(path) for path, _ in queued[:20]],
                     detail="retention had deleted them from S3: uploaded again for the set's "
                            "links")
        self._for_links_only.update((path, (stat.st_size, stat.st_mtime_ns))
                                    for path, stat in queued)
        return bool(queued)

    def _requeue_from_disk(self, path: Path) -> None:
        if path in self.planner:
            return
        for tracker in self.trackers:
            if tracker.relative(path) is not None:
                tracker.expect_change(path)
                return

    def close(self) -> None:
        """Stop at once: requests still in flight are abandoned, never waited for (a stop is
        bounded by sync.stop_timeout). No result is handled after this, so nothing writes to
        the closed ledger, and an abandoned multipart upload keeps its multipart_started row
        for the next start to abort."""
        self.uploader.shutdown()  # stops every upload, a copy under way (the store's) too
        self._held.close()  # copies not begun never begin
        self.sealer.close()
        self.ledger.close()


def _set_ref(tracker: ChangeTracker, relative: str) -> SetRef:
    return SetRef(tracker.watch.prefix, set_name_of(relative), tracker.root)


def _is_unchanged(job: UploadJob) -> bool:
    """Whether the file is still the version the job uploads (events also come for writes
    that change nothing, e.g. a directory renamed into place reports each file again)."""
    try:
        return Snapshot.of(os.stat(job.path, follow_symlinks=False)) == job.snapshot
    except OSError:
        return False


def _is_regular(stat: os.stat_result) -> bool:
    return stat_module.S_ISREG(stat.st_mode)
