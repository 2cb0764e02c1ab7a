"""botocore's retries paced for a flush's deadline (aws.retry_pace), on real clients: the
retry decision is botocore's own, the sleep before the next attempt is capped while hurried."""

from __future__ import annotations

from typing import Any

from botocore.awsrequest import AWSResponse
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.aws.retry_pace import HURRIED_SECONDS, RetryPace, pace_retries
from spotwatch.aws.s3 import make_s3_client
from spotwatch.config import TransferSettings

ERRORS = {503: "SlowDown", 500: "InternalError", 400: "RequestTimeout", 403: "AccessDenied"}


def _ask(client: Any, attempts: int, status: int | None) -> Any:
    """What the client's needs-retry handlers say after this attempt of a PutObject that got
    `status` (None: a connection error): botocore sleeps that long and tries again, or (None)
    gives up."""
    operation = client.meta.service_model.operation_model("PutObject")
    if status is None:
        response, caught = None, ConnectionResetError("reset")
    else:
        http = AWSResponse("https://s3/x", status, {}, None)
        parsed = {"Error": {"Code": ERRORS[status]},
                  "ResponseMetadata": {"HTTPStatusCode": status}}
        response, caught = (http, parsed), None
    for _, answer in client.meta.events.emit(
            "needs-retry.s3.PutObject", response=response, endpoint=None, operation=operation,
            attempts=attempts, caught_exception=caught, request_dict={"context": {}}):
        if answer is not None:
            return answer
    return None


@given(attempts=st.integers(1, 12), status=st.sampled_from([None, *ERRORS]),
       max_attempts=st.integers(1, 10))
def test_hurried_retries_sleep_at_most_a_second_and_retry_as_botocore_would(
        attempts: int, status: int | None, max_attempts: int) -> None:
    settings = TransferSettings(client="classic", max_attempts=max_attempts)
    stock = make_s3_client("us-east-1", settings)
    paced = make_s3_client("us-east-1", settings)
    pace = RetryPace()
    pace_retries(paced, pace)
    expected = _ask(stock, attempts, status)
    calm = _ask(paced, attempts, status)
    pace.hurry(True)
    hurried = _ask(paced, attempts, status)
    pace.hurry(False)
    # The same decision: retry (a delay) or not (None), by botocore's own conditions.
    assert (expected is None) == (calm is None) == (hurried is None)
    if hurried is not None:
        assert 0 <= hurried <= HURRIED_SECONDS
        assert 0 <= calm <= 20 + 5  # botocore's cap, plus a retry-after header's


def _quota_releases(client: Any) -> int:
    """How many quota releases run after a call (botocore's own, and the paced handler's)."""
    answers = client.meta.events.emit("after-call.s3.PutObject", http_response=None,
                                      parsed={}, model=None, context={})
    return sum(getattr(handler, "__name__", "") == "release_retry_quota"
               for handler, _ in answers)


def test_pacing_a_client_again_replaces_its_handlers_instead_of_adding_more() -> None:
    """A session started again builds a second store on its client: the client then has one
    paced retry handler and one release of its quota, the newest store's."""
    client = make_s3_client("us-east-1", TransferSettings(client="classic"))
    first, second = RetryPace(), RetryPace()
    pace_retries(client, first)
    releases = _quota_releases(client)
    pace_retries(client, second)
    assert _quota_releases(client) == releases == 2  # botocore's, left alone, and the pace's
    second.hurry(True)  # the newest store's pace is the one asked
    assert _ask(client, 3, 503) <= HURRIED_SECONDS
