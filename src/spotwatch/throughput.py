"""Upload bandwidth as observed, and what a flush can make before its deadline."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotwatch.planner import PendingFile

WINDOW_SECONDS = 30.0
# Before anything was measured: a cautious guess for one instance to a same-region bucket.
ASSUMED_BYTES_PER_SECOND = 50 * 2**20


class ThroughputMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, float, int]] = deque()  # (start, end, bytes)

    def record(self, size: int, seconds: float) -> None:
        end = self._clock()
        self._samples.append((end - seconds, end, size))
        while self._samples and self._samples[0][1] < end - WINDOW_SECONDS:
            self._samples.popleft()

    def bytes_per_second(self) -> float | None:
        """Bytes finished in the window over the time uploads were running in it."""
        if not self._samples:
            return None
        start = min(s[0] for s in self._samples)
        end = max(s[1] for s in self._samples)
        total = sum(s[2] for s in self._samples)
        return total / max(end - start, 1e-3)


@dataclass(frozen=True)
class FlushPlan:
    files: int
    bytes: int
    bytes_per_second: float
    measured: bool
    estimated_seconds: float
    at_risk_sets: tuple[str, ...]  # sets whose last byte is due after the deadline


def plan_flush(ordered: Sequence[PendingFile], seconds_left: float | None,
               measured: float | None) -> FlushPlan:
    rate = measured or ASSUMED_BYTES_PER_SECOND
    total = sum(item.size for item in ordered)
    at_risk: list[str] = []
    if seconds_left is not None:
        budget = rate * max(seconds_left, 0.0)
        done = 0
        for item in ordered:
            done += item.size
            if done > budget and item.set_key not in at_risk:
                at_risk.append(item.set_key)
    return FlushPlan(len(ordered), total, rate, measured is not None, total / rate,
                     tuple(at_risk))
