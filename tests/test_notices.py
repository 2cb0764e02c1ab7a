"""Notice parsing and the poller's deduplication, polling the emulator over HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotwatch.aws.imds import ImdsClient
from spotwatch.emulator import ImdsEmulator
from spotwatch.model import Notice, NoticeKind, NoticeListing
from spotwatch.notices import DEFAULT_SOURCES
from spotwatch.notices.poller import NoticePoller
from spotwatch.notices.sources import (
    SCHEDULED_EVENTS,
    NoticeSource,
    list_lifecycle_state,
    list_scheduled_events,
    parse_instance_action,
    parse_lifecycle_state,
    parse_rebalance,
    parse_scheduled_events,
)

from .conftest import Workspace, wait_for


def test_instance_action_parses_deadline() -> None:
    [notice] = parse_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert notice.kind is NoticeKind.SPOT_INTERRUPTION
    assert notice.deadline == datetime(2017, 9, 18, 8, 22, tzinfo=UTC)
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
    assert events[0].deadline == datetime(2019, 1, 21, 9, 0, 43, tzinfo=UTC)
    for running in ("InService", "Standby", "Detached", "Warmed:Running", "Pending", ""):
        assert parse_lifecycle_state(running) == []
    for leaving in ("Terminated", "Warmed:Stopped", "Warmed:Hibernated", "Warmed:Terminated"):
        [notice] = parse_lifecycle_state(leaving + "\n")
        assert notice.kind is NoticeKind.ASG_TERMINATING and notice.detail == leaving
        assert list_lifecycle_state(leaving) == NoticeListing(NoticeKind.ASG_TERMINATING,
                                                              frozenset({notice.id}))
    assert list_lifecycle_state("InService") == NoticeListing(NoticeKind.ASG_TERMINATING,
                                                              frozenset())
    for garbled in ("", "<html>", "in service", "{}"):
        assert list_lifecycle_state(garbled) is None


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


def test_scheduled_events_listing_names_the_active_events_only() -> None:
    """An event cancelled or over is no longer in effect; an answer that is no list says
    nothing (never read as every event withdrawn)."""
    body = json.dumps([{"EventId": "e1", "State": "active"}, {"EventId": "e2"},
                       {"EventId": "e3", "State": "canceled"}])
    listing = list_scheduled_events(body)
    assert listing == NoticeListing(NoticeKind.SCHEDULED_EVENT,
                                    frozenset(n.id for n in parse_scheduled_events(body)))
    assert len(listing.ids) == 2
    assert list_scheduled_events("[]") == NoticeListing(NoticeKind.SCHEDULED_EVENT, frozenset())
    for garbled in ("", "<html>oops", '{"EventId": "e1"}', "[" * 100_000):
        assert list_scheduled_events(garbled) is None


def test_poller_hands_on_what_is_in_effect_and_a_relisted_event_again(
        imds: ImdsEmulator) -> None:
    listings: list[NoticeListing] = []
    poller = NoticePoller(ImdsClient(imds.url), [SCHEDULED_EVENTS], 0.05, lambda n: None,
                          listings.append)
    assert poller.poll_once() == [] and listings == [  # the first listing, though empty
        NoticeListing(NoticeKind.SCHEDULED_EVENT, frozenset())]
    body = imds.schedule_event()
    [notice] = poller.poll_once()
    assert listings[-1].ids == {notice.id}
    assert poller.poll_once() == [] and len(listings) == 2  # unchanged: not handed on again
    imds.cancel_event()
    assert poller.poll_once() == [] and listings[-1].ids == frozenset()
    imds.set_item("meta-data/events/maintenance/scheduled", body)  # listed again
    assert poller.poll_once() == [notice] and listings[-1].ids == {notice.id}


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


def test_a_parser_that_raises_does_not_end_its_sources_polling(imds: ImdsEmulator) -> None:
    spot = DEFAULT_SOURCES[0]
    answers = iter([ZeroDivisionError("a parser's own bug")])

    def parse(text: str) -> list[Notice]:
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return spot.parse(text)

    received: list[Notice] = []
    poller = NoticePoller(ImdsClient(imds.url, timeout=0.3, attempts=1),
                          [NoticeSource(spot.name, spot.path, parse)], 0.05, received.append)
    imds.fire_spot_interruption()
    with capture_logs() as logs:
        poller.start()
        try:
            wait_for(lambda: received)
        finally:
            poller.stop()
    assert received[0].kind is NoticeKind.SPOT_INTERRUPTION
    assert [e["source"] for e in logs if e["event"] == "notice_unreadable"] == [spot.name]


def test_scheduled_event_time_without_zone_is_utc() -> None:
    """IMDS times are UTC; one that does not say so must not become a naive datetime, which
    the daemon cannot compare with the time now."""
    [event] = parse_scheduled_events(
        '[{"NotBefore": "21 Jan 2019 09:00:43", "Code": "system-reboot",'
        ' "EventId": "instance-event-1", "State": "active"}]')
    assert event.deadline == datetime(2019, 1, 21, 9, 0, 43, tzinfo=UTC)


def test_instance_action_time_at_the_edge_of_the_calendar_is_still_a_notice() -> None:
    [notice] = parse_instance_action('{"action": "terminate", "time": "0001-01-01T00:00:00Z"}')
    assert notice.kind is NoticeKind.SPOT_INTERRUPTION
    assert notice.deadline == datetime(1, 1, 1, tzinfo=UTC)


NOTICE_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z",
                       "%d %b %Y %H:%M:%S GMT", "%d %b %Y %H:%M:%S", "%d %b %Y %H:%M:%S %z")


@given(moment=st.datetimes(timezones=st.none() | st.timezones()),
       fmt=st.sampled_from(NOTICE_TIME_FORMATS))
def test_any_notice_time_parses_to_a_zoned_deadline_or_none(moment: datetime, fmt: str) -> None:
    """Whatever time IMDS gives, the parsers return notices (never raise, which would end the
    item's polling thread) whose deadlines the daemon can compare with the time now."""
    text = moment.strftime(fmt)
    notices = [*parse_instance_action(json.dumps({"action": "terminate", "time": text})),
               *parse_scheduled_events(json.dumps([{"NotBefore": text, "EventId": "e"}])),
               *parse_rebalance(json.dumps({"noticeTime": text}))]
    assert len(notices) == 3
    for notice in notices:
        assert notice.deadline is None or notice.deadline.tzinfo is not None
        assert notice.posted_at is None or notice.posted_at.tzinfo is not None


def test_daemon_survives_a_scheduled_event_time_without_zone(workspace: Workspace,
                                                             imds: ImdsEmulator) -> None:
    daemon = workspace.start_daemon()
    imds.set_item("meta-data/events/maintenance/scheduled", json.dumps([{
        "NotBefore": "21 Jan 2030 09:00:43", "Code": "system-reboot",
        "EventId": "instance-event-1", "State": "active"}]))
    assert daemon.wait_for_event("notice_detected")["deadline"] == "2030-01-21T09:00:43+00:00"
    imds.fire_spot_interruption()
    assert daemon.wait_for_event("notice_detected", count=2)["kind"] == "spot-interruption"
    assert daemon.stop() == 0


@pytest.mark.parametrize("item", ["spot", "scheduled"])
def test_daemon_survives_a_notice_due_at_the_calendars_start(workspace: Workspace,
                                                             imds: ImdsEmulator,
                                                             item: str) -> None:
    """A garbled time near year 1 is a notice long past due: the daemon acts on it and stays
    up (it died with a traceback, and again at every restart while IMDS said so)."""
    daemon = workspace.start_daemon()
    if item == "spot":
        imds.set_item("meta-data/spot/instance-action",
                      '{"action": "terminate", "time": "0001-01-01T00:05:00Z"}')
    else:
        imds.set_item("meta-data/events/maintenance/scheduled", json.dumps([{
            "NotBefore": "0001-01-01T00:00:00Z", "Code": "system-reboot",
            "EventId": "instance-event-1", "State": "active"}]))
    daemon.wait_for_event("notice_detected")
    daemon.wait_for_event("flush_done")
    (workspace.checkpoints / "step_9").mkdir()
    (workspace.checkpoints / "step_9" / "model.pt").write_bytes(b"after the notice")
    daemon.wait_for_event("set_complete")
    assert daemon.stop() == 0


def test_a_warm_pool_state_that_turns_in_service_is_withdrawn(workspace: Workspace,
                                                              imds: ImdsEmulator) -> None:
    """An instance launched into a warm pool (or hibernated there) is Warmed:* and then, in
    the same boot, InService: the notice it gave is withdrawn then, and the trainer started
    on it finds no notice."""
    notice_file = workspace.root / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    daemon = workspace.start_daemon()
    imds.set_lifecycle_state("Warmed:Hibernated")
    assert daemon.wait_for_event("notice_detected")["kind"] == "asg-terminating"
    wait_for(lambda: workspace.status().get("notices_in_effect"))
    assert notice_file.exists()
    imds.set_lifecycle_state("InService")
    daemon.wait_for_event("notice_cancelled")
    assert wait_for(lambda: workspace.status().get("notices_in_effect") == [])
    assert not notice_file.exists()
    assert daemon.stop() == 0


def test_spot_notice_seen_after_an_instance_action_time_out_of_range(imds: ImdsEmulator) -> None:
    received: list[Notice] = []
    poller = NoticePoller(ImdsClient(imds.url), DEFAULT_SOURCES[:1], 0.05, received.append)
    imds.set_item("meta-data/spot/instance-action",
                  '{"action": "terminate", "time": "0001-01-01T00:00:00Z"}')
    poller.start()
    try:
        wait_for(lambda: received)
        imds.fire_spot_interruption()
        wait_for(lambda: len(received) == 2)
        assert received[1].deadline is not None and received[1].deadline.year > 2000
    finally:
        poller.stop()


NESTED_DEEPER_THAN_PYTHON_RECURSES = ["[" * 100_000, '{"a": ' * 100_000]


@given(body=st.sampled_from(NESTED_DEEPER_THAN_PYTHON_RECURSES), tail=st.text(max_size=20))
def test_no_imds_answer_raises_however_deeply_nested(body: str, tail: str) -> None:
    """A garbled spot answer is still a notice; the other sources find nothing in it."""
    [notice] = parse_instance_action(body + tail)
    assert notice.kind is NoticeKind.SPOT_INTERRUPTION and notice.deadline is None
    assert parse_scheduled_events(body + tail) == []
    assert parse_rebalance(body + tail)[0].kind is NoticeKind.REBALANCE


def test_daemon_keeps_polling_after_an_instance_action_nested_too_deep(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    daemon = workspace.start_daemon()
    imds.set_item("meta-data/spot/instance-action", NESTED_DEEPER_THAN_PYTHON_RECURSES[0])
    garbled = daemon.wait_for_event("notice_detected")
    assert garbled["kind"] == "spot-interruption" and garbled["deadline"] is None
    imds.fire_spot_interruption()  # the poller is still alive and sees the real notice
    assert daemon.wait_for_event("notice_detected", count=2)["deadline"] is not None
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_path.read_text()
