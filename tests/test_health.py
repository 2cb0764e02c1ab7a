"""Outage tracking on a fake clock: when S3 failures become `s3_degraded`, and their end."""

from __future__ import annotations

from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from structlog.testing import capture_logs

from spotwatch.aws.health import (
    DEGRADED_AFTER_SECONDS,
    Liveness,
    Outage,
    S3Watch,
    s3_error_class,
    unreachable_reason,
)
from spotwatch.aws.imds import ImdsError
from spotwatch.notices.poller import NoticePoller
from spotwatch.notices.sources import DEFAULT_SOURCES


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def reply(status: int, code: str | None = None) -> tuple[AWSResponse, dict[str, Any]]:
    parsed: dict[str, Any] = {"Error": {"Code": code}} if code else {}
    return AWSResponse("https://s3.example", status, {}, None), parsed


def test_error_classes() -> None:
    assert s3_error_class(reply(200), None) is None
    assert s3_error_class(reply(404, "NoSuchKey"), None) is None  # an answer, not an outage
    assert s3_error_class(reply(503, "SlowDown"), None) == "SlowDown"
    assert s3_error_class(reply(403, "AccessDenied"), None) == "AccessDenied"
    assert s3_error_class(reply(500), None) == "HTTP500"
    assert s3_error_class(None, ReadTimeoutError(endpoint_url="x")) == "ReadTimeout"
    assert s3_error_class(None, EndpointConnectionError(endpoint_url="x")) == "ConnectionError"
    assert s3_error_class(None, ConnectionClosedError(endpoint_url="x")) == "ConnectionError"


def test_failures_become_an_outage_logged_once_and_a_success_ends_it() -> None:
    clock = FakeClock()
    counted: list[str] = []
    watch = S3Watch(counted.append, clock)
    with capture_logs() as logs:
        watch._on_attempt(response=reply(503, "SlowDown"))
        clock.now += DEGRADED_AFTER_SECONDS / 2
        watch._on_attempt(caught_exception=EndpointConnectionError(endpoint_url="x"))
        watch.check()
        assert watch.degraded_reason() is None and logs == []  # a blip, not an outage yet
        clock.now += DEGRADED_AFTER_SECONDS
        watch.check()
        watch.check()
        reason = watch.degraded_reason()
        assert reason == "S3 requests failing for 15s (ConnectionError, SlowDown)"
        watch._on_attempt(response=reply(200))
    assert [e["event"] for e in logs] == ["s3_degraded", "s3_recovered"]
    assert logs[0]["errors"] == {"SlowDown": 1, "ConnectionError": 1}
    assert logs[1]["after_seconds"] == 15.0
    assert counted == ["SlowDown", "ConnectionError"]
    assert watch.degraded_reason() is None and watch.outage.up is True


def test_outage_state() -> None:
    clock = FakeClock()
    outage = Outage(clock)
    assert outage.up is None and outage.seconds() == 0
    outage.failed()
    clock.now += 3
    outage.failed()  # the outage began at the first failure
    assert outage.up is False and outage.seconds() == 3
    assert outage.succeeded() == 3 and outage.up is True and outage.seconds() == 0


def test_an_outage_counts_from_when_its_failing_request_began() -> None:
    clock = FakeClock()
    outage = Outage(clock)
    outage.succeeded()
    began = outage.now()
    clock.now += 6
    outage.failed(began)
    assert outage.seconds() == 6
    clock.now += 1
    outage.failed(began - 100)  # started before the last success: counts from that success
    assert outage.seconds() == 7


class HangingImds:
    """IMDS not answering: every get gives up after its attempts' timeouts (on the clock)."""

    endpoint = "http://169.254.169.254"
    timeout = 2.0

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def get(self, path: str) -> str | None:
        self._clock.now += 3 * self.timeout
        raise ImdsError(f"IMDS unreachable at {self.endpoint}: read timed out")


def test_a_hanging_imds_is_unreachable_from_when_the_first_failing_poll_began() -> None:
    """Old: the outage began when the first poll gave up (its 3 x 2 s later), so health said
    degraded some 16 s after IMDS stopped answering instead of 10 s."""
    clock = FakeClock()
    poller = NoticePoller(HangingImds(clock), DEFAULT_SOURCES[:1], 1.0,  # type: ignore[arg-type]
                          lambda notice: None, clock=clock)
    poller.poll_once()
    assert poller.reachability.outage.seconds() == 6
    clock.now += DEGRADED_AFTER_SECONDS - 6 + 1
    assert unreachable_reason("IMDS", poller.reachability.outage) == "IMDS unreachable for 11s"


def test_uploads_in_flight_without_progress_are_a_stall_until_they_move() -> None:
    """S3 accepting connections and never answering fails no request: the uploads in flight
    making no progress for the threshold is what tells."""
    clock = FakeClock()
    liveness = Liveness("uploads", clock)
    clock.now += 600  # idle for long: no upload, no stall
    assert liveness.stalled_reason(0) is None and liveness.quiet_seconds(0) == 0
    liveness.moved()  # an upload starts: it has the whole threshold for its first bytes
    clock.now += DEGRADED_AFTER_SECONDS
    with capture_logs() as logs:
        assert liveness.stalled_reason(2) is None
        clock.now += 5
        assert liveness.stalled_reason(2) == "S3 not answering: 2 uploads in flight, " \
            "no progress for 15s"
        assert liveness.quiet_seconds(2) == DEGRADED_AFTER_SECONDS + 5
        assert liveness.stalled_reason(2) is not None  # logged once
        liveness.moved(4096)  # bytes sent, or a request ended
        assert liveness.stalled_reason(2) is None and liveness.quiet_seconds(2) == 0
        clock.now += DEGRADED_AFTER_SECONDS + 1
        assert liveness.stalled_reason(0) is None  # nothing in flight: nothing stalls
    assert [e["event"] for e in logs] == ["s3_not_answering", "s3_answering"]
    assert logs[0]["in_flight"] == 2 and logs[0]["quiet_seconds"] == 15

