"""Upload bandwidth as observed, and what a flush can make before its deadline."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from spotwatch.sync.planner import PendingFile

# The estimate covers the uploads that ended within this long of the latest one.
WINDOW_SECONDS = 30.0
# Smaller uploads are dominated by request latency, not bandwidth: they do not count.
MIN_SAMPLE_BYTES = 1 * 2**20
# Below this many counted bytes in the window the estimate is a guess: use the assumed rate.
MIN_MEASURED_BYTES = 16 * 2**20
# Memory bound for a burst of many uploads within the window.
MAX_SAMPLES = 4096
# Before anything was measured: a cautious guess for one instance to a same-region bucket.
ASSUMED_BYTES_PER_SECOND = 50 * 2**20


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time at least one upload was running."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(end - start for start, end in merged)


class ThroughputMeter:
    """Aggregate upload bandwidth: bytes moved over busy time in a recent window.

    Concurrent uploads share their busy time, so the estimate is what the connections move
    together, not a per-file rate; latency-bound small uploads neither add bytes nor time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, float, int]] = deque(maxlen=MAX_SAMPLES)

    def record(self, size: int, seconds: float) -> None:
        if size < MIN_SAMPLE_BYTES:
            return
        end = self._clock()
        self._samples.append((end - max(seconds, 0.0), end, size))
        while self._samples and self._samples[0][1] < end - WINDOW_SECONDS:
            self._samples.popleft()

    def bytes_per_second(self) -> float | None:
        """The measured rate, or None until the window holds enough bytes to tell."""
        total = sum(size for _, _, size in self._samples)
        if total < MIN_MEASURED_BYTES:
            return None
        busy = busy_seconds((start, end) for start, end, _ in self._samples)
        return total / max(busy, 1e-3)


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
