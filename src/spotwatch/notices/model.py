"""The Notice value shared by every source, with ids stable across polls."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import Enum


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

    @classmethod
    def make(cls, kind: NoticeKind, deadline: datetime | None, *identity: str,
             detail: str = "", posted_at: datetime | None = None) -> Notice:
        """A notice whose id hashes what identifies it, so one seen on every poll acts once."""
        digest = hashlib.sha256("\0".join((kind.value, *identity)).encode()).hexdigest()[:16]
        return cls(kind=kind, deadline=deadline, id=digest, detail=detail, posted_at=posted_at)
