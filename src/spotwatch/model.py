"""Value types passed between the layers; this module imports nothing from spotwatch.

A file's identity (FileVersion, Snapshot), an upload and its result (UploadJob, Outcome,
UploadResult), and an interruption notice (Notice, NoticeKind) with ids stable across polls,
what one metadata item lists as still in effect (NoticeListing), and the notices a peer node
withdrew (PeerWithdrawal).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path


class NoticeKind(str, Enum):
    SPOT_INTERRUPTION = "spot-interruption"
    REBALANCE = "rebalance-recommendation"
    SCHEDULED_EVENT = "scheduled-event"
    ASG_TERMINATING = "asg-terminating"
    SIGTERM = "sigterm"
    MANUAL = "manual-flush"


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    deadline: datetime | None
    id: str
    detail: str = ""
    posted_at: datetime | None = None  # when AWS posted it, where the item tells
    peer_rank: int | None = None  # learnt from this node of the job, not from our own IMDS

    @classmethod
    def make(cls, kind: NoticeKind, deadline: datetime | None, *identity: str,
             detail: str = "", posted_at: datetime | None = None,
             peer_rank: int | None = None) -> Notice:
        """A notice whose id hashes what identifies it, so one seen on every poll acts once."""
        digest = hashlib.sha256("\0".join((kind.value, *identity)).encode()).hexdigest()[:16]
        return cls(kind=kind, deadline=deadline, id=digest, detail=detail, posted_at=posted_at,
                   peer_rank=peer_rank)


@dataclass(frozen=True)
class NoticeListing:
    """The ids of every notice of this kind that one answer of a metadata item lists as in
    effect: one it no longer lists was withdrawn (a maintenance event cancelled)."""

    kind: NoticeKind
    ids: frozenset[str]


@dataclass(frozen=True)
class PeerWithdrawal:
    """Notices the node of this rank shared and then withdrew (AWS cancelled its maintenance
    event): their ids as this node knows them (the peer's notices, Notice.make)."""

    rank: int
    ids: frozenset[str]


@dataclass(frozen=True)
class FileVersion:
    """What identifies one version of a local file's content."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Snapshot:
    """Identity of a file's content at one moment: any write or replacement changes it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, stat: os.stat_result) -> Snapshot:
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)

    @property
    def version(self) -> FileVersion:
        return FileVersion(self.size, self.mtime_ns)


@dataclass(frozen=True)
class UploadJob:
    path: Path
    key: str
    snapshot: Snapshot


class Outcome(str, Enum):
    DONE = "done"
    CHANGED = "changed"  # the file changed while being read: upload it again
    VANISHED = "vanished"  # deleted while being read: nothing to keep
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not sent (sync.sets.sealed): the file's set was sealed in S3 before this process knew of
    # it, listing this very version (ADOPTED: recorded as uploaded) or a newer one (STALE: the
    # local copy is older than what S3 holds, and is not uploaded over it).
    ADOPTED = "adopted"
    STALE = "stale"


@dataclass(frozen=True)
class UploadResult:
    job: UploadJob
    outcome: Outcome
    seconds: float
    checksum: str | None = None
    error: str | None = None
    # VANISHED after the object was written: that object was deleted again.
    object_removed: bool = False
    # A multipart upload of the key may still be open: keep it noted for the startup cleanup.
    multipart_leftovers: bool = False
    permanent: bool = False  # retrying alone will not fix it (see uploader._is_permanent)
    part_size: int | None = None  # multipart: the checksum is over parts of this size
    checksum_algorithm: str | None = None  # what made the checksum
    etag: str | None = None  # the ETag S3 gave the upload
    sealed_at: float | None = None  # ADOPTED: when the set listing it was sealed
