"""Outages an operator must see at once: S3 requests failing, IMDS unreachable.

botocore retries a failed request quietly (up to `transfer.max_attempts` times, for minutes);
so S3 is watched per attempt, through the client's `needs-retry` event, which fires after
every attempt with its reply or its connection error. Failures that go on for
DEGRADED_AFTER_SECONDS without a single success are logged once (`s3_degraded`, with the error
classes) and make /healthz and `status --healthy` report degraded, until a request succeeds
(`s3_recovered`). The notice poller reports IMDS reachability into an Outage the same way.

A hang (S3 accepting connections and never answering) fails no request for minutes, and the
CRT reports a file transfer's outcome only at its end: Liveness watches the transfers in
flight instead, and a stall as long makes the daemon degraded too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError

from spotwatch.logs import get_logger

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = get_logger("spotwatch.health")

# Failing this long without a success is an outage, not a blip that retries absorb.
DEGRADED_AFTER_SECONDS = 10.0


class Outage:
    """Since when something has failed with no success in between; thread-safe.

    Invariant: an outage counts from when its first failing request began (a request that
    hung until it gave up was failing all along), yet never from before the last success."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last_success: float | None = None
        self._reported = False

    def now(self) -> float:
        """The outage's clock: what to note as `began` before a request."""
        return self._clock()

    @property
    def up(self) -> bool | None:
        """True after a success, False after a failure, None before either."""
        with self._lock:
            return None if not self._reported else self._since is None

    def failed(self, began: float | None = None) -> None:
        """A request failed; `began`: when it started (now() then), else it failed at once."""
        with self._lock:
            self._reported = True
            start = self._clock() if began is None else began
            if self._last_success is not None:
                start = max(start, self._last_success)
            if self._since is None or start < self._since:
                self._since = start

    def succeeded(self) -> float | None:
        """Ends an outage; returns how long it lasted (None when there was none)."""
        with self._lock:
            self._reported = True
            self._last_success = self._clock()
            since, self._since = self._since, None
        return None if since is None else self._last_success - since

    def seconds(self) -> float:
        """How long it has been failing (0 while it works)."""
        with self._lock:
            return 0.0 if self._since is None else self._clock() - self._since

    def degraded(self) -> bool:
        return self.seconds() > DEGRADED_AFTER_SECONDS


class Reachability:
    """Whether polls of a service get through: an Outage, and one log line per change (a daemon
    off EC2 must not log an error every second). `name` prefixes the events, e.g.
    `imds_reachable` / `imds_unreachable`; `context` goes into both."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic,
                 **context: str) -> None:
        self.outage = Outage(clock)
        self._name = name
        self._context = context
        self._reachable: bool | None = None
        self._lock = threading.Lock()

    def report(self, reachable: bool, error: str = "", began: float | None = None) -> None:
        """One poll's outcome; `began`: when it started (outage.now()), so a poll that hung
        until it gave up counts as failing from its start."""
        if reachable:
            self.outage.succeeded()
        else:
            self.outage.failed(began)
        with self._lock:
            changed, self._reachable = reachable != self._reachable, reachable
        if not changed:
            return
        if reachable:
            log.info(f"{self._name}_reachable", **self._context)
        else:
            log.warning(f"{self._name}_unreachable", error=error, **self._context)


def s3_error_class(response: tuple[Any, Any] | None,
                   caught_exception: BaseException | None) -> str | None:
    """The class of a failed attempt (`SlowDown`, `AccessDenied`, `ConnectionError`,
    `ReadTimeout` ...), or None when S3 answered normally (a 404 is an answer too)."""
    if caught_exception is not None:
        if isinstance(caught_exception, ReadTimeoutError):
            return "ReadTimeout"
        if isinstance(caught_exception, ConnectTimeoutError):
            return "ConnectTimeout"
        if isinstance(caught_exception, (BotoConnectionError, ConnectionClosedError)):
            return "ConnectionError"  # refused, reset, closed mid-reply
        return type(caught_exception).__name__
    if response is None:
        return None
    http, parsed = response
    status = int(getattr(http, "status_code", 0))
    if status < 400 or status == 404:
        return None
    error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
    code = error.get("Code") if isinstance(error, dict) else None
    return str(code) if code else f"HTTP{status}"


class S3Watch:
    """Counts every failed S3 attempt by class and tells when failures become an outage."""

    def __init__(self, count: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self.outage = Outage(clock)
        self._lock = threading.Lock()
        self.errors: Counter[str] = Counter()  # since the start
        self._in_outage: Counter[str] = Counter()  # since the last success
        self._logged = False

    def attach(self, client: S3Client) -> None:
        client.meta.events.register("needs-retry.s3", self._on_attempt)

    def _on_attempt(self, response: tuple[Any, Any] | None = None,
                    caught_exception: BaseException | None = None, **kwargs: Any) -> None:
        # Returns None: the retry decision stays with botocore's own handler.
        self.record(s3_error_class(response, caught_exception))

    def record(self, error: str | None) -> None:
        """One request's end: None when S3 answered normally, else the error's class."""
        if error is None:
            self._succeeded()
        else:
            self._failed(error)

    def _failed(self, error: str) -> None:
        with self._lock:
            self.errors[error] += 1
            self._in_outage[error] += 1
        self._count(error)
        self.outage.failed()
        self.check()

    def _succeeded(self) -> None:
        lasted = self.outage.succeeded()
        with self._lock:
            errors, self._in_outage = dict(self._in_outage), Counter()
            logged, self._logged = self._logged, False
        if logged and lasted is not None:
            log.info("s3_recovered", after_seconds=round(lasted, 1), errors=errors)

    def check(self) -> None:
        """Log `s3_degraded` once per outage, as soon as it has lasted long enough."""
        if not self.outage.degraded():
            return
        with self._lock:
            if self._logged or not self._in_outage:  # logged already, or just recovered
                return
            self._logged = True
            errors = dict(self._in_outage)
        log.warning("s3_degraded", error_class=max(errors, key=errors.__getitem__),
                    errors=errors, failing_seconds=round(self.outage.seconds(), 1))

    def degraded_reason(self) -> str | None:
        if not self.outage.degraded():
            return None
        with self._lock:
            classes = ", ".join(sorted(self._in_outage))
        return f"S3 requests failing for {self.outage.seconds():.0f}s ({classes})"


class Liveness:
    """When the transfers in flight last moved; thread-safe (the SDKs report progress on their
    own threads).

    Invariant: stalled_reason(n) names a stall exactly when n > 0 transfers are in flight and
    none of them has moved for more than DEGRADED_AFTER_SECONDS, moving being a transfer
    starting, bytes sent or received, or a transfer ending (failed or not). A start counts,
    so a transfer begun after an idle spell has the whole threshold for its first bytes; the
    caller counts the transfers in flight after telling of a start (see Uploader.submit).
    """

    def __init__(self, what: str = "uploads",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._moved_at = clock()
        self._stalled = False  # the last stalled_reason found a stall (logged once)

    def moved(self, *_: object) -> None:
        """A transfer started, moved bytes or ended (a progress callback's signature too)."""
        with self._lock:
            self._moved_at = self._clock()

    def quiet_seconds(self, in_flight: int) -> float:
        """How long `in_flight` transfers have not moved (0 when none is in flight)."""
        if in_flight <= 0:
            return 0.0
        with self._lock:
            return max(0.0, self._clock() - self._moved_at)

    def stalled_reason(self, in_flight: int) -> str | None:
        """Why the daemon is degraded while transfers in flight stall, else None; logs
        `s3_not_answering` once a stall begins and `s3_answering` once it ends."""
        quiet = self.quiet_seconds(in_flight)
        stalled = quiet > DEGRADED_AFTER_SECONDS
        with self._lock:
            changed, self._stalled = stalled != self._stalled, stalled
        if changed and stalled:
            log.warning("s3_not_answering", in_flight=in_flight, quiet_seconds=round(quiet, 1))
        elif changed:
            log.info("s3_answering")
        if not stalled:
            return None
        return (f"S3 not answering: {in_flight} {self._what} in flight, "
                f"no progress for {quiet:.0f}s")


def unreachable_reason(what: str, outage: Outage | None) -> str | None:
    """Why /healthz is degraded when polls of `what` have failed long enough, else None."""
    if outage is None or not outage.degraded():
        return None
    return f"{what} unreachable for {outage.seconds():.0f}s"
