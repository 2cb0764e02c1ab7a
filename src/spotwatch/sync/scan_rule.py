"""Which files under the watched directories a scan finds not in S3 as they are: the one rule
the engine's scans (a start's included) and `spotwatch status` with no daemon running share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spotwatch.checksums import ChecksumUnavailable, file_matches
from spotwatch.config import Config
from spotwatch.keys import storable_key
from spotwatch.model import Snapshot
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.sets.parts import JobNode
from spotwatch.sync.tracker import ChangeTracker, walk_files


def scanned_files(tracker: ChangeTracker, on_other: Callable[[Path], None] | None = None,
                  on_unreadable: Callable[[Path, OSError], None] | None = None,
                  changed_since_ns: int | None = None,
                  ) -> Iterator[tuple[Path, os.stat_result, str | None]]:
    """Every regular file a scan of the tracker's root looks at, with its lstat and its name
    below the root; the name is None for one not to upload (filtered out, a save's staging
    name, spotwatch's own key space, a restore's temporary) or, with changed_since_ns, one
    unchanged (mtime, or ctime: renamed or linked into place) since then. Each file is yielded,
    so that a caller can hand its loop back between any two. None of a root that leads where
    another entry watches (ChangeTracker.overlapping): theirs."""
    if tracker.overlapping:
        return
    for path, stat in walk_files(tracker.root, on_other, on_unreadable):
        if (changed_since_ns is not None
                and max(stat.st_mtime_ns, stat.st_ctime_ns) < changed_since_ns):
            yield path, stat, None
        else:
            yield path, stat, tracker.relative(path)


def storable_version(tracker: ChangeTracker, relative: str, stat: os.stat_result,
                     part_of: tuple[str, int] | None) -> tuple[str, Snapshot]:
    """The key and version of a regular file below the tracker's root; ValueError when S3
    cannot take its name (keys.storable_key). part_of: this node's (job id, rank) on a node
    of a multi-node job."""
    return storable_key(tracker.watch.prefix, relative, part_of), Snapshot.of(stat)


def recorded_as_is(ledger: Ledger, bucket: str, path: Path, key: str,
                   snapshot: Snapshot) -> bool:
    """Whether the ledger holds this version of the file as the object's; where its record is
    racy (ledger.racy: whole-second mtimes), whether the bytes are those recorded, as S3's
    checksum of them says."""
    recorded = ledger.recorded_version(bucket, key, snapshot.version, snapshot.inode)
    if recorded is None or not recorded.racy:
        return recorded is not None
    if recorded.checksum is None:
        return False
    try:
        # A record without its algorithm (an older version's): those of the checksum's
        # length are tried, CRC32 first.
        return file_matches(path, recorded.checksum, recorded.part_size,
                            recorded.checksum_algorithm or "CRC32", recorded.checksum_algorithm)
    except (OSError, ChecksumUnavailable):
        return False  # unreadable or not to be checked here: uploaded, as any change


@dataclass
class NotInS3:
    """What count_not_in_s3 found: files and bytes; whether it looked at every file (complete),
    and the directories whose files it could not look at (not counted: unknown, not absent)."""

    files: int = 0
    bytes: int = 0
    complete: bool = True
    unreadable_dirs: list[str] = field(default_factory=list)


def count_not_in_s3(config: Config, ledger: Ledger | None, bucket: str,
                    max_files: int) -> NotInS3:
    """The files a start's scan would upload, or wait for as still being written: those the
    ledger (None: none yet) does not hold in the version on disk. For `spotwatch status` with
    no daemon running, whose last report may predate them (a kill). Reads only; stops after
    looking at max_files files (complete False: more may be there)."""
    found = NotInS3()
    node = JobNode.of(config.job)
    part_of = None if node is None else node.part_of
    looked_at = 0
    for watch in config.watch:
        tracker = ChangeTracker(watch, config.sync.settle_seconds, config.sync.quiet_seconds)

        def unreadable(directory: Path, _: OSError, tracker: ChangeTracker = tracker) -> None:
            # The rule the daemon's own dir_unreadable follows: only a directory that may
            # hold files to upload is one whose files are missing from the count.
            if tracker.may_hold_files(directory) and str(directory) not in found.unreadable_dirs:
                found.unreadable_dirs.append(str(directory))

        for path, stat, relative in scanned_files(tracker, on_unreadable=unreadable):
            if looked_at >= max_files:
                found.complete = False
                return found
            looked_at += 1
            if relative is None:
                continue
            try:
                key, snapshot = storable_version(tracker, relative, stat, part_of)
            except ValueError:  # a name S3 cannot take: never uploaded, so never pending
                continue
            if ledger is None or not recorded_as_is(ledger, bucket, path, key, snapshot):
                found.files += 1
                found.bytes += snapshot.size
    return found
