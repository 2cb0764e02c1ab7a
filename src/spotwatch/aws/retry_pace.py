"""botocore's retries, paced for a flush's deadline.

botocore sleeps between the attempts of a request, exponentially longer while S3 fails (from
1 s after throttling, up to 20 s). While a flush's deadline runs, S3 back a moment before it
would find a request still asleep, past the deadline: its sleeps are then capped at
HURRIED_SECONDS. botocore's standard retry handler is replaced by one built the same way from
botocore's own parts, whose backoff asks the pace.

Invariant: whether and how often a request is retried stays botocore's decision (its
conditions, `transfer.max_attempts`, its retry quota); only the sleep before the next attempt
is shortened, and only while a deadline runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from botocore.retries.quota import RetryQuota
from botocore.retries.standard import (
    DEFAULT_MAX_ATTEMPTS,
    ExponentialBackoff,
    RetryEventAdapter,
    RetryHandler,
    RetryPolicy,
    RetryQuotaChecker,
    StandardRetryConditions,
    ThrottlingErrorDetector,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# The longest sleep between two attempts while a deadline runs.
HURRIED_SECONDS = 1.0


class RetryPace:
    """Whether a deadline runs; set from the engine's thread, read on the SDK's."""

    def __init__(self) -> None:
        self.cap: float | None = None

    def hurry(self, hurried: bool) -> None:
        self.cap = HURRIED_SECONDS if hurried else None


class _PacedBackoff(ExponentialBackoff):
    def __init__(self, pace: RetryPace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pace = pace

    def delay_amount(self, context: Any) -> float:
        delay: float = super().delay_amount(context)
        cap = self._pace.cap
        return delay if cap is None else min(delay, cap)


def pace_retries(client: S3Client, pace: RetryPace) -> None:
    """Replace the client's standard retry handler (standard and adaptive mode register one,
    under one id per service) with one whose sleeps follow `pace`."""
    events: Any = client.meta.events
    service = client.meta.service_model.service_id.hyphenize()
    config: Any = client.meta.config
    max_attempts = config.retries.get("total_max_attempts") or DEFAULT_MAX_ATTEMPTS
    adapter = RetryEventAdapter()
    throttling = ThrottlingErrorDetector(adapter)
    # What botocore's own registration passes as the quota (its stubs say RetryQuota).
    quota: Any = RetryQuotaChecker(RetryQuota(), throttling)
    handler = RetryHandler(
        retry_policy=RetryPolicy(
            retry_checker=StandardRetryConditions(max_attempts=max_attempts),
            retry_backoff=_PacedBackoff(pace, service_name=service,
                                        throttling_detector=throttling)),
        retry_event_adapter=adapter, retry_quota=quota, service_name=service)
    unique_id = f"retry-config-{service}"
    events.unregister(f"needs-retry.{service}", unique_id=unique_id)
    events.register(f"needs-retry.{service}", handler.needs_retry, unique_id=unique_id)
    # Under an id of its own: a second store on the client (a session started again) replaces
    # the release of the quota it replaced instead of adding one. botocore's own release,
    # registered with no id, stays: it fills a quota nothing asks any more.
    release_id = f"spotwatch-retry-quota-{service}"
    events.unregister(f"after-call.{service}", unique_id=release_id)
    events.register(f"after-call.{service}", quota.release_retry_quota, unique_id=release_id)
