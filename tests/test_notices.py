"""Notice parsing and the poller's deduplication, polling the emulator over HTTP."""

from __future__ import annotations

from datetime import datetime, timezone

from spotwatch.aws.imds import ImdsClient
from spotwatch.emulator import ImdsEmulator
from spotwatch.model import Notice, NoticeKind
from spotwatch.notices import DEFAULT_SOURCES
from spotwatch.notices.poller import NoticePoller
from spotwatch.notices.sources import (
    parse_instance_action,
    parse_lifecycle_state,
    parse_rebalance,
    parse_scheduled_events,
)

from .conftest import wait_for


def test_instance_action_parses_deadline() -> None:
    [notice] = parse_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert notice.kind is NoticeKind.SPOT_INTERRUPTION
    assert notice.deadline == datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc)
    assert notice.detail == "terminate"


def test_garbled_instance_action_is_still_a_notice() -> None:
    [notice] = parse_instance_action("<html>oops")
    assert notice.kind is NoticeKind.SPOT_INTERRUPTION
    assert notice.deadline is None


def test_ids_are_stable_and_distinct() -> None:
    body = '{"action": "terminate", "time": "2017-09-18T08:22:00Z"}'
    assert parse_instance_action(body)[0].id == parse_instance_action(body)[0].id
    later = '{"action": "terminate", "time": "2017-09-18T08:24:00Z"}'
    assert parse_instance_action(body)[0].id != parse_instance_action(later)[0].id


def test_other_sources() -> None:
    assert parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}')[0].kind is NoticeKind.REBALANCE
    events = parse_scheduled_events(
        '[{"NotBefore": "21 Jan 2019 09:00:43 GMT", "Code": "system-reboot",'
        ' "EventId": "instance-event-1", "State": "active"},'
        ' {"NotBefore": "22 Jan 2019 09:00:43 GMT", "Code": "system-reboot",'
        ' "EventId": "instance-event-2", "State": "completed"}]'
    )
    assert [e.detail for e in events] == ["system-reboot"]
    assert events[0].deadline == datetime(2019, 1, 21, 9, 0, 43, tzinfo=timezone.utc)
    assert parse_lifecycle_state("InService") == []
    assert parse_lifecycle_state("Terminated")[0].kind is NoticeKind.ASG_TERMINATING


def test_poller_reports_each_notice_once(imds: ImdsEmulator) -> None:
    received: list[Notice] = []
    poller = NoticePoller(ImdsClient(imds.url), DEFAULT_SOURCES, 0.05, received.append)
    assert poller.poll_once() == []
    imds.fire_spot_interruption()
    imds.fire_rebalance()
    first = poller.poll_once()
    assert {n.kind for n in first} == {NoticeKind.SPOT_INTERRUPTION, NoticeKind.REBALANCE}
    assert poller.poll_once() == []
    imds.set_lifecycle_state("Terminated")
    imds.schedule_event()
    assert {n.kind for n in poller.poll_once()} == {NoticeKind.ASG_TERMINATING,
                                                    NoticeKind.SCHEDULED_EVENT}


def test_poller_thread_recovers_after_imds_outage(imds: ImdsEmulator) -> None:
    received: list[Notice] = []
    poller = NoticePoller(ImdsClient(imds.url, timeout=0.3, attempts=1), DEFAULT_SOURCES[:1],
                          0.05, received.append)
    imds.set_disabled(True)
    poller.start()
    try:
        imds.fire_spot_interruption()
        wait_for(lambda: imds.counts().get("token_put", 0) >= 3)
        assert received == []
        imds.set_disabled(False)
        wait_for(lambda: received)
        assert received[0].kind is NoticeKind.SPOT_INTERRUPTION
    finally:
        poller.stop()
