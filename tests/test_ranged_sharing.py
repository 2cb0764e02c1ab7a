"""Ranged downloads under way at once share the range workers evenly (ranged_get.RangedGetter):
a download starts a range only while it has fewer under way than its share, so a second file
is not left waiting until the first one's ranges are all done."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.ranged_get import RangedGetter, range_size, split

PART = 1024
WORKERS = 4  # of the tests where two downloads share them
WAIT = 30.0


class GatedClient:
    """get_object of objects held in memory; each GET waits until the test releases it (or
    opens the gate for all), and the client keeps which ranges are under way."""

    def __init__(self, objects: dict[str, bytes], gated: bool = True) -> None:
        self.objects = objects
        self.gated = gated
        self.changed = threading.Condition()
        self.under_way: list[tuple[str, str]] = []  # (key, range) in the order they started
        self.started: list[str] = []  # the key of each GET, in the order they started
        self.released: set[tuple[str, str]] = set()
        self.failing: str | None = None  # a range header whose GET fails once released

    def get_object(self, Bucket: str, Key: str,
                   Range: str | None = None) -> dict[str, Any]:
        data = self.objects[Key]
        Range = Range or f"bytes=0-{len(data) - 1}"
        entry = (Key, Range)
        with self.changed:
            self.under_way.append(entry)
            self.started.append(Key)
            self.changed.notify_all()
            released = (not self.gated
                        or self.changed.wait_for(lambda: entry in self.released, WAIT))
            self.under_way.remove(entry)
            self.changed.notify_all()
        if not released:
            raise TimeoutError(f"{Key} {Range} never released")
        if Range == self.failing:
            raise OSError("connection reset")
        start, end = (int(n) for n in Range.removeprefix("bytes=").split("-"))
        return {"Body": io.BytesIO(data[start:end + 1]),
                "ContentRange": f"bytes {start}-{end}/{len(data)}"}

    def wait_until(self, condition: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, WAIT), self.under_way

    def release(self, key: str, count: int) -> None:
        """Lets the first `count` GETs of key under way end."""
        with self.changed:
            self.release_ranges([entry for entry in self.under_way if entry[0] == key][:count])

    def release_ranges(self, entries: list[tuple[str, str]]) -> None:
        """Lets these GETs (key, range header) end."""
        with self.changed:
            self.released.update(entries)
            self.changed.notify_all()

    def open_gate(self) -> None:
        with self.changed:
            self.gated = False
            self.released.update(self.under_way)
            self.changed.notify_all()

    def keys_under_way(self) -> list[str]:
        with self.changed:
            return sorted(key for key, _ in self.under_way)


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that keeps the key of each range submitted to it."""

    def __init__(self, workers: int, client: GatedClient) -> None:
        super().__init__(max_workers=workers)
        self.client = client
        self.submitted: list[str] = []
        self.cancels = 0  # cancel() calls on the futures it handed out

    def _count_cancel(self, cancel: Callable[[], bool]) -> bool:
        with self.client.changed:
            self.cancels += 1
            self.client.changed.notify_all()
        return cancel()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with self.client.changed:
            self.submitted.append(args[0])
            self.client.changed.notify_all()
        future = super().submit(fn, *args, **kwargs)
        future.cancel = partial(self._count_cancel, future.cancel)  # type: ignore[method-assign]
        return future


def object_of(parts: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(parts * PART))


def start(getter: RangedGetter, key: str, size: int, path: Path, errors: list[BaseException],
          digests: list[bytes] | None = None,
          cancelled: threading.Event | None = None) -> threading.Thread:
    """The download on a thread of its own; its part digests (sha256) go to `digests`."""
    def run() -> None:
        try:
            got = getter.download(key, path, size, PART, None,
                                  None if digests is None else hashlib.sha256, cancelled)
        except BaseException as exc:  # handed to the test
            errors.append(exc)
        else:
            if digests is not None:
                digests.extend(got)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def held_download(client: GatedClient, pool: ThreadPoolExecutor, workers: int, path: Path,
                  errors: list[BaseException], held: int, **options: Any) -> threading.Thread:
    """Download "a" on `workers` workers, returned once `held` of its GETs are under way."""
    getter = RangedGetter(client, "bucket", pool, workers, attempts=1)
    thread = start(getter, "a", len(client.objects["a"]), path, errors, **options)
    client.wait_until(lambda: len(client.under_way) == held)
    return thread


def assert_downloaded(directory: Path, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        assert (directory / key).read_bytes() == data


def b_joins_a(client: GatedClient, pool: RecordingPool, tmp_path: Path,
              objects: dict[str, bytes], errors: list[BaseException]
              ) -> tuple[threading.Thread, threading.Thread]:
    """Download a alone takes all WORKERS; b joins, and its share is two: its first two
    ranges wait in the pool's queue until two of a's end, which leaves a at its share. Returns
    with two ranges of each under way."""
    getter = RangedGetter(client, "bucket", pool, WORKERS, attempts=1)
    first = start(getter, "a", len(objects["a"]), tmp_path / "a", errors)
    client.wait_until(lambda: len(client.under_way) == WORKERS)
    second = start(getter, "b", len(objects["b"]), tmp_path / "b", errors)
    client.wait_until(lambda: pool.submitted.count("b") == 2)
    client.release("a", 2)
    client.wait_until(lambda: client.keys_under_way() == ["a", "a", "b", "b"])
    return first, second


def test_a_second_download_gets_its_share_of_the_workers(tmp_path: Path) -> None:
    """A download alone takes every worker; once a second one joins, each freed
    worker goes to it until each has two (before, the first download's seven ranges were all
    queued ahead of the second's)."""
    objects = {"a": object_of(7, 1), "b": object_of(7, 2)}
    assert len(split(7 * PART, range_size(7 * PART, PART, WORKERS))) == 7
    client = GatedClient(objects)
    errors: list[BaseException] = []
    with RecordingPool(WORKERS, client) as pool:
        first, second = b_joins_a(client, pool, tmp_path, objects, errors)
        client.open_gate()
        finish(first, second)
    assert not errors
    assert_downloaded(tmp_path, objects)


def test_a_download_alone_takes_every_worker(tmp_path: Path) -> None:
    client = GatedClient({"a": object_of(9, 3)})
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=6) as pool:
        thread = held_download(client, pool, 6, tmp_path / "a", errors, held=6)
        client.open_gate()
        finish(thread)
    assert not errors
    assert (tmp_path / "a").read_bytes() == object_of(9, 3)


def test_a_download_that_started_its_last_range_leaves_its_share_to_the_others(
        tmp_path: Path) -> None:
    """a (seven ranges) and b (three): once b's last range has started, a's
    share is all the workers b does not hold, not half of them."""
    objects = {"a": object_of(7, 5), "b": object_of(3, 6)}
    client = GatedClient(objects)
    errors: list[BaseException] = []
    with RecordingPool(WORKERS, client) as pool:
        first, second = b_joins_a(client, pool, tmp_path, objects, errors)
        last_of_b = ("b", split(len(objects["b"]), PART)[-1].header)
        client.release("b", 2)  # b starts its last range, and shares no more
        # (a may start a range already, if it took in the end of its two released only now)
        client.wait_until(lambda: [entry for entry in client.under_way if entry[0] == "b"]
                          == [last_of_b])
        client.release("a", 1)  # a may now take the three workers b does not hold
        client.wait_until(lambda: client.keys_under_way() == ["a", "a", "a", "b"])
        client.open_gate()
        finish(first, second)
    assert not errors
    assert_downloaded(tmp_path, objects)


def test_ranges_ending_in_any_order_give_the_parts_digests_in_order(tmp_path: Path) -> None:
    workers = 5
    data = object_of(5, 7)
    client = GatedClient({"a": data})
    digests: list[bytes] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        thread = held_download(client, pool, workers, tmp_path / "a", errors, held=workers,
                               digests=digests)
        for byte_range in reversed(split(len(data), PART)):  # the last range ends first
            client.release_ranges([("a", byte_range.header)])
            client.wait_until(lambda r=byte_range: ("a", r.header) not in client.under_way)
        finish(thread)
    assert not errors
    assert digests == [hashlib.sha256(data[i:i + PART]).digest()
                       for i in range(0, len(data), PART)]


def test_a_cancelled_download_starts_no_more_ranges(tmp_path: Path) -> None:
    workers = 2
    client = GatedClient({"a": object_of(6, 8)})
    cancelled = threading.Event()
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        thread = held_download(client, pool, workers, tmp_path / "a", errors, held=workers,
                               cancelled=cancelled)
        cancelled.set()
        client.open_gate()
        finish(thread)
    assert [type(error) for error in errors] == [CancelledError]
    assert client.started.count("a") == workers


def test_a_failed_range_stops_the_download_and_starts_no_more(tmp_path: Path) -> None:
    """The first failure ends the download: ranges not started never start, and once it has
    raised no range of it is still under way (none writes to the closed file)."""
    size, workers = 12 * PART, 8
    client = GatedClient({"a": object_of(12, 4)})
    ranges = split(size, range_size(size, PART, workers))
    assert len(ranges) == 12
    client.failing = ranges[0].header
    errors: list[BaseException] = []
    with RecordingPool(workers, client) as pool:
        thread = held_download(client, pool, workers, tmp_path / "a", errors, held=workers)
        client.release_ranges([("a", ranges[0].header)])  # fails; the other ranges are held
        client.wait_until(lambda: pool.cancels > 0)  # the download saw it, and gives up
        client.open_gate()
        finish(thread)
    assert [type(error) for error in errors] == [OSError]
    assert client.started.count("a") == workers
    assert client.under_way == []


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=12 * PART), min_size=1, max_size=5),
       workers=st.integers(min_value=1, max_value=6))
def test_concurrent_downloads_each_get_exactly_their_object(
        tmp_path_factory: pytest.TempPathFactory, sizes: list[int], workers: int) -> None:
    """However many downloads share however many workers, each file ends up exactly its
    object's bytes."""
    directory = tmp_path_factory.mktemp("sharing")
    objects = {f"k{i}": object_of(-(-size // PART), i)[:size] for i, size in enumerate(sizes)}
    client = GatedClient(objects, gated=False)
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        getter = RangedGetter(client, "bucket", pool, workers, attempts=1)
        threads = [start(getter, key, len(data), directory / key, errors)
                   for key, data in objects.items()]
        finish(*threads)
    assert not errors
    assert_downloaded(directory, objects)
