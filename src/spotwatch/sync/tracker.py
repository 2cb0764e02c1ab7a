"""Turns watchdog events into settled files: complete, not half-written, ready to upload.

The handler only records paths and times; a file settles once it was closed after writing (or
renamed into place) and nothing touched it for ``settle_seconds``, or, without such an event,
after ``quiet_seconds`` of no events at all, unless a process still holds it open for
writing (see open_writers).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch

from spotwatch.config import WatchDir, nested
from spotwatch.keys import RESERVED_SET, is_reserved, is_restore_temporary
from spotwatch.logs import get_logger, printable_path
from spotwatch.sync import inotify_fix
from spotwatch.sync.filters import PathFilter
from spotwatch.sync.settle_rule import take_ended
from spotwatch.sync.staged_writes import StagedWrites
from spotwatch.sync.subtree import Folders, prefix_below

log = get_logger("spotwatch.tracker")

_CONTENT_EVENTS = {"created", "modified"}
# What the tracker reacts to. watchdog turns this into the inotify mask, so the kernel never
# reports opens and reads: uploading a file (or a trainer reading one) costs no events.
_WATCHED_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
                   DirCreatedEvent, DirMovedEvent, FileDeletedEvent, DirDeletedEvent]
# How often directories spotwatch may not read are looked at again.
UNREADABLE_RECHECK_SECONDS = 1.0


# The event time of a file ready now (renamed into place, or closed at shutdown): older than
# any settle interval.
_READY_NOW = float("-inf")


class _EventsLost(logging.Filter):
    """Notes watchdog's report that the kernel's inotify queue overflowed. watchdog (7.1 and
    later; earlier ones dropped the report unsaid) then watches again but says only in this
    log record that events were lost, so the files they were about would wait, unseen, for
    the next start."""

    LOGGER = "watchdog.observers.inotify_c"
    MESSAGE = "Inotify queue overflowed"

    def __init__(self) -> None:
        super().__init__()
        self._seen = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.MESSAGE):
            self._seen.set()
        return True

    def install(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        if self not in logger.filters:
            logger.addFilter(self)
            # Made and seen at any log level (a filter runs only for records made).
            logger.setLevel(logging.WARNING)

    def take(self) -> bool:
        seen = self._seen.is_set()
        self._seen.clear()
        return seen


_events_lost = _EventsLost()


def events_were_lost() -> bool:
    """Whether file events were lost (inotify queue overflow) since the last call."""
    return _events_lost.take()


@dataclass
class _Candidate:
    last_event: float
    closed: bool
    # When the quiet rule may look again at a file found held open for writing.
    recheck_at: float = float("-inf")


@dataclass(frozen=True)
class _Watched:
    """The watch on a root, and which directory (st_dev, st_ino) it was put on, at which
    path (the root's, or where the root's symlink led then)."""

    watch: ObservedWatch
    directory: tuple[int, int] | None
    target: str
    target_prefix: str


def _directory_identity(path: Path, follow_symlinks: bool = False) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory at path (or, following symlinks, the one it leads
    to); None when there is none."""
    try:
        stat = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino) if stat_module.S_ISDIR(stat.st_mode) else None


def walk_files(root: Path, on_other: Callable[[Path], None] | None = None,
               on_unreadable: Callable[[Path, OSError], None] | None = None,
               ) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under root with their lstat. Symlinks are never followed: each, and each
    FIFO, socket or device, is passed to on_other instead. A directory that exists but cannot
    be listed, or whose entries cannot be looked at (no read or search permission), is passed
    to on_unreadable, once: its files are unknown, not absent."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished: its files get events of their own if they return
        except OSError as exc:
            if on_unreadable is not None:
                on_unreadable(directory, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
                elif on_other is not None:
                    on_other(Path(entry.path))
            except FileNotFoundError:
                continue
            except OSError as exc:  # listable but not searchable: so are all its entries
                if on_unreadable is not None:
                    on_unreadable(directory, exc)
                break


def listing_error(directory: Path) -> OSError | None:
    """Why the files of this directory cannot be read (None: they can, or it is gone)."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)  # needs search permission
                break
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return exc
    return None


class ChangeTracker(FileSystemEventHandler):
    def __init__(
        self,
        watch: WatchDir,
        settle_seconds: float,
        quiet_seconds: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watch = watch
        # The path as configured, not resolved: a watched path that is a symlink
        # (checkpoints -> runs/7/checkpoints) is followed to wherever it leads now.
        # ('..' is kept for the kernel to follow, not cut off with the component before it.)
        self.root = watch.path.absolute()
        self._root_prefix = prefix_below(self.root)
        self.filter = PathFilter.for_watch(watch)
        self._staging = PathFilter.staging_names(watch)
        self._settle = settle_seconds
        self._quiet = quiet_seconds
        self._on_change = on_change
        self._clock = clock
        self._candidates: dict[Path, _Candidate] = {}
        self._candidate_folders = Folders()
        self._removed: list[Path] = []
        self._written: set[Path] = set()  # files written to since take_written
        self._staged = StagedWrites(settle_seconds, quiet_seconds, clock)
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._watched: _Watched | None = None
        self._missing_reported = False  # watch_dir_missing logged since the root went
        self._overlap_reported = False  # watch_dir_overlaps logged since it began
        # Leads where another entry watches (keep_watching): neither watched nor scanned.
        self.overlapping = False
        self._watch_failure_reported = False  # watch_failed logged since the last watch
        # Directories spotwatch may not read (their files unknown) -> why, and the watches put
        # on such directories once they could be read (the root's watch never got one).
        self._unreadable: dict[Path, str] = {}
        self._late_watches: dict[Path, ObservedWatch] = {}
        # Those of them closed after they were watched (closed_folder), by the directory they
        # were then: watched still, unless another has taken its path since.
        self._closed_while_watched: dict[Path, tuple[int, int] | None] = {}
        self._unreadable_checked_at = float("-inf")
        self._reserved_reported = False  # reserved_name_skipped logged

    @property
    def quiet_seconds(self) -> float:
        return self._quiet

    def watch_with(self, observer: BaseObserver) -> None:
        _events_lost.install()
        inotify_fix.install()
        self._observer = observer
        try:
            self._watch_root(observer)
        except (FileNotFoundError, NotADirectoryError):  # not there yet: keep_watching names
            self._watched = None  # it, and watches it once made

    def _watch_root(self, observer: BaseObserver) -> None:
        # watchdog follows no symlink (nor should it below the root): it watches the
        # directory the root leads to, and on_any_event names its files by the root.
        target = self.root.resolve()
        directory = _directory_identity(target)  # resolved already
        if directory is None:  # not scheduled: an observer not started yet would fail to start
            raise FileNotFoundError(errno.ENOENT, "no watched directory", str(self.root))
        watch = observer.schedule(self, str(target), recursive=True,
                                  event_filter=_WATCHED_EVENTS)
        self._watched = _Watched(watch, directory, str(target), prefix_below(target))

    def _below_root(self, event_path: bytes | str) -> Path:
        """An event's path named below the root as configured rather than below the
        directory it led to when the watch was put on."""
        path = os.fsdecode(event_path)
        watched = self._watched
        if watched is not None and path.startswith(watched.target_prefix):
            return Path(self._root_prefix + path[len(watched.target_prefix):])
        if watched is not None and path == watched.target:
            return self.root
        return Path(path)

    def keep_watching(self, others: Sequence[ChangeTracker] = ()) -> bool:
        """Invariant: a watched directory deleted and made again, or moved away and replaced,
        or a watched symlink pointed at another directory, is watched again as soon as it is
        back (inotify watches the directory, not its path: its watch ends with it, or
        follows it elsewhere). The files found in it then wait for a close or the quiet
        interval, as files of any directory watched late do.

        Invariant 6 holds as the links change too: a watched symlink pointed into (or over)
        the directory another entry watches (others) is not watched there, which would
        upload the same files under two prefixes; named once, and watched again once it
        leads elsewhere. True when the root was watched anew (watch_dir_back)."""
        observer = self._observer
        if observer is None:
            return False
        self._recheck_unreadable(observer)
        if not self._watch_lost(observer):
            return False
        if self._watched is not None:  # on a directory gone, or no longer the root's
            with contextlib.suppress(KeyError):
                observer.unschedule(self._watched.watch)
            self._watched = None
        if _directory_identity(self.root, follow_symlinks=True) is None:
            if not self._missing_reported:
                self._missing_reported = True
                log.warning("watch_dir_missing", path=printable_path(self.root),
                            detail="its files are uploaded once it is back")
            return False
        self.overlapping = self._overlaps(others)
        if self.overlapping:
            self.take_settled()  # seen before it led there: theirs now, not this entry's
            return False
        try:
            self._watch_root(observer)
        except (FileNotFoundError, NotADirectoryError):  # gone again: tried on the next call
            return False
        except OSError as exc:  # the inotify watch limit (ENOSPC), too many open files ...
            if not self._watch_failure_reported:
                self._watch_failure_reported = True
                log.error("watch_failed", path=printable_path(self.root),
                          error=exc.strerror or str(exc),
                          detail="its files are not watched; tried again meanwhile (raise "
                                 "fs.inotify.max_user_watches for a large tree)")
            return False
        self._watch_failure_reported = False
        self._missing_reported = False
        log.info("watch_dir_back", path=printable_path(self.root),
                 directory=printable_path(self.root.resolve()))
        self._drop_late_watches(observer, self.root)  # the new root watch covers them
        for path, _ in walk_files(self.root, on_unreadable=self.note_unreadable):
            self.mark(path, closed=False)
        return True

    def missing(self) -> bool:
        """Whether the root is out of sight: no directory there."""
        return _directory_identity(self.root, follow_symlinks=True) is None

    def watched_directory(self) -> Path | None:
        """The directory the root's watch is on (where its symlink led then); None: none."""
        return None if self._watched is None else Path(self._watched.target)

    def _overlaps(self, others: Sequence[ChangeTracker]) -> bool:
        """Whether the root now leads to, into or over a directory another entry watches."""
        target = self.root.resolve()
        other = next((tracker for tracker in others if tracker is not self
                      and (theirs := tracker.watched_directory()) is not None
                      and nested(target, theirs)),
                     None)
        if other is None:
            self._overlap_reported = False
            return False
        if not self._overlap_reported:
            self._overlap_reported = True
            log.warning("watch_dir_overlaps", path=printable_path(self.root),
                        directory=printable_path(target), other=printable_path(other.root),
                        detail="not watched while it leads where another watch entry watches: "
                               "its files would go under two prefixes")
        return True

    def note_unreadable(self, directory: Path, error: OSError, watched: bool = False) -> None:
        """Invariant: a directory whose files spotwatch may not read (a trainer of another
        user with umask 077, or a tempfile.mkdtemp staging directory renamed into place) is
        never skipped in silence. It is named once (dir_unreadable), reported in status, keeps
        its set unsealed (the sealer's walk meets it too), and is looked at again every
        UNREADABLE_RECHECK_SECONDS: once readable it is watched and its files upload."""
        if not self.may_hold_files(directory):
            return
        with self._lock:
            if directory in self._unreadable:
                return
            self._unreadable[directory] = error.strerror or str(error)
            if watched:
                self._closed_while_watched[directory] = _directory_identity(directory)
        log.warning("dir_unreadable", path=printable_path(directory), error=error.strerror,
                    detail="its files are not uploaded until spotwatch may read it")

    def closed_folder(self, path: Path) -> Path | None:
        """The highest folder from the root down to the path's own whose files may not be read
        now: one a trainer of another user closed (chmod 700) after it was watched, whose
        files' events still come, but not their bytes. None when none is (opened again since,
        or the file refused by other means than its folders' modes)."""
        return next((folder for folder in reversed(path.parents)
                     if folder.is_relative_to(self.root) and listing_error(folder) is not None),
                    None)

    def may_hold_files(self, directory: Path) -> bool:
        """Whether a file below this directory may be one to upload. Includes may take back
        files below a directory the excludes cover, so with includes any directory may."""
        if directory == self.root:
            return True
        text = str(directory)
        if not text.startswith(self._root_prefix) or is_reserved(text[len(self._root_prefix):]):
            return False
        return bool(self.watch.include) or self.relative(directory / "_") is not None

    def unreadable_dirs(self) -> list[Path]:
        with self._lock:
            return sorted(self._unreadable)

    def _recheck_unreadable(self, observer: BaseObserver) -> None:
        now = self._clock()
        if not self._unreadable or now - self._unreadable_checked_at < UNREADABLE_RECHECK_SECONDS:
            return
        self._unreadable_checked_at = now
        for directory in self.unreadable_dirs():
            if listing_error(directory) is not None:
                continue
            with self._lock:
                del self._unreadable[directory]
                closed_as = self._closed_while_watched.pop(directory, None)
            identity = _directory_identity(directory)
            if identity is None:
                continue  # gone: nothing of it to upload
            watched = closed_as == identity  # not one deleted and made again meanwhile
            log.info("dir_readable", path=printable_path(directory))
            if not watched:  # its inotify watch outlived the chmod: no second one
                self._watch_late(observer, directory)
            for path, _ in walk_files(directory, on_unreadable=self.note_unreadable):
                self.mark(path, closed=False)

    def _watch_late(self, observer: BaseObserver, directory: Path) -> None:
        """inotify could not watch the directory while it was unreadable, and watchdog does
        not try again: it gets a watch of its own (ended with it, or with the root's)."""
        self._drop_late_watches(observer, directory)
        try:
            self._late_watches[directory] = observer.schedule(
                self, str(directory), recursive=True, event_filter=_WATCHED_EVENTS)
        except OSError as exc:  # gone or unreadable again: looked at again later
            self.note_unreadable(directory, exc)

    def _drop_late_watches(self, observer: BaseObserver, below: Path) -> None:
        for directory in [d for d in self._late_watches if d.is_relative_to(below)]:
            with contextlib.suppress(KeyError):
                observer.unschedule(self._late_watches.pop(directory))

    def _watch_lost(self, observer: BaseObserver) -> bool:
        """No watch, or its emitter ended (its directory was deleted), or the path names
        another directory than the watched one (or none)."""
        watched = self._watched
        if watched is None:
            return True
        ended = any(emitter.watch == watched.watch and emitter.stopped_event.is_set()
                    for emitter in observer.emitters)
        return ended or _directory_identity(self.root, follow_symlinks=True) != watched.directory

    def _relative_text(self, path: Path) -> str | None:
        """The path relative to the watched root; None for the root itself, a path outside
        it, or a restore's temporary."""
        text = str(path)
        if not text.startswith(self._root_prefix):
            return None
        rel = text[len(self._root_prefix):]
        return None if not rel or is_restore_temporary(rel) else rel

    def relative(self, path: Path) -> str | None:
        """The path relative to the watched root, or None when outside it, filtered out, in
        spotwatch's own key space (keys.is_reserved) or a restore's temporary."""
        rel = self._relative_text(path)
        # Invariant: a path named as a save stages it (config.STAGING_NAMES) is never uploaded,
        # whatever the filters say: configured excludes replace the defaults, and an include
        # such as step_*/*.pt takes step_3.tmp/model.pt back in, which would seal and restore
        # half a save as the newest checkpoint.
        if rel is None or not self.filter.accepts(rel) or not self._staging.accepts(rel):
            return None
        if is_reserved(rel):
            self._report_reserved()
            return None
        return rel

    def excluded_relative(self, path: Path) -> str | None:
        """The path relative to the watched root when it is named as a save stages it
        (config.STAGING_NAMES: a temporary name, a staging directory), which is never
        uploaded; else None. Other excluded files (a log appended all the time, say) are none
        of a checkpoint's and hold nothing."""
        rel = self._relative_text(path)
        if rel is None or is_reserved(rel) or self._staging.accepts(rel):
            return None
        return rel

    def _report_reserved(self) -> None:
        """What lies in spotwatch's own key space below the root is never uploaded; said
        once, so that a user's own files there are not left out unseen."""
        if not self._reserved_reported:
            self._reserved_reported = True
            log.warning("reserved_name_skipped", path=printable_path(self.root / RESERVED_SET),
                        detail="spotwatch's own key space (manifests): never uploaded; "
                               "rename it to have it uploaded")

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        src = self._below_root(event.src_path)
        if kind == "moved":
            self._forget(src)
            # A rename is how writers publish a finished file (or a whole step_N/ directory):
            # it is ready now, with no settle interval to wait out.
            dest = self._below_root(event.dest_path)
            # watchdog calls a symlink to a directory a directory (it replays the links in a
            # directory moved in as moves of their own): a link, never followed.
            if event.is_directory and not os.path.islink(dest):
                self._mark_tree(dest)
            else:
                self.mark(dest, closed=True, at=_READY_NOW)
            # Only now, with what it published marked: a flush looking in between would see
            # the trainer done writing with nothing pending, and end before the checkpoint.
            self._staged.end(src)
        elif kind == "deleted":
            # The root's own deletion says nothing its files' deletions did not, and may
            # arrive after the root was made again and watched anew (see keep_watching).
            if src != self.root:
                self._forget(src)
                self._staged.end(src)
        elif event.is_directory:
            if kind == "created":
                error = listing_error(src)
                if error is not None:
                    self.note_unreadable(src, error)
            return
        elif kind in _CONTENT_EVENTS:
            self._note_written(src)
            # watchdog replays the files of a new directory as creations: synthetic ones come
            # from a directory moved in whole (published, like a renamed file); others may
            # have been written before the directory was watched, so they wait for a close or
            # the quiet interval.
            if getattr(event, "is_synthetic", False):
                self.mark(src, closed=True, at=_READY_NOW)
            else:
                self.mark(src, closed=False)
                self._note_staged(src, closed=False)
        elif kind == "closed":
            self._note_written(src)
            if os.path.lexists(src):  # a file deleted while open still reports its close
                self.mark(src, closed=True)
                self._note_staged(src, closed=True)
        else:
            return
        self._on_change()

    def mark(self, path: Path, closed: bool, at: float | None = None, *,
             unless_marked: bool = False) -> None:
        """The file is being written (closed: its last event was its close). unless_marked:
        leave a write already marked as it is (an event came since: it decides)."""
        if self.relative(path) is None:
            return
        with self._lock:
            if path not in self._candidates:
                self._candidate_folders.add(path)
            elif unless_marked:
                return
            self._candidates[path] = _Candidate(self._clock() if at is None else at, closed)

    def hold_cut_short(self, path: Path) -> None:
        """A settled file whose format says it is cut short (sync.formats): it counts as still
        being written (status, its set's manifest, a flush's wait) and settles again at its
        next event, or by the quiet rule once quiet_seconds pass with no writer holding it,
        when it is looked at again: a complete save made with no event seen (a rescan's
        find) then goes up too. An event since it settled decides instead: the writer was
        not done, and its file settles as any."""
        self.mark(path, closed=False, unless_marked=True)

    def _note_staged(self, path: Path, closed: bool) -> None:
        relative = self.excluded_relative(path)
        if relative is not None:
            self._staged.note(path, relative, closed)

    def staged_writes(self) -> dict[Path, str]:
        """Excluded files still being written (see staged_writes) -> their relative path."""
        return self._staged.active()

    def mark_quiet_for(self, path: Path, seconds: float) -> None:
        """A file found unclosed that has not changed for `seconds` (its mtime's age).

        Invariant: a file never seen closed settles quiet_seconds after its last change, not
        after spotwatch first saw it: a startup scan (and a one-shot flush, which sees no
        close events) must not add a whole quiet interval to a file already quiet. A file
        the events already speak of keeps what they said: a rescan finding one just closed
        must not make it wait quiet_seconds instead of settle_seconds."""
        with self._lock:
            if path in self._candidates:
                return
        self.mark(path, closed=False, at=self._clock() - max(0.0, seconds))

    def expect_change(self, path: Path) -> None:
        """A file known to have changed: keep its pending events, or wait for it to go quiet."""
        with self._lock:
            if path in self._candidates:
                return
        self.mark(path, closed=False)

    def _mark_tree(self, directory: Path) -> None:
        for path, _ in walk_files(directory, on_unreadable=self.note_unreadable):
            self.mark(path, closed=True, at=_READY_NOW)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._removed.append(path)
            for candidate in self._candidate_folders.at_or_below(path, self._candidates.keys()):
                del self._candidates[candidate]

    def _note_written(self, path: Path) -> None:
        with self._lock:
            self._written.add(path)

    def take_written(self) -> set[Path]:
        """Files written to (or created) since the last call, settled or not."""
        with self._lock:
            written, self._written = self._written, set()
        return written

    def take_settled(self) -> list[Path]:
        """Files settled now: closed and left alone for settle_seconds, or never seen closed
        and quiet for quiet_seconds.

        Invariant (enforced in sync.settle_rule): the quiet rule settles no file a process
        still holds open for writing (a writer pausing mid-save): it stays being written
        (status, its set's manifest, a flush wait for it) until its close settles it as usual,
        or until no writer holds it at a later quiet expiry."""
        return take_ended(self._candidates, self._lock, self._clock(), self._settle,
                          self._quiet)

    def take_removed(self) -> list[Path]:
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    def unsettled_paths(self) -> list[Path]:
        with self._lock:
            return list(self._candidates)

    def unsettled_count(self) -> int:
        with self._lock:
            return len(self._candidates)

    def settle_all_closed(self) -> None:
        """On shutdown: closed files need not wait out the settle interval."""
        with self._lock:
            for candidate in self._candidates.values():
                if candidate.closed:
                    candidate.last_event = _READY_NOW
