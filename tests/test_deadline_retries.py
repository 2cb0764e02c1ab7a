"""While a flush's deadline runs, files failing for a transient reason (S3 unreachable, 5xx,
throttling) are retried within seconds and waited for; files failing for a permanent reason
(access denied) keep their backoff and are not waited for. On fake clocks, in milliseconds."""

from __future__ import annotations

from pathlib import Path

from spotwatch.daemon.flush import FlushController
from spotwatch.sync.retry import FAILING_AFTER, Backoff, RetryQueue

from .memory_store import FakeClock, InMemoryObjectStore
from .test_failure_paths import BACKOFF, engine_on, pump_until, write
from .test_flush_controller import FakeClock as FlushClock
from .test_flush_controller import Work, in_seconds

DEADLINE = 30.0  # seconds from now
FEW_SECONDS = 3.0  # the longest wait for a transient failure's retry while a deadline runs


def failing_queue(clock: FakeClock, permanent: bool = False) -> RetryQueue[str, str]:
    """A queue holding "a", failing: transient failures in a row, or one permanent."""
    retries: RetryQueue[str, str] = RetryQueue(Backoff(base=5, cap=120, jitter=0.2), clock,
                                               lambda: 0.0)
    for _ in range(1 if permanent else FAILING_AFTER + 3):
        retries.failed("a", "A", permanent=permanent)
    assert retries.is_failing("a")
    return retries


def test_a_transient_failure_is_retried_within_seconds_while_a_deadline_runs() -> None:
    clock = FakeClock()
    retries = failing_queue(clock)  # its backoff is past a minute by now
    until = clock.now + DEADLINE
    retries.hurry(until)
    assert retries.take_due() == [] and retries.holds_up("a", deadline=until)
    clock.advance(FEW_SECONDS)
    assert retries.take_due() == ["A"]  # its long wait was cut short
    tries = 0
    while clock.now < until:
        wait = retries.failed("a", "A")
        assert 0 < wait <= FEW_SECONDS
        assert wait <= max(0.25, (until - clock.now) / 2)  # several tries fit, no busy loop
        # Waited for unless even the shortest wait ends past the deadline.
        assert retries.holds_up("a", deadline=until) is (clock.now + wait <= until)
        tries += 1
        clock.advance(wait)
        assert retries.take_due() == ["A"]
    assert tries >= DEADLINE / FEW_SECONDS
    # The deadline passed: the flush no longer waits, and the backoff is back.
    retries.failed("a", "A")
    assert not retries.holds_up("a", deadline=until)
    retries.hurry(None)
    assert retries.failed("a", "A") == 120


def test_a_permanent_failure_keeps_its_backoff_and_holds_up_nothing() -> None:
    clock = FakeClock()
    retries = failing_queue(clock, permanent=True)
    until = clock.now + DEADLINE
    retries.hurry(until)
    clock.advance(FEW_SECONDS)
    assert retries.take_due() == [] and not retries.holds_up("a", deadline=until)
    assert retries.failed("a", "A", permanent=True) == 10  # its backoff, not a few seconds
    assert not retries.holds_up("a", deadline=until)


def test_a_transient_failure_holds_up_no_flush_when_no_deadline_runs() -> None:
    retries = failing_queue(FakeClock())
    assert not retries.holds_up("a", deadline=None)
    assert retries.failed("a", "A") == 120


def test_the_flush_hurries_until_its_deadline_or_as_long_as_it_waits() -> None:
    clock = FlushClock()
    flushes, work = FlushController(clock, write_wait=10.0), Work(clock, [])
    assert flushes.hurry_until is None  # no flush runs
    flushes.start("spot-interruption", in_seconds(clock, 120), work)
    assert flushes.hurry_until == clock.monotonic() + 120  # past write_wait: the deadline
    give_up_at = flushes.give_up_at(300.0)
    flushes.start("shutdown", None, work, until=give_up_at)
    assert flushes.hurry_until == give_up_at  # the stop outlasts the notice's deadline
    flushes.finish([])
    assert flushes.hurry_until is None

    flushes.start("manual", None, work)  # no deadline: as long as it waits for writes
    assert flushes.hurry_until == clock.monotonic() + 10
    flushes.finish([])
    flushes.start("scheduled-event", in_seconds(clock, 3 * 86400), work)  # days ahead
    assert flushes.hurry_until == clock.monotonic() + 10


def test_a_flush_waits_for_a_file_s3_failed_until_s3_is_back_not_for_a_refused_one(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    write(root, "step_1/model.pt", b"model")
    write(root, "step_2/denied.pt", b"denied")
    model = root / "step_1/model.pt"
    # S3 unreachable for the model's first tries; the other file refused for good.
    store.fail("upload_file", times=FAILING_AFTER + 2, key="run/step_1/model.pt")
    store.fail("upload_file", times=None, key="run/step_2/denied.pt", permanent=True)
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: engine.retries.is_failing(model), clock,
                   step=BACKOFF.ceiling(1))
        until = clock.now + DEADLINE
        engine.retries.retry_now()  # as a flush starts
        engine.retries.hurry(until)
        pump_until(engine, lambda: engine.retries.failures(model) > FAILING_AFTER, clock)
        assert not engine.flush_settled(until)  # S3 may be back in a moment: waited for
        pump_until(engine, lambda: "run/step_1/model.pt" in store.objects, clock, step=0.1)
        assert clock.now < until  # by the deadline, though its backoff was at 20 s and more
        pump_until(engine, lambda: engine.flush_settled(until), clock, step=0.1)
        assert clock.now < until
        assert engine.left_behind(until) == [engine.retries.waiting(root / "step_2/denied.pt")]
        assert "run/step_2/denied.pt" not in store.objects


def test_a_manifest_s3_failed_is_retried_and_waited_for_while_a_deadline_runs(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """A set's files alone are no checkpoint: its manifest write is hurried as a file is."""
    root = tmp_path / "ckpt"
    write(root, "step_1/model.pt", b"model")
    manifest = "run/.spotwatch/manifests/step_1.json"
    store.fail("put_bytes", times=FAILING_AFTER + 2, key=manifest)
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        # Failing: no flush waits for it any more, and its next try is far off.
        pump_until(engine, lambda: "run/step_1/model.pt" in store.objects
                   and "run/step_1" in engine.sealer.incomplete
                   and not engine.sealer.unsealed(), clock, step=1.0)
        until = clock.now + DEADLINE
        engine.sealer.hurry(until)
        assert engine.sealer.unsealed() == {"run/step_1"}  # waited for while the deadline runs
        pump_until(engine, lambda: manifest in store.objects, clock, step=0.1)
        assert clock.now < until
        engine.sealer.hurry(None)
