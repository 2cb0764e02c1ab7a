"""Downloading the files of a set into temporaries, many at once, each checked against its
manifest entry before it counts.

Up to a window of downloads is under way at once. The store's threads or the CRT's own
connections move the bytes, and no thread here waits on any one download (a thread per download
cost a fifth of a small-file restore's CPU in wake-ups). A download whose bytes the store
checked on the way only gets its mtime; one it could not check is read back on a checker thread.

A file whose bytes do not match is fetched again, up to MISMATCH_ATTEMPTS in all, before the
set counts as corrupt (see _retried). The first failure stops new downloads and cancels those
under way; it is raised once every download has ended, so no temporary is still being written
when the caller removes them. The set's completeness check (one listing) runs beside the
downloads instead of before them, and a set it finds incomplete is SetIncomplete whatever else
failed.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Literal

from spotwatch.aws.store import ObjectStore, PendingDownload, StoreError
from spotwatch.checksums import ContentMismatch, expected, file_matches
from spotwatch.logs import get_logger
from spotwatch.progress import Progress
from spotwatch.sync.sets.manifest import ManifestEntry

# Downloads under way at once: at least this many, and so many per download the store runs
# at once that each of its workers (the CRT: each connection) always has the next one queued.
MIN_WINDOW = 64
WINDOW_PER_WORKER = 4
# How often a file is fetched before bytes that do not match its entry make its set corrupt.
# Bytes can be damaged on the way (a proxy, a NIC, a bad cable) as well as at rest: taken for
# a corrupt set at once, one damaged response had restore hand back an older checkpoint, and
# the pointer it put back (`latest`) then sent every later restore there too. Bytes damaged at
# rest fail every attempt.
MISMATCH_ATTEMPTS = 3

log = get_logger("spotwatch.restore")


class SetCorrupt(Exception):
    """A file of the set does not match its manifest entry."""


class SetIncomplete(Exception):
    """An object the manifest lists is missing from the store or has another size."""


@dataclass(frozen=True)
class FileToFetch:
    entry: ManifestEntry
    temp: Path  # where its bytes go until the whole set checks out
    part_size: int | None  # of its composite checksum, if it has one
    # Where its bytes are read from when not its entry's key: a held copy standing in for an
    # object replaced since its set was sealed (sync.sets.held), verified as any file is.
    source: str | None = None


def verify(path: Path, entry: ManifestEntry, part_size: int | None,
           preferred: str) -> str | None:
    """Why the file is not the one the entry describes, or None when it is."""
    if entry.checksum is None:
        return "the manifest has no checksum to verify it by"
    if path.stat().st_size != entry.size:
        return "size differs from the manifest"
    if not file_matches(path, entry.checksum, part_size, preferred, entry.checksum_algorithm):
        return "checksum differs from the manifest"
    return None


_Kind = Literal["downloaded", "checked", "complete"]
_Event = tuple[_Kind, FileToFetch | None, Future[bool]]


class _SetFetch:
    """One fetch_verified call: the main loop reacts to events the downloads and checks post."""

    def __init__(self, store: ObjectStore, preferred: str, progress: Progress,
                 temps: list[Path]) -> None:
        self._store = store
        self._preferred = preferred
        self._progress = progress
        self._temps = temps
        self._window = max(MIN_WINDOW, WINDOW_PER_WORKER * store.downloads_at_once)
        self._events: SimpleQueue[_Event] = SimpleQueue()
        self._under_way: dict[FileToFetch, PendingDownload] = {}
        # Downloads, checks and the completeness check whose events are still to come.
        self._futures: set[Future[bool]] = set()
        self._failure: BaseException | None = None
        self._incomplete = False
        self._checker = ThreadPoolExecutor(max_workers=max(1, store.max_concurrency),
                                           thread_name_prefix="restore-check")
        self._attempts: dict[FileToFetch, _Attempt] = {}

    def run(self, files: Sequence[FileToFetch], complete: Callable[[], bool] | None) -> None:
        try:
            if complete is not None:
                self._watch("complete", None, self._checker.submit(complete))
            remaining = iter(files)
            while True:
                while self._failure is None and len(self._under_way) < self._window:
                    file = next(remaining, None)
                    if file is None:
                        break
                    self._start(file)
                if not self._futures:
                    break
                self._handle(*self._events.get())
        except BaseException as exc:  # KeyboardInterrupt: stop, and wait for every download
            self._fail(exc)
            wait(self._futures)  # not by the events, one of which this may have cut short
            raise
        finally:
            self._checker.shutdown(wait=True)
        if self._incomplete:
            raise SetIncomplete()
        if self._failure is not None:
            raise self._failure

    def _watch(self, kind: _Kind, file: FileToFetch | None, future: Future[bool]) -> None:
        """Post an event once the future is done."""
        self._futures.add(future)
        future.add_done_callback(lambda done: self._events.put((kind, file, done)))

    def _start(self, file: FileToFetch) -> None:
        try:
            entry = file.entry
            check = expected(entry.checksum, file.part_size, self._preferred,
                             entry.checksum_algorithm) if entry.checksum else None
            earlier = self._attempts.get(file)
            if earlier is None:
                self._temps.append(file.temp)  # before a byte is written: the caller removes it
            attempt = self._attempts[file] = _Attempt(
                self._progress, 1 if earlier is None else earlier.number + 1)
            pending = self._store.start_download(file.source or entry.key, file.temp,
                                                 entry.size, attempt.progress, check)
        except Exception as exc:  # e.g. ChecksumUnavailable: no download started
            self._fail(exc)
            return
        self._under_way[file] = pending
        self._watch("downloaded", file, pending.future)

    def _handle(self, kind: _Kind, file: FileToFetch | None, future: Future[bool]) -> None:
        self._futures.discard(future)
        # A download cancelled before it began has no exception to ask for: it raises one.
        error = CancelledError() if future.cancelled() else future.exception()
        if kind == "complete":
            if error is not None:
                self._fail(error)
            elif not future.result():
                self._incomplete = True
                self._fail(SetIncomplete())
            return
        assert file is not None
        if kind == "downloaded":
            del self._under_way[file]
        if error is not None and isinstance(error, StoreError) and file.source is not None:
            # A held copy deleted or replaced under the restore (a shorter one: a range past
            # its end): the set was sealed again meanwhile, by a daemon beside it. Incomplete
            # as read, as one whose object went would be.
            self._incomplete = True
            self._fail(SetIncomplete())
            return
        if error is not None and isinstance(error, (ContentMismatch, SetCorrupt)):
            if not self._retried(file, error):
                self._fail(SetCorrupt(str(error)))
            return
        if error is not None:
            self._fail(_naming(error, file.temp))
            return
        if self._failure is not None:
            return
        if kind == "downloaded" and not future.result():
            self._watch("checked", file, self._checker.submit(self._read_back, file))
            return
        try:
            os.utime(file.temp, ns=(file.entry.mtime_ns, file.entry.mtime_ns))
        except OSError as exc:
            self._fail(exc)

    def _retried(self, file: FileToFetch, error: BaseException) -> bool:
        """Whether the file's download started again after bytes that did not match its entry
        (or its object's own checksum), with the progress its attempt reported taken back;
        not once MISMATCH_ATTEMPTS are spent or the set has failed otherwise."""
        attempt = self._attempts[file]
        if (self._failure is not None or attempt.number >= MISMATCH_ATTEMPTS
                or file.entry.checksum is None):  # nothing that a new download could match
            return False
        log.warning("download_mismatch_retried", key=file.source or file.entry.key,
                    attempt=attempt.number + 1, of=MISMATCH_ATTEMPTS, reason=str(error))
        attempt.take_back()
        self._start(file)
        return True

    def _read_back(self, file: FileToFetch) -> bool:
        """Checks a download the store could not check on the way."""
        problem = verify(file.temp, file.entry, file.part_size, self._preferred)
        if problem is not None:
            raise SetCorrupt(f"{file.entry.key}: {problem}")
        return True

    def _fail(self, error: BaseException) -> None:
        """Keep the first failure (the downloads it cancels end in CancelledError); stop every
        download under way."""
        if self._failure is None:
            self._failure = error
        for pending in self._under_way.values():
            pending.cancel()


class _Attempt:
    """One attempt at a file's download: its number (from 1) and the bytes it reported to the
    restore's progress, which a retry takes back (ranged GETs report from several threads)."""

    def __init__(self, progress: Progress, number: int) -> None:
        self.number = number
        self._progress = progress
        self._reported = 0
        self._lock = threading.Lock()

    def progress(self, size: int) -> None:
        with self._lock:
            self._reported += size
        self._progress(size)

    def take_back(self) -> None:
        with self._lock:
            reported, self._reported = self._reported, 0
        self._progress(-reported)


# The error number an OSError raised without one stands for (the CRT reports a temporary
# removed under it as a bare FileNotFoundError); EIO for any other.
_ERRNOS: tuple[tuple[type[OSError], int], ...] = (
    (FileNotFoundError, errno.ENOENT), (PermissionError, errno.EACCES),
    (IsADirectoryError, errno.EISDIR), (NotADirectoryError, errno.ENOTDIR))


def _naming(error: BaseException, temp: Path) -> BaseException:
    """A file error that names no file as one naming the temporary it happened to: the
    restore's error line says which file and why, never just "failed:"."""
    if not isinstance(error, OSError) or error.filename is not None:
        return error
    number = error.errno or next((n for kind, n in _ERRNOS if isinstance(error, kind)),
                                 errno.EIO)
    named = OSError(number, error.strerror or os.strerror(number), str(temp))
    named.__cause__ = error
    return named


def fetch_verified(store: ObjectStore, files: Sequence[FileToFetch], preferred: str,
                   progress: Progress, temps: list[Path],
                   complete: Callable[[], bool] | None = None) -> None:
    """Download every file to its temporary and check it against its entry, and give it the
    entry's mtime; temps gets each temporary as its download starts, for the caller to remove
    should anything fail. complete: the set's completeness check, run beside the downloads.

    preferred: the configured checksum algorithm (see checksums.expected). Raises SetCorrupt
    when a file's bytes differ from its entry in each of MISMATCH_ATTEMPTS downloads,
    SetIncomplete when complete() says so."""
    _SetFetch(store, preferred, progress, temps).run(files, complete)
