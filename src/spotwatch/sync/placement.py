"""Moving a verified set into place: the whole set lands, or the destination is left as it was.

Each file's bytes wait under a temporary name beside its target
(sync.restore.destination.temporary); once the whole set checked out they are renamed into
place. A rename can still be refused (a sticky folder where the file in the way is another
user's, a full disk, an I/O error) or a stop can come between two renames: either would leave
part of the set in place. So what is in the way is first kept under a second name (a hard link,
else renamed aside, which also tells before the first rename whether the file in the way may be
replaced), the renames run with SIGINT, SIGTERM and SIGHUP held, and a failure takes back what
was placed and puts back what was there, ledger rows included.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from types import FrameType
from typing import Protocol

from spotwatch.console import names
from spotwatch.keys import restore_temporary_for
from spotwatch.logs import printable_path

# A stop asked by the user or a supervisor (Ctrl-C, `timeout`, systemd, a closed session).
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class NotPlaced(Exception):
    """The set could not be moved into place; the message says why and what was left."""


class Journal(Protocol):
    """What the ledger records of the set, around its renames (None: nothing recorded)."""

    def begin(self) -> None:
        """Before the first rename."""

    def placing(self, index: int) -> None:
        """Just before the file of this index is renamed into place."""

    def end(self) -> None:
        """Once every file is in place."""

    def revert(self) -> None:
        """The ledger as it was before begin(); raises when it cannot be written."""


@contextmanager
def signals_held(stopping: Sequence[int] = STOPPING) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait while the block runs, then act as they would have (the
    restore command's handlers raise KeyboardInterrupt): a stop never falls between two
    renames, however many files the set has. Handlers run on the main thread only, so on
    another thread nothing needs holding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)  # no lock: a handler runs between any two bytecodes

    previous = {}
    for number in stopping:
        handler = signal.getsignal(number)
        if handler is not None and handler != signal.SIG_IGN:  # None: not set from Python
            previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):
            signal.raise_signal(number)


def kept_name(target: Path, taken: Collection[Path]) -> Path:
    """Where what is at the target is kept until the set is in place: hidden and named as a
    restore's temporary (a restore stopped by kill -9 leaves it for the next to remove, and a
    daemon never uploads it), never the name of one of the set's own temporaries (taken)."""
    kept = target.with_name(restore_temporary_for(target.name, ".kept"))
    if kept in taken:
        kept = target.with_name(restore_temporary_for(target.name, ".kept", by_digest=True))
    return kept


@dataclass
class _Kept:
    target: Path
    copy: Path
    moved: bool  # renamed aside (the target is empty now), not linked


@dataclass
class _Placing:
    moves: Sequence[tuple[Path, Path]]  # (temporary, target)
    kept: dict[Path, _Kept] = field(default_factory=dict)  # by target
    placed: list[Path] = field(default_factory=list)  # targets, in order
    current: Path | None = None  # the target being worked on

    def keep_what_is_in_the_way(self) -> None:
        taken = {temp for temp, _ in self.moves}
        for _, target in self.moves:
            self.current = target
            try:
                there = os.lstat(target)
            except FileNotFoundError:
                continue
            if S_ISDIR(there.st_mode):  # one made during the downloads: never moved aside
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
            copy = kept_name(target, taken)
            with suppress(FileNotFoundError):
                os.unlink(copy)  # a stopped restore's: a link would not go over it
            try:
                os.link(target, copy, follow_symlinks=False)
                self.kept[target] = _Kept(target, copy, moved=False)
            except OSError:  # no hard links here, or not to another user's file
                os.replace(target, copy)
                self.kept[target] = _Kept(target, copy, moved=True)

    def place(self, journal: Journal | None) -> None:
        for index, (temp, target) in enumerate(self.moves):
            self.current = target
            if journal is not None:
                journal.placing(index)
            os.replace(temp, target)
            self.placed.append(target)

    def drop_kept(self) -> None:
        for kept in self.kept.values():
            with suppress(OSError):  # left hidden: the next restore removes it
                os.unlink(kept.copy)

    def put_back_unplaced(self) -> None:
        """What was moved aside from a target not yet placed goes back to it (the ledger could
        not be put back, so what was placed stays): nothing a user had is left under a name
        the next restore removes."""
        placed = set(self.placed)
        for kept in self.kept.values():
            if kept.target in placed:
                continue
            with suppress(OSError):
                if kept.moved:
                    os.replace(kept.copy, kept.target)
                else:
                    os.unlink(kept.copy)  # a second name of the file still there

    def take_back(self) -> list[str]:
        """Every target as it was; the ones that could not be put back."""
        failed = []
        placed = set(self.placed)
        for _, target in reversed(self.moves):
            kept = self.kept.get(target)
            try:
                if kept is not None and (kept.moved or target in placed):
                    os.replace(kept.copy, target)  # over the file placed, if any
                elif kept is not None:
                    os.unlink(kept.copy)  # still a second name of the file there
                elif target in placed:
                    os.unlink(target)  # its bytes are in S3
            except OSError as exc:
                failed.append(f"{printable_path(target)} ({exc.strerror})")
        return failed


def place_all(moves: Sequence[tuple[Path, Path]], journal: Journal | None,
              name: Callable[[Path], str] = printable_path) -> None:
    """Rename each temporary onto its target, every one or none (NotPlaced, the destination
    as it was); call with signals_held(). name: how a target is named in the error."""
    placing = _Placing(moves)
    try:
        placing.keep_what_is_in_the_way()
    except OSError as exc:
        failed = placing.take_back()
        raise NotPlaced(_why(f"cannot replace {_named(placing, name)}: {exc.strerror}", failed,
                             "nothing of the set was placed")) from None
    try:
        if journal is not None:
            journal.begin()
        placing.place(journal)
        if journal is not None:
            journal.end()
    except BaseException as exc:
        try:
            if journal is not None:
                journal.revert()  # first: no row may stay for a file taken back
        except Exception as ledger_exc:  # the files stay: each placed one is recorded as it is
            placing.put_back_unplaced()
            raise NotPlaced(f"{_what(exc, placing, name)}; the ledger could not be put back "
                            f"({ledger_exc}): {len(placing.placed)} of {len(moves)} files "
                            f"of the set are in place") from None
        failed = placing.take_back()
        if not isinstance(exc, Exception):
            raise
        raise NotPlaced(_why(_what(exc, placing, name), failed,
                             "the destination is as it was")) from None
    placing.drop_kept()


def _named(placing: _Placing, name: Callable[[Path], str]) -> str:
    return name(placing.current) if placing.current is not None else "the set"


def _what(exc: BaseException, placing: _Placing, name: Callable[[Path], str]) -> str:
    if isinstance(exc, OSError):
        return f"cannot move {_named(placing, name)} into place: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def _why(what: str, failed: Sequence[str], outcome: str) -> str:
    if failed:
        outcome = f"{len(failed)} files could not be put back as they were: {names(failed)}"
    return f"{what}; {outcome}"
