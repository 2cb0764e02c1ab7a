"""One parser per metadata item; unparsable content is still a notice, never ignored.

An item whose notices AWS can withdraw (the scheduled maintenance events: an event cancelled,
or over, leaves the list) also says which of them are still in effect (NoticeSource.listing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from spotwatch.config import NoticeSettings
from spotwatch.model import Notice, NoticeKind, NoticeListing


@dataclass(frozen=True)
class NoticeSource:
    name: str
    path: str
    parse: Callable[[str], list[Notice]]
    # For an item that withdraws notices: those an answer lists as in effect, or None when
    # the answer is no listing at all (garbled), which withdraws nothing.
    listing: Callable[[str], NoticeListing | None] | None = None


SPOT_WARNING = timedelta(minutes=2)


def iso_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _in_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def _in_utc(moment: datetime) -> datetime:
    """Invariant: every notice time has a zone (IMDS times are UTC, said or not), so the
    daemon can compare it with the time now."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _before(moment: datetime | None, span: timedelta) -> datetime | None:
    """`span` before `moment`; None when that is before the calendar starts (a garbled time)."""
    try:
        return moment - span if moment else None
    except OverflowError:
        return None


def _json(text: str) -> object:
    """The JSON value of an IMDS answer; None when it is none. Invariant: no answer, however
    garbled (deep nesting included), raises: a poller thread that died would miss every
    later notice."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_object(text: str) -> dict[str, object]:
    value = _json(text)
    return value if isinstance(value, dict) else {}


def parse_instance_action(text: str) -> list[Notice]:
    body = _json_object(text)
    action = str(body.get("action", "unknown"))
    time_text = str(body.get("time", ""))
    # Identity is the raw content, so a garbled answer still yields one stable notice.
    deadline = iso_time(body.get("time"))
    # The action time is two minutes after the notice is posted (AWS documents it so).
    posted = _before(deadline, SPOT_WARNING)
    return [Notice.make(NoticeKind.SPOT_INTERRUPTION, deadline, action,
                        time_text or text.strip(), detail=action, posted_at=posted)]


# Kinds that mean the instance goes now, whether or not they name a readable time.
IMMINENT_KINDS = frozenset({NoticeKind.SPOT_INTERRUPTION, NoticeKind.ASG_TERMINATING})


def due_by(notice: Notice, detected: datetime) -> datetime | None:
    """When the instance is to go, for ordering notices: the notice's deadline; for one
    that means it goes now but gives no time (an Auto Scaling scale-in, a spot notice whose
    time cannot be read), the spot warning's two minutes from when it was seen; else None
    (a rebalance recommendation: no time at all)."""
    if notice.deadline is not None or notice.kind not in IMMINENT_KINDS:
        return notice.deadline
    return detected + SPOT_WARNING


def parse_rebalance(text: str) -> list[Notice]:
    notice_time = str(_json_object(text).get("noticeTime", text.strip()))
    return [Notice.make(NoticeKind.REBALANCE, None, notice_time, detail=notice_time,
                        posted_at=iso_time(notice_time))]


def _maintenance_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _in_utc(parsedate_to_datetime(value))  # "21 Jan 2019 09:00:43 GMT"
    except (TypeError, ValueError):
        return iso_time(value)


def parse_scheduled_events(text: str) -> list[Notice]:
    events = _json(text)
    notices = []
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict) or event.get("State", "active") != "active":
            continue
        event_id = str(event.get("EventId", json.dumps(event, sort_keys=True)))
        notices.append(Notice.make(NoticeKind.SCHEDULED_EVENT,
                                   _maintenance_time(event.get("NotBefore")),
                                   event_id, detail=str(event.get("Code", ""))))
    return notices


def list_scheduled_events(text: str) -> NoticeListing | None:
    """The events still active. AWS moves an event it cancels (or that is over) to
    events/maintenance/history, or marks it there as "canceled": either way it is no longer
    among these."""
    if not isinstance(_json(text), list):
        return None
    return NoticeListing(NoticeKind.SCHEDULED_EVENT,
                         frozenset(notice.id for notice in parse_scheduled_events(text)))


# Target lifecycle states in which the instance leaves service and stops running: scaled in,
# or returned to a warm pool stopped or hibernated (either loses the instance store and ends
# the trainer) or terminated from it. Each goes through the group's termination lifecycle
# hook. InService, Standby, Detached and Warmed:Running keep the instance running.
LEAVING_STATES = frozenset({"Terminated", "Warmed:Terminated", "Warmed:Stopped",
                            "Warmed:Hibernated"})
# What an Auto Scaling lifecycle state looks like (InService, Warmed:Pending:Wait, ...).
_LIFECYCLE_STATE = re.compile(r"[A-Z][A-Za-z]*(:[A-Z][A-Za-z]*)*")


def parse_lifecycle_state(text: str) -> list[Notice]:
    state = text.strip()
    if state not in LEAVING_STATES:
        return []
    return [Notice.make(NoticeKind.ASG_TERMINATING, None, state, detail=state)]


def list_lifecycle_state(text: str) -> NoticeListing | None:
    """The leaving state in effect, if any: a warm-pool instance launched (its target state
    Warmed:* while it initializes) or hibernated goes InService later in the same boot, and
    its notice is withdrawn then. None for an answer that is no lifecycle state (garbled)."""
    state = text.strip()
    if not _LIFECYCLE_STATE.fullmatch(state):
        return None
    return NoticeListing(NoticeKind.ASG_TERMINATING,
                         frozenset(notice.id for notice in parse_lifecycle_state(text)))


SPOT_INSTANCE_ACTION = NoticeSource("spot", "meta-data/spot/instance-action",
                                    parse_instance_action)
REBALANCE = NoticeSource("rebalance", "meta-data/events/recommendations/rebalance",
                         parse_rebalance)
SCHEDULED_EVENTS = NoticeSource("scheduled", "meta-data/events/maintenance/scheduled",
                                parse_scheduled_events, list_scheduled_events)
ASG_LIFECYCLE = NoticeSource("asg", "meta-data/autoscaling/target-lifecycle-state",
                             parse_lifecycle_state, list_lifecycle_state)
DEFAULT_SOURCES = (SPOT_INSTANCE_ACTION, REBALANCE, SCHEDULED_EVENTS, ASG_LIFECYCLE)


def sources_for(settings: NoticeSettings) -> tuple[NoticeSource, ...]:
    """The spot interruption always; the others as configured."""
    chosen = [SPOT_INSTANCE_ACTION]
    if settings.rebalance:
        chosen.append(REBALANCE)
    if settings.scheduled_events:
        chosen.append(SCHEDULED_EVENTS)
    if settings.asg_lifecycle:
        chosen.append(ASG_LIFECYCLE)
    return tuple(chosen)
