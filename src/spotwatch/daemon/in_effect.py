"""The notices in effect, and what they hold: uploads in `notice` mode and the bandwidth cap
lifted (any notice), pruning paused, frequent scans and files settled at once (from shortly
before one is due), the trainer's notice file. A notice stays in effect until AWS withdraws it
(a maintenance event cancelled or over), or, for a spot interruption notice, which AWS never
withdraws, until a new one replaces it or its time is long past with the instance still
running (a peer's scale-in alike); the daemon's flushes and counts are its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from spotwatch.model import Notice, NoticeKind, NoticeListing, PeerWithdrawal

# A notice due later than this (a maintenance event scheduled days ahead) weighs on the daemon
# only from this long before it is due: retention goes on meanwhile.
NOTICE_HORIZON = timedelta(minutes=10)
# How long past its time, and past when this process learnt of it, a spot interruption notice
# still holds while the instance runs on. AWS stops or terminates the instance at about that
# time; one still running this long after was not taken (a hibernated instance resumed in the
# same boot, or IMDS dropped the notice), and the notice would otherwise pause retention and
# lift the bandwidth cap for good. Never judged by its time alone: on a host whose clock runs
# ahead, a notice just posted would look long past.
SPOT_NOTICE_OUTLIVED = timedelta(minutes=10)


@dataclass(frozen=True)
class Held:
    notice: Notice
    record: dict[str, Any]  # as the trainer is told of it
    detected: datetime
    due: datetime | None  # when the instance is to go (notices.sources.due_by)


@dataclass(frozen=True)
class NoticeReport:
    """What status.json says of notices: last_notice (the one in effect due first, else the
    latest, cancelled_at once withdrawn) and every notice in effect, due first first."""
    last: dict[str, Any] | None = None
    in_effect: list[dict[str, Any]] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {"last_notice": self.last, "notices_in_effect": self.in_effect}


class NoticesInEffect:
    def __init__(self) -> None:
        self._held: dict[str, Held] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def add(self, held: Held) -> None:
        """A notice, or a new deadline for one in effect (moved earlier: it replaces the old)."""
        self._held[held.notice.id] = held

    def held(self, notice_id: str) -> Held | None:
        return self._held.get(notice_id)

    def withdrawn(self, listing: NoticeListing | PeerWithdrawal) -> list[Held]:
        """No longer in effect from now on: this instance's notices of the listing's kind that
        it no longer lists, or a peer's notices it withdrew (each node withdraws only its own:
        the listing of one instance's IMDS says nothing of another's)."""
        if isinstance(listing, PeerWithdrawal):
            gone = [held for held in self._held.values()
                    if held.notice.peer_rank == listing.rank and held.notice.id in listing.ids]
        else:
            gone = [held for held in self._held.values()
                    if held.notice.peer_rank is None and held.notice.kind is listing.kind
                    and held.notice.id not in listing.ids]
        return self._remove(gone)

    def superseded_by(self, notice: Notice) -> list[Held]:
        """The spot notices of this instance's IMDS that a new one from there replaces, no
        longer in effect: AWS's instance-action is one item, and a new time there means the
        notice it held before is over. Only one with a time that reads (replaces_spot_notices):
        a garbled answer is no new time. (A peer's copies end by the peer's withdrawal, which
        arrives in order, unlike its notices, which a node may learn in any order.)"""
        if not replaces_spot_notices(notice):
            return []
        return self._remove([held for held in self._held.values()
                             if held.notice.kind is NoticeKind.SPOT_INTERRUPTION
                             and held.notice.peer_rank is None
                             and held.notice.id != notice.id])

    def outlived(self, now: datetime) -> list[Held]:
        """The notices that mean an instance goes at their time (outlives) whose time, and
        their detection, passed SPOT_NOTICE_OUTLIVED ago, no longer in effect."""
        return self._remove([held for held in self._held.values()
                             if outlives(held.notice) and held.due is not None
                             and spot_notice_outlived(held.due, held.detected, now)])

    def _remove(self, gone: list[Held]) -> list[Held]:
        for held in gone:
            del self._held[held.notice.id]
        return gone

    def deadline_presses(self) -> datetime | None:
        """From when a notice with a deadline (this instance's or a peer's) presses."""
        return min((_presses_from(held.notice.deadline, held.detected)
                    for held in self._held.values() if held.notice.deadline is not None),
                   default=None)

    def own_presses(self) -> datetime | None:
        """From when a notice for this instance presses: one with no time (a rebalance) at
        once, one that means it goes now within the spot warning (due_by)."""
        return min((_presses_from(held.due, held.detected)
                    for held in self._held.values() if held.notice.peer_rank is None),
                   default=None)

    def soonest(self) -> Held | None:
        """The notice due first (one with no time last): the one the trainer is told of when
        the notice it had was withdrawn."""
        ordered = self.by_urgency()
        return ordered[0] if ordered else None

    def report(self, latest: dict[str, Any] | None) -> NoticeReport:
        """What status.json says of notices; latest: the record of the latest notice learnt.
        Invariant: last_notice is the notice in effect due first whenever one is: a later,
        weaker notice, or one withdrawn, never hides it; only with none in effect is it the
        latest notice (cancelled_at once withdrawn)."""
        in_effect = [held.record for held in self.by_urgency()]
        return NoticeReport(in_effect[0] if in_effect else latest, in_effect)

    def by_urgency(self) -> list[Held]:
        """Every notice in effect, the one due first first (those with no time last)."""
        return sorted(self._held.values(),
                      key=lambda held: (held.due is None, held.due or held.detected))


def replaces_spot_notices(notice: Notice) -> bool:
    """Whether the notice is a spot notice of this instance's IMDS with a time that reads:
    the one instance-action holds now, in place of any before it."""
    return (notice.kind is NoticeKind.SPOT_INTERRUPTION and notice.peer_rank is None
            and notice.deadline is not None)


def outlives(notice: Notice) -> bool:
    """Whether the notice ends once long past: a spot notice (AWS never withdraws one), and
    a peer's Auto Scaling scale-in (its node goes, and never withdraws it). This instance's
    own scale-in holds until the instance goes: its lifecycle action waits on the flush."""
    return notice.kind is NoticeKind.SPOT_INTERRUPTION or (
        notice.kind is NoticeKind.ASG_TERMINATING and notice.peer_rank is not None)


def spot_notice_outlived(due: datetime, known_since: datetime, now: datetime) -> bool:
    """Whether a spot notice due then, and known of since then, is over by now
    (SPOT_NOTICE_OUTLIVED)."""
    return max(due, known_since) < now - SPOT_NOTICE_OUTLIVED  # now - never underflows


def _presses_from(due: datetime | None, detected: datetime) -> datetime:
    """From when a notice due then weighs on the daemon (pruning paused, files settle at once,
    scans every few seconds): NOTICE_HORIZON before it is due, at once for one with no time
    (a rebalance). A maintenance event scheduled days ahead would otherwise stop retention
    from the moment it is announced until the daemon restarts. A time too near the calendar's
    start to go back from (a garbled one, year 1) presses at once: it is long past."""
    if due is None:
        return detected
    try:
        return due - NOTICE_HORIZON
    except OverflowError:
        return detected
