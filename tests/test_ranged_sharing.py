"""Ranged downloads under way at once share the range workers evenly (ranged_get.RangedGetter):
a download starts a range only while it has fewer under way than its share, so a second file
is not left waiting until the first one's ranges are all done."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.ranged_get import RangedGetter, range_size, split

PART = 1024
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
        self.failing: str | None = None  # a range header whose GET fails at once

    def get_object(self, Bucket: str, Key: str,
                   Range: str | None = None) -> dict[str, Any]:
        data = self.objects[Key]
        Range = Range or f"bytes=0-{len(data) - 1}"
        entry = (Key, Range)
        with self.changed:
            self.under_way.append(entry)
            self.started.append(Key)
            self.changed.notify_all()
            released = (not self.gated or Range == self.failing
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
            self.released.update([entry for entry in self.under_way if entry[0] == key][:count])
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

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with self.client.changed:
            self.submitted.append(args[0])
            self.client.changed.notify_all()
        return super().submit(fn, *args, **kwargs)


def object_of(parts: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(parts * PART))


def start(getter: RangedGetter, key: str, size: int, path: Path,
          errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            getter.download(key, path, size, PART, None, None)
        except BaseException as exc:  # handed to the test
            errors.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_second_download_gets_its_share_of_the_workers(tmp_path: Path) -> None:
    """Four workers: a download alone takes all four; once a second one joins, each freed
    worker goes to it until each has two (before, the first download's seven ranges were all
    queued ahead of the second's)."""
    workers = 4
    objects = {"a": object_of(7, 1), "b": object_of(7, 2)}
    client = GatedClient(objects)
    assert len(split(7 * PART, range_size(7 * PART, PART, workers))) == 7
    errors: list[BaseException] = []
    with RecordingPool(workers, client) as pool:
        getter = RangedGetter(client, "bucket", pool, workers, attempts=1)  # type: ignore[arg-type]
        first = start(getter, "a", 7 * PART, tmp_path / "a", errors)
        client.wait_until(lambda: len(client.under_way) == workers)
        second = start(getter, "b", 7 * PART, tmp_path / "b", errors)
        # b's share is two: its first two ranges wait in the pool's queue for a worker
        client.wait_until(lambda: pool.submitted.count("b") == 2)
        client.release("a", 2)  # two of a's ranges end: a is down to two, its share
        client.wait_until(lambda: len(client.under_way) == workers
                          and sum(key == "b" for key, _ in client.under_way) == 2)
        assert client.keys_under_way() == ["a", "a", "b", "b"]
        client.open_gate()
        first.join(WAIT)
        second.join(WAIT)
    assert not errors
    for key, data in objects.items():
        assert (tmp_path / key).read_bytes() == data


def test_a_download_alone_takes_every_worker(tmp_path: Path) -> None:
    client = GatedClient({"a": object_of(9, 3)})
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=6) as pool:
        getter = RangedGetter(client, "bucket", pool, 6, attempts=1)  # type: ignore[arg-type]
        thread = start(getter, "a", 9 * PART, tmp_path / "a", errors)
        client.wait_until(lambda: len(client.under_way) == 6)
        client.open_gate()
        thread.join(WAIT)
    assert not errors
    assert (tmp_path / "a").read_bytes() == object_of(9, 3)


def test_a_failed_range_stops_the_download_and_starts_no_more(tmp_path: Path) -> None:
    """The first failure ends the download: ranges not started never start, and once it has
    raised no range of it is still under way (none writes to the closed file)."""
    size, workers = 12 * PART, 8
    client = GatedClient({"a": object_of(12, 4)})
    ranges = split(size, range_size(size, PART, workers))
    assert len(ranges) == 12
    client.failing = ranges[0].header  # fails at once; the other ranges are held
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        getter = RangedGetter(client, "bucket", pool, workers, attempts=1)  # type: ignore[arg-type]
        thread = start(getter, "a", size, tmp_path / "a", errors)
        client.wait_until(lambda: len(client.under_way) == workers - 1)
        client.open_gate()
        thread.join(WAIT)
        assert not thread.is_alive()
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
        getter = RangedGetter(client, "bucket", pool, workers, attempts=1)  # type: ignore[arg-type]
        threads = [start(getter, key, len(data), directory / key, errors)
                   for key, data in objects.items()]
        for thread in threads:
            thread.join(WAIT)
    assert not errors
    for key, data in objects.items():
        assert (directory / key).read_bytes() == data
