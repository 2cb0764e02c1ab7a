"""The retry queue's backoff and flush rules, on a fake clock (no waiting)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.sync.retry import FAILING_AFTER, Backoff, RetryQueue

backoffs = st.builds(Backoff, base=st.floats(0.01, 60), cap=st.floats(0.01, 3600),
                     jitter=st.floats(0, 0.9))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def queue(clock: FakeClock, random_unit: float = 0.0) -> RetryQueue[str, str]:
    return RetryQueue(Backoff(base=5, cap=120, jitter=0.2), clock, lambda: random_unit)


@given(backoffs, st.integers(1, 10_000))
def test_backoff_grows_and_is_capped(backoff: Backoff, failures: int) -> None:
    ceiling = backoff.ceiling(failures)
    assert backoff.ceiling(failures + 1) >= ceiling
    assert min(backoff.base, backoff.cap) <= ceiling <= backoff.cap


@given(backoffs, st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_jitter_only_shortens_the_wait(backoff: Backoff, failures: int, unit: float) -> None:
    ceiling = backoff.ceiling(failures)
    assert ceiling * (1 - backoff.jitter) <= backoff.delay(failures, unit) <= ceiling


def test_delays_double_up_to_the_cap() -> None:
    assert [Backoff(base=5, cap=120).ceiling(n) for n in range(1, 8)] == [
        5, 10, 20, 40, 80, 120, 120]


def test_an_item_comes_back_only_when_its_wait_is_over() -> None:
    clock = FakeClock()
    retries = queue(clock)
    assert retries.failed("a", "A") == 5
    assert retries.take_due() == [] and len(retries) == 1
    clock.now += 4.9
    assert retries.take_due() == []
    clock.now += 0.1
    assert retries.take_due() == ["A"] and len(retries) == 0
    assert retries.failed("a", "A") == 10  # the count survives the attempt in between
    retries.succeeded("a")
    assert retries.failures("a") == 0 and "a" not in retries


def test_a_file_that_keeps_failing_becomes_failing_and_stops_holding_up_flushes() -> None:
    clock = FakeClock()
    retries = queue(clock)
    for _ in range(FAILING_AFTER - 1):
        retries.failed("a", "A")
        assert not retries.is_failing("a")
        assert retries.holds_up("a", deadline=None)
    retries.failed("a", "A")
    assert retries.is_failing("a") and not retries.holds_up("a", deadline=None)
    assert retries.failing() == ["A"]


def test_a_permanent_failure_is_failing_at_once() -> None:
    retries = queue(FakeClock())
    retries.failed("a", "A", permanent=True)
    assert retries.is_failing("a") and not retries.holds_up("a", None)


def test_a_retry_after_the_deadline_does_not_hold_up_a_flush() -> None:
    clock = FakeClock()
    retries = queue(clock)
    retries.failed("a", "A")  # due at now + 5
    assert retries.holds_up("a", deadline=clock.now + 5)
    assert not retries.holds_up("a", deadline=clock.now + 4)


def test_retry_now_makes_every_waiting_item_due() -> None:
    clock = FakeClock()
    retries = queue(clock)
    retries.failed("a", "A")
    retries.failed("b", "B")
    retries.retry_now()
    assert sorted(retries.take_due()) == ["A", "B"]


def test_a_newer_version_drops_the_wait_but_keeps_the_count() -> None:
    retries = queue(FakeClock())
    retries.failed("a", "A")
    retries.drop_waiting("a")
    assert "a" not in retries and retries.failures("a") == 1
    retries.forget("a")
    assert retries.failures("a") == 0
