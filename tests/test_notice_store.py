"""Each notice is handed on once, however often and from however many pollers it is seen."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.model import Notice, NoticeKind
from spotwatch.notices.store import ActedNotices, SeenNotices, Told

_notices = st.builds(lambda kind, ident: Notice.make(kind, None, ident),
                     st.sampled_from(list(NoticeKind)), st.sampled_from("abcde"))


@given(st.lists(st.lists(_notices, max_size=5), max_size=8))
def test_every_notice_is_handed_on_once_in_first_seen_order(polls: list[list[Notice]]) -> None:
    seen = SeenNotices()
    handed = [notice for poll in polls for notice in seen.first_sightings(poll)]
    expected = list({notice.id: notice for poll in polls for notice in poll}.values())
    assert [n.id for n in handed] == [n.id for n in expected]


def test_pollers_on_several_threads_hand_a_notice_on_once() -> None:
    seen = SeenNotices()
    notice = Notice.make(NoticeKind.SPOT_INTERRUPTION, None, "terminate", "12:00")
    start = threading.Barrier(8)
    handed: list[Notice] = []

    def poll() -> None:
        start.wait()
        for _ in range(200):
            handed.extend(seen.first_sightings([notice]))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert handed == [notice]


_DAY = datetime(2026, 1, 1, tzinfo=UTC)
_deadlines = st.one_of(st.none(), st.integers(0, 5).map(lambda h: _DAY + timedelta(hours=h)))
# A sighting of one of three notices (a maintenance event's EventId), with the time it gives
# now; or a withdrawal of one (AWS no longer lists it).
_steps = st.one_of(st.tuples(st.sampled_from("abc"), _deadlines),
                   st.tuples(st.sampled_from("abc")))


@given(st.lists(_steps, max_size=30))
def test_a_notice_is_handed_on_again_only_when_its_deadline_moves_earlier(
        steps: list[tuple[str] | tuple[str, datetime | None]]) -> None:
    """The trainer is never told it has more time than it has: each time a notice is handed
    on its deadline is earlier than any it was handed on with before (a first time reads as
    earlier than none); a later one, or the same, is never handed on. A withdrawal starts
    afresh."""
    seen = SeenNotices()
    earliest: dict[str, datetime | None] = {}  # the model: per id, the earliest handed on
    for step in steps:
        if len(step) == 1:
            seen.forget([Notice.make(NoticeKind.SCHEDULED_EVENT, None, step[0]).id])
            earliest.pop(step[0], None)
            continue
        ident, deadline = step  # type: ignore[misc]
        notice = Notice.make(NoticeKind.SCHEDULED_EVENT, deadline, ident)
        handed = seen.first_sightings([notice])
        known = earliest.get(ident, "unseen")
        expected = known == "unseen" or (deadline is not None and (
            known is None or deadline < known))  # type: ignore[operator]
        assert handed == ([notice] if expected else [])
        if expected:
            earliest[ident] = deadline


def test_hooks_act_again_on_a_deadline_moved_earlier_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "acted.json"
    acted = ActedNotices(path, "boot-1")
    acted.load()
    assert acted.tell(Told("e", _DAY + timedelta(days=3)))
    assert not acted.tell(Told("e", _DAY + timedelta(days=3)))
    assert acted.tell(Told("e", _DAY + timedelta(minutes=2)))  # rescheduled earlier
    again = ActedNotices(path, "boot-1")  # a restarted daemon
    again.load()
    assert not again.tell(Told("e", _DAY + timedelta(minutes=2)))
    assert not again.tell(Told("e", _DAY + timedelta(days=1)))  # later: acted already
    assert again.tell(Told("e", _DAY + timedelta(minutes=1)))


def test_notices_acted_on_by_a_spotwatch_that_kept_no_deadlines_are_not_acted_on_again(
        tmp_path: Path) -> None:
    path = tmp_path / "acted.json"
    path.write_text(json.dumps({"boot_id": "boot-1", "ids": ["e"], "told": None}))
    acted = ActedNotices(path, "boot-1")
    acted.load()
    assert not acted.tell(Told("e", _DAY))
