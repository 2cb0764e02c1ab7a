"""The preflight checks `run` must pass before anything touches S3 (they are what refuse a
bucket in another region or a public one), run on a thread of their own: while S3 does not
answer, a run of them takes up to a minute of botocore's retries, and the loop meanwhile keeps
telling the trainer of notices. While S3 is only unreachable they run again, with backoff."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from spotwatch.aws.preflight import CheckResult, failures, only_unreachable
from spotwatch.logs import get_logger
from spotwatch.sync.retry import Backoff

log = get_logger("spotwatch")

# Between runs of the checks while S3 is unreachable: soon after a blip, at most every 30 s.
CHECKS_BACKOFF = Backoff(base=2.0, cap=30.0, jitter=0.2)


@dataclass(frozen=True)
class Verdict:
    """A finished run of the checks: passed, refused (the first failure) or unreachable."""

    results: list[CheckResult]

    @property
    def refusal(self) -> CheckResult | None:
        """The first failure S3's coming back would not mend: S3 unreachable is no reason
        to name when another check refuses (the instance in another region, say)."""
        return next((r for r in failures(self.results) if not r.unreachable), None)

    @property
    def unreachable(self) -> CheckResult | None:
        return failures(self.results)[0] if only_unreachable(self.results) else None


class StartChecks:
    """Runs the checks on a thread when due; `poll` returns each run's verdict once, from the
    loop. Not thread-safe otherwise: the loop owns it."""

    def __init__(self, run: Callable[[], list[CheckResult]],
                 backoff: Backoff = CHECKS_BACKOFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self._backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._finished: Verdict | None = None
        self._error: Exception | None = None  # raised by a run, raised again on the loop
        self._running = False
        self._due = 0.0
        self.attempts = 0  # runs that found S3 unreachable

    def poll(self) -> Verdict | None:
        """Starts a run when one is due; the verdict of a run that finished, else None."""
        with self._lock:
            verdict, self._finished = self._finished, None
            error, self._error = self._error, None
            running = self._running
        if error is not None:
            raise error
        if verdict is not None:
            if verdict.unreachable is not None:
                self.attempts += 1
                self._due = self._clock() + self._backoff.delay(self.attempts, random.random())
            return verdict
        if not running and self._clock() >= self._due:
            with self._lock:
                self._running = True
            threading.Thread(target=self._check, name="preflight", daemon=True).start()
        return None

    def _check(self) -> None:
        try:
            verdict, error = Verdict(self._run()), None
        except Exception as exc:  # e.g. a bad SDK setting: the loop reports it, not the thread
            verdict, error = None, exc
        with self._lock:
            self._finished, self._error = verdict, error
            self._running = False

    @property
    def next_in(self) -> float:
        """Seconds until the next run starts (0 while one runs or is due)."""
        return max(0.0, self._due - self._clock())


def log_results(results: list[CheckResult]) -> None:
    for result in results:
        log.info("check", name=result.name, ok=result.ok, detail=result.detail)
