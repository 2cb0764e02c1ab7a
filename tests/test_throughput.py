"""The flush plan's bandwidth estimate: aggregate bytes over busy time in a recent window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.sync.throughput import (
    MIN_MEASURED_BYTES,
    MIN_SAMPLE_BYTES,
    WINDOW_SECONDS,
    ThroughputMeter,
    busy_seconds,
)

MiB = 2**20
# (end time, seconds it ran, bytes) of one finished upload.
Transfer = tuple[float, float, int]


def estimate(transfers: list[Transfer]) -> float | None:
    """Record the transfers in the order they ended on a fake clock; the meter's estimate."""
    now = [0.0]
    meter = ThroughputMeter(clock=lambda: now[0])
    for end, seconds, size in sorted(transfers):
        now[0] = end
        meter.record(size, seconds)
    return meter.bytes_per_second()


def in_window(transfers: list[Transfer]) -> list[Transfer]:
    latest = max(end for end, _, _ in transfers)
    return [t for t in transfers if t[0] >= latest - WINDOW_SECONDS]


ends = st.floats(min_value=0, max_value=120, allow_nan=False)
durations = st.floats(min_value=0.01, max_value=20, allow_nan=False)
large = st.tuples(ends, durations, st.integers(MIN_SAMPLE_BYTES, 200 * MiB))
small = st.tuples(ends, durations, st.integers(1, MIN_SAMPLE_BYTES - 1))


def test_a_few_tiny_uploads_are_not_a_measurement() -> None:
    # The reported case: a handful of 5 KB uploads, each mostly request latency.
    assert estimate([(float(n), 0.012, 5_000) for n in range(1, 6)]) is None


def test_concurrent_uploads_add_up_and_idle_gaps_do_not_count() -> None:
    # Eight 8 MiB uploads side by side for 1 s, then another such burst after 10 s idle:
    # 64 MiB/s, neither 8 MiB/s per file nor the bytes spread over the idle gap.
    burst = [(10.0, 1.0, 8 * MiB)] * 8
    later = [(21.0, 1.0, 8 * MiB)] * 8
    assert estimate(burst + later) == pytest.approx(64 * MiB)


def test_latency_bound_uploads_do_not_drag_the_estimate_down() -> None:
    big = [(10.0, 1.0, 32 * MiB)]
    chatter = [(10.0 + n * 0.05, 0.05, 5_000) for n in range(1, 100)]
    assert estimate(big + chatter) == pytest.approx(32 * MiB)


def test_busy_time_is_the_union_of_intervals() -> None:
    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4)
    assert busy_seconds([]) == 0


@given(st.lists(large, min_size=1, max_size=30), st.data())
def test_never_below_the_slowest_large_transfer_and_monotonic_in_bytes(
        transfers: list[Transfer], data: st.DataObject) -> None:
    recent = in_window(transfers)
    rate = estimate(transfers)
    if sum(size for _, _, size in recent) < MIN_MEASURED_BYTES:
        assert rate is None
        return
    assert rate is not None
    assert rate >= min(size / seconds for _, seconds, size in recent) * (1 - 1e-9)
    total = sum(size for _, _, size in recent)
    assert rate >= total / sum(seconds for _, seconds, _ in recent) * (1 - 1e-9)
    # More bytes in the same time never lower the estimate.
    index = data.draw(st.integers(0, len(transfers) - 1))
    end, seconds, size = transfers[index]
    bigger = [*transfers]
    bigger[index] = (end, seconds, size + data.draw(st.integers(1, 100 * MiB)))
    after = estimate(bigger)
    assert after is not None and after >= rate * (1 - 1e-9)


@given(st.lists(large, min_size=1, max_size=20), st.lists(small, max_size=40))
def test_small_uploads_never_change_the_estimate(transfers: list[Transfer],
                                                 chatter: list[Transfer]) -> None:
    latest = max(end for end, _, _ in transfers)
    chatter = [(min(end, latest), seconds, size) for end, seconds, size in chatter]
    assert estimate(transfers + chatter) == estimate(transfers)


