"""Downloading the files of a set into temporaries, many at once, each checked against its
manifest entry before it counts.

Up to a window of downloads is under way at once. The store's threads or the CRT's own
connections move the bytes, and no thread here waits on any one download (a thread per download
cost a fifth of a small-file restore's CPU in wake-ups). A download whose bytes the store
checked on the way only gets its mtime; one it could not check is read back on a checker thread.

The temporaries are made on a thread of their own, in order and at most a window ahead of the
downloads that fill them, not by whoever starts a download: the CRT opens its file in
make_request, holding the GIL, so every file created there stalled the CRT's callbacks too. Where
creating a file is slow it is what a small-file restore waits on (on ext4 without a journal,
each create scans the inodes deleted in the last minute: after deleting 4,000 files, 2,000
creates took 1.8 s), and made apart it overlaps the downloads (2.6 s to 2.3 s for 2,000 x 64 KiB
there; no change where creating is fast).

The first failure stops new downloads and cancels those under way; it is raised once every
download has ended, so no temporary is still being written when the caller removes them. The
set's completeness check (one listing) runs beside the downloads instead of before them, and a
set it finds incomplete is SetIncomplete whatever else failed.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Literal

from spotwatch.aws.store import ObjectStore, PendingDownload
from spotwatch.checksums import ContentMismatch, expected, file_matches
from spotwatch.progress import Progress
from spotwatch.sync.sets.manifest import ManifestEntry

# Downloads under way at once: at least this many, so that the CRT, which runs as many
# requests as its throughput target asks for, always has the next ones queued.
MIN_WINDOW = 64
WINDOW_PER_WORKER = 4


class SetCorrupt(Exception):
    """A file of the set does not match its manifest entry."""


class SetIncomplete(Exception):
    """An object the manifest lists is missing from the store or has another size."""


@dataclass(frozen=True)
class FileToFetch:
    entry: ManifestEntry
    temp: Path  # where its bytes go until the whole set checks out
    part_size: int | None  # of its composite checksum, if it has one


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


_Kind = Literal["made", "downloaded", "checked", "complete", "all made"]
# A file's temporary made (no future), or a future done.
_Event = tuple[_Kind, FileToFetch | None, Future[bool] | None]


class _TemporaryMaker:
    """Makes the files' temporaries (empty) in order on a thread of its own, at most `ahead`
    of those whose downloads began (taken), and says so for each; temps gets each one made."""

    def __init__(self, files: Sequence[FileToFetch], temps: list[Path], ahead: int,
                 made: Callable[[FileToFetch], None]) -> None:
        self._files = files
        self._temps = temps
        self._ahead = ahead
        self._room = threading.Semaphore(ahead)
        self._stopped = threading.Event()
        self._made = made

    def run(self) -> bool:
        for file in self._files:
            self._room.acquire()
            if self._stopped.is_set():
                break
            os.close(os.open(file.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                             0o666))
            self._temps.append(file.temp)  # ours now: the caller removes it
            self._made(file)
        return True

    def taken(self) -> None:
        """A made temporary's download began: one more may be made."""
        self._room.release()

    def stop(self) -> None:
        """Make no more (a maker waiting for room wakes up to stop)."""
        self._stopped.set()
        self._room.release(self._ahead)


class _SetFetch:
    """One fetch_verified call: the main loop reacts to events the downloads and checks post."""

    def __init__(self, store: ObjectStore, files: Sequence[FileToFetch], preferred: str,
                 progress: Progress, temps: list[Path]) -> None:
        self._store = store
        self._preferred = preferred
        self._progress = progress
        self._window = max(MIN_WINDOW, WINDOW_PER_WORKER * store.max_concurrency)
        self._events: SimpleQueue[_Event] = SimpleQueue()
        self._under_way: dict[FileToFetch, PendingDownload] = {}
        # Downloads, checks and the completeness check whose events are still to come.
        self._futures: set[Future[bool]] = set()
        self._failure: BaseException | None = None
        self._incomplete = False
        self._checker = ThreadPoolExecutor(max_workers=max(1, store.max_concurrency),
                                           thread_name_prefix="restore-check")
        self._making = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-make")
        self._made: deque[FileToFetch] = deque()  # temporaries made, downloads not begun
        self._maker = _TemporaryMaker(files, temps, self._window, self._post_made)

    def run(self, complete: Callable[[], bool] | None) -> None:
        try:
            if complete is not None:
                self._watch("complete", None, self._checker.submit(complete))
            self._watch("all made", None, self._making.submit(self._maker.run))
            while True:
                while self._failure is None and self._made and \
                        len(self._under_way) < self._window:
                    self._start(self._made.popleft())
                if not self._futures:
                    break
                self._handle(*self._events.get())
        except BaseException as exc:  # KeyboardInterrupt: stop, and wait for every download
            self._fail(exc)
            wait(self._futures)  # not by the events, one of which this may have cut short
            raise
        finally:
            self._checker.shutdown(wait=True)
            self._making.shutdown(wait=True)
        if self._incomplete:
            raise SetIncomplete()
        if self._failure is not None:
            raise self._failure

    def _post_made(self, file: FileToFetch) -> None:
        self._events.put(("made", file, None))

    def _watch(self, kind: _Kind, file: FileToFetch | None, future: Future[bool]) -> None:
        """Post an event once the future is done."""
        self._futures.add(future)
        future.add_done_callback(lambda done: self._events.put((kind, file, done)))

    def _start(self, file: FileToFetch) -> None:
        self._maker.taken()
        try:
            entry = file.entry
            check = expected(entry.checksum, file.part_size, self._preferred,
                             entry.checksum_algorithm) if entry.checksum else None
            pending = self._store.start_download(entry.key, file.temp, entry.size,
                                                 self._progress, check)
        except Exception as exc:  # e.g. ChecksumUnavailable: no download started
            self._fail(exc)
            return
        self._under_way[file] = pending
        self._watch("downloaded", file, pending.future)

    def _handle(self, kind: _Kind, file: FileToFetch | None, future: Future[bool] | None
                ) -> None:
        if future is None:  # made
            assert file is not None
            self._made.append(file)
            return
        self._futures.discard(future)
        # A download cancelled before it began has no exception to ask for: it raises one.
        error = CancelledError() if future.cancelled() else future.exception()
        if kind == "all made":
            if error is not None:  # e.g. the file system refused one
                self._fail(error)
            return
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
        if error is not None:
            self._fail(SetCorrupt(str(error)) if isinstance(error, ContentMismatch) else error)
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
        self._maker.stop()
        for pending in self._under_way.values():
            pending.cancel()


def fetch_verified(store: ObjectStore, files: Sequence[FileToFetch], preferred: str,
                   progress: Progress, temps: list[Path],
                   complete: Callable[[], bool] | None = None) -> None:
    """Download every file to its temporary and check it against its entry, and give it the
    entry's mtime; temps gets each temporary once made, for the caller to remove
    should anything fail. complete: the set's completeness check, run beside the downloads.

    preferred: the configured checksum algorithm (see checksums.expected). Raises SetCorrupt
    when a file's bytes differ from its entry, SetIncomplete when complete() says so."""
    _SetFetch(store, files, preferred, progress, temps).run(complete)
