"""Files whose upload failed wait here for their next attempt, with capped exponential backoff.

A file that fails again and again is tried less and less often (5 s, 10 s, 20 s ... at most
every two minutes) instead of every few seconds forever. After a few failures, or after a
failure that retrying cannot fix by itself (permission denied, 403), a file counts as
*failing*: a flush reports it as failed rather than waiting for it (see ``holds_up``), unless
its failures are transient (connection errors, timeouts, throttling, 5xx) and the flush's
deadline runs (see ``hurry``): then it is tried again within seconds, and waited for.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

# This many failures in a row and a file is failing, whatever the errors were.
FAILING_AFTER = 3
# While a deadline runs, a transient failure's wait is cut so that this many tries fit in the
# time left, and is never longer than HURRIED_CAP nor (a tight loop) shorter than HURRIED_FLOOR.
HURRIED_TRIES = 5
HURRIED_CAP = 2.0
HURRIED_FLOOR = 0.25


@dataclass(frozen=True)
class Backoff:
    """delay(n) = min(cap, base * 2**(n-1)), shortened by up to ``jitter`` of itself at random,
    so files that failed together do not all come back at once."""

    base: float = 5.0
    cap: float = 120.0
    jitter: float = 0.2

    def ceiling(self, failures: int) -> float:
        """The longest wait after the given number of failures in a row (at least one)."""
        doublings = min(max(failures, 1) - 1, 64)  # 2**64 * base is past any sane cap
        return float(min(self.cap, self.base * 2.0**doublings))

    def delay(self, failures: int, random_unit: float, left: float | None = None) -> float:
        """The wait for a random_unit drawn from [0, 1); left: the seconds a running deadline
        leaves (None: none runs), which cut it to a few seconds (hurried_ceiling)."""
        ceiling = self.ceiling(failures)
        if left is not None:
            ceiling = min(ceiling, hurried_ceiling(left))
        return ceiling * (1.0 - self.jitter * random_unit)


def hurried_ceiling(left: float) -> float:
    """The longest wait after a transient failure with `left` seconds to a deadline: several
    tries fit in them, a few seconds at most."""
    return min(HURRIED_CAP, max(HURRIED_FLOOR, left / HURRIED_TRIES))


@dataclass
class _Waiting(Generic[T]):
    item: T
    due: float


class RetryQueue(Generic[K, T]):
    """Failure counts per key, and the items waiting for their next attempt.

    Counts survive the attempts in between and end with a success (``succeeded``) or when the
    file is gone (``forget``). Not thread-safe: the engine's loop owns it.
    """

    def __init__(self, backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic,
                 random_unit: Callable[[], float] = random.random) -> None:
        self._backoff = backoff
        self._clock = clock
        self._random_unit = random_unit
        self._failures: dict[K, int] = {}
        self._permanent: set[K] = set()
        self._waiting: dict[K, _Waiting[T]] = {}
        self._hurry_until: float | None = None  # see hurry

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    def items(self) -> list[T]:
        """Everything waiting for a retry."""
        return [w.item for w in self._waiting.values()]

    def waiting(self, key: K) -> T | None:
        """The item waiting for its next attempt under this key, if any."""
        waiting = self._waiting.get(key)
        return waiting.item if waiting is not None else None

    def waiting_keys(self) -> Iterable[K]:
        return self._waiting.keys()

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def failed(self, key: K, item: T, permanent: bool = False) -> float:
        """Count a failure and schedule the next attempt; returns the wait in seconds."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if permanent:
            self._permanent.add(key)
        left = None if key in self._permanent else self._hurry_left()
        delay = self._backoff.delay(failures, self._random_unit(), left)
        self._waiting[key] = _Waiting(item, self._clock() + delay)
        return delay

    def hurry(self, until: float | None) -> None:
        """A flush's deadline runs until then (monotonic; None: none runs any more).

        Invariant: while it runs, a file failing for a transient reason is tried again within
        a few seconds (hurried_ceiling), whatever its backoff, and holds the flush up (see
        holds_up): S3 back a moment before the deadline gets it uploaded before the deadline.
        A file failing for a permanent reason keeps its backoff: nothing waits for it."""
        self._hurry_until = until
        left = self._hurry_left()
        if left is None:
            return
        soonest = self._clock() + hurried_ceiling(left)
        for key, waiting in self._waiting.items():
            if key not in self._permanent:
                waiting.due = min(waiting.due, soonest)

    def waits_for(self, key: K) -> bool:
        """Whether a flush waits for this key now: not failing, or failing for a transient
        reason while a deadline runs (see hurry)."""
        return not self.is_failing(key) or (key not in self._permanent
                                             and self._hurry_left() is not None)

    def _hurry_left(self) -> float | None:
        """Seconds left until the running deadline (None: none runs, or it has passed)."""
        if self._hurry_until is None:
            return None
        left = self._hurry_until - self._clock()
        return left if left > 0 else None

    def succeeded(self, key: K) -> None:
        self.forget(key)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)
        self._permanent.discard(key)
        self._waiting.pop(key, None)

    def drop_waiting(self, key: K) -> None:
        """A newer version is queued: its retry is not needed, its failure count stays."""
        self._waiting.pop(key, None)

    def take_due(self) -> list[T]:
        """The items whose wait is over, no longer waiting."""
        now = self._clock()
        due = [key for key, waiting in self._waiting.items() if waiting.due <= now]
        return [self._waiting.pop(key).item for key in due]

    def retry_now(self) -> None:
        """Every waiting item is due at once (a flush gives each file one more chance)."""
        now = self._clock()
        for waiting in self._waiting.values():
            waiting.due = min(waiting.due, now)

    def is_failing(self, key: K) -> bool:
        return key in self._permanent or self._failures.get(key, 0) >= FAILING_AFTER

    def holds_up(self, key: K, deadline: float | None) -> bool:
        """Whether a flush should wait for this waiting item.

        Invariant: a flush never waits for a file failing for a permanent reason, nor for a
        retry that would only come after the flush's deadline; it waits for a file failing
        for a transient reason only while its deadline runs (see hurry). It reports the
        files it does not wait for as failed instead.
        """
        waiting = self._waiting.get(key)
        if waiting is None or key in self._permanent:
            return False
        if self.is_failing(key):
            until = self._hurry_until
            return until is not None and self._clock() < until and waiting.due <= until
        return deadline is None or waiting.due <= deadline

    def failing(self) -> list[T]:
        """Waiting items that count as failing."""
        return [w.item for key, w in self._waiting.items() if self.is_failing(key)]
