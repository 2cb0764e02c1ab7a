"""Files whose upload failed wait here for their next attempt, with capped exponential backoff.

A file that fails again and again is tried less and less often (5 s, 10 s, 20 s ... at most
every two minutes) instead of every few seconds forever. After a few failures, or after a
failure that retrying cannot fix by itself (permission denied, 403), a file counts as
*failing*: a flush reports it as failed rather than waiting for it (see ``holds_up``).
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

    def delay(self, failures: int, random_unit: float) -> float:
        """The wait for a random_unit drawn from [0, 1)."""
        return self.ceiling(failures) * (1.0 - self.jitter * random_unit)


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
        delay = self._backoff.delay(failures, self._random_unit())
        self._waiting[key] = _Waiting(item, self._clock() + delay)
        return delay

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

        Invariant: a flush never waits for a failing file, nor for a retry that would only
        come after the flush's deadline; it reports such files as failed instead.
        """
        waiting = self._waiting.get(key)
        if waiting is None or self.is_failing(key):
            return False
        return deadline is None or waiting.due <= deadline

    def failing(self) -> list[T]:
        """Waiting items that count as failing."""
        return [w.item for key, w in self._waiting.items() if self.is_failing(key)]
