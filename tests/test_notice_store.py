"""Each notice is handed on once, however often and from however many pollers it is seen."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.model import Notice, NoticeKind
from spotwatch.notices.store import SeenNotices

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
