"""Whether the files recorded from a watched directory were deleted or only went out of sight.

A watched directory that holds none of the sets recorded from it (an instance store wiped by a
stop and start, a freshly made volume with only its lost+found, the mount point of a volume
not mounted yet, a directory moved away) had no set deleted: they went with the file system.
Their records are set aside (Ledger.set_out_of_sight) before a restore into the directory, or
when a daemon or flush starts with it holding nothing (a lost+found at most), so that neither
the restore nor the trainer's next save, once it puts a set back there, makes the others look
deleted. A prune that finds it so mirrors nothing then, and sets nothing aside (see
set_aside_if_wiped).

Invariant: a record set aside is never mirrored as a deletion. It counts again once its file
is uploaded (or restored) again, or once its set is at its path again (the volume mounted
back): a file of it deleted after that mirrors as any. Their objects stay in S3 until
retention drops them.
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISDIR

from spotwatch.keys import object_key, set_name_of
from spotwatch.logs import get_logger
from spotwatch.sync.ledger import Ledger, LedgerError

log = get_logger("spotwatch.prune")


def unreadable(directory: Path) -> str | None:
    """Why the watched directory cannot be looked into, or None (missing is no reason: it
    holds nothing)."""
    try:
        with os.scandir(directory) as entries:
            next(entries, None)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"the watched directory cannot be read: {exc.strerror}"
    return None


def is_gone(path: Path, *, as_file: bool = False) -> bool:
    """Whether nothing is at path; as_file: whether the file uploaded from path is gone,
    nothing or a directory of its name in its place. What cannot be looked at is not taken
    for gone, nor a symlink in its place: its bytes may be where it leads (a file moved to
    another disk and linked back), which spotwatch does not follow."""
    try:
        stat = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return as_file and S_ISDIR(stat.st_mode)


def holds_none_recorded(ledger: Ledger, bucket: str, prefix: str, directory: Path) -> bool:
    """Whether the directory (watched, its keys under prefix) holds none of the sets recorded
    from it, retired and set aside ones included (False when it cannot be read). Sets set
    aside earlier that are at their paths again come back first."""
    if unreadable(directory) is not None:
        return False
    try:
        for name in _set_names(prefix, ledger.out_of_sight_keys(bucket, prefix)):
            if not is_gone(directory / name):
                ledger.bring_into_sight(bucket, object_key(prefix, name))
    except LedgerError as exc:  # they stay set aside: not mirrored, as is safe
        log.error("ledger_write_failed", path=str(directory), error=str(exc))
    recorded = [*ledger.live_keys(bucket, prefix), *ledger.retired_keys(bucket, prefix)]
    return bool(recorded) and all(is_gone(directory / name)
                                  for name in _set_names(prefix, recorded))


def set_aside_if_wiped(ledger: Ledger, bucket: str, prefix: str, directory: Path, *,
                       beside_new_sets: bool) -> bool:
    """Before a restore into the directory (beside_new_sets), or at a start of `run` or
    `flush` (not: then it must hold nothing but a file system's lost+found): whether it holds
    none of the sets recorded from it (holds_none_recorded); if so, the records of those still
    in S3 are set aside. Not at a prune, nor at a start beside a new set: a trainer that keeps
    one checkpoint deletes the last before the new one is recorded, and that is a deletion."""
    if not holds_none_recorded(ledger, bucket, prefix, directory) or (
            not beside_new_sets and _holds_anything(directory)):
        return False
    try:
        count = ledger.set_out_of_sight(bucket, prefix)
    except LedgerError as exc:
        log.error("ledger_write_failed", path=str(directory), error=str(exc))
        return True
    if count:
        log.warning("records_set_aside", path=str(directory), objects=count,
                    reason=why_none_held(directory),
                    detail="they stay in S3 and are not mirrored as deleted")
    return True


def why_none_held(directory: Path) -> str:
    """Why a watched directory holds none of its sets, as far as can be told."""
    try:
        with os.scandir(directory) as entries:
            if next(entries, None) is None:
                return "the watched directory is empty (a volume not mounted?)"
    except OSError:
        return "the watched directory is missing"
    return ("the watched directory holds none of the sets uploaded from it (a wiped or "
            "another volume?)")


def _set_names(prefix: str, keys: list[str]) -> set[str]:
    return {set_name_of(key[len(prefix):]) for key in keys}


def _holds_anything(directory: Path) -> bool:
    """Whether the directory holds an entry other than a file system's lost+found."""
    try:
        with os.scandir(directory) as entries:
            return any(entry.name != "lost+found" for entry in entries)
    except OSError:
        return False
