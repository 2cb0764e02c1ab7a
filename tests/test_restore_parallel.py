"""Restore downloads a set's files concurrently, and a failure in one worker while another is
mid-download still leaves nothing but verified, complete sets behind (in-memory store)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.store import PendingDownload, StoreError
from spotwatch.checksums import Expected
from spotwatch.errors import SpotwatchError
from spotwatch.keys import (
    NAME_MAX,
    RESTORE_TEMP_SUFFIX,
    is_restore_temporary,
    manifest_key,
    restore_temporary_name,
)
from spotwatch.progress import Progress
from spotwatch.sync.placement import kept_name
from spotwatch.sync.restore.destination import temporary
from spotwatch.sync.restore.set_fetch import RestoreReport, restore_newest
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import is_complete, list_manifests

from .conftest import wait_for
from .memory_store import InMemoryObjectStore
from .test_failure_paths import PREFIX, put_set


@pytest.fixture
def store() -> Iterator[InMemoryObjectStore]:
    memory = InMemoryObjectStore(max_concurrency=4)
    yield memory
    memory.close()


class Background:
    """restore_newest on a thread of its own, so the test can watch it and release gates."""

    def __init__(self, store: InMemoryObjectStore, destination: Path) -> None:
        self.report: RestoreReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(store, destination))
        self._thread.start()

    def _run(self, store: InMemoryObjectStore, destination: Path) -> None:
        try:
            self.report = restore_newest(store, list_manifests(store, PREFIX), destination,
                                         "CRC32", None)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive(), "restore did not finish"


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def signalling(event: threading.Event) -> Callable[[], Exception]:
    def error() -> Exception:
        event.set()
        return StoreError("injected download failure")

    return error


def test_downloads_of_a_set_overlap(tmp_path: Path, store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {"a.pt": b"a" * 50, "b.pt": b"b" * 60, "c.pt": b"c" * 70}, 1_000)
    held = store.hold("download", key="run/step_1/a.pt")
    restoring = Background(store, tmp_path / "r")
    try:
        held.entered.wait(10)
        # a.pt is held; the others are downloaded meanwhile.
        wait_for(lambda: store.calls["download"] >= 3, timeout=10)
    finally:
        held.release()
        restoring.join()
    assert restoring.error is None and restoring.report is not None
    assert restoring.report.downloaded == 3
    assert files_under(tmp_path / "r") == ["step_1/a.pt", "step_1/b.pt", "step_1/c.pt"]
    assert (tmp_path / "r/step_1/c.pt").read_bytes() == b"c" * 70


def test_a_failing_download_while_another_is_held_leaves_no_temporaries(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {"a.pt": b"a" * 50, "b.pt": b"b" * 60}, 1_000)
    failed = threading.Event()
    held = store.hold("download", key="run/step_1/a.pt")
    store.fail("download", key="run/step_1/b.pt", error=signalling(failed))
    restoring = Background(store, tmp_path / "r")
    try:
        assert held.entered.wait(10)
        assert failed.wait(10), "b.pt was not downloaded while a.pt was held"
    finally:
        held.release()  # a.pt's temporary is written after the failure, then removed
        restoring.join()
    assert isinstance(restoring.error, SpotwatchError)
    assert "injected download failure" in str(restoring.error)
    assert files_under(tmp_path / "r") == []


def test_a_corrupt_file_while_another_is_held_falls_back_to_the_older_set(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {"a.pt": b"1" * 50, "b.pt": b"1" * 60}, 1_000)
    put_set(store, "step_2", {"a.pt": b"2" * 50, "b.pt": b"2" * 60}, 2_000)
    store.put("run/step_2/b.pt", b"X" * 60)  # listed size, other bytes
    held = store.hold("download", key="run/step_2/a.pt")
    restoring = Background(store, tmp_path / "r")
    try:
        assert held.entered.wait(10)
        wait_for(lambda: store.calls["download"] >= 2, timeout=10)
    finally:
        held.release()
        restoring.join()
    assert restoring.error is None and restoring.report is not None
    assert (restoring.report.set_name, restoring.report.passed_over) == ("step_1", ("step_2",))
    assert files_under(tmp_path / "r") == ["step_1/a.pt", "step_1/b.pt"]
    assert not any(RESTORE_TEMP_SUFFIX in name for name in files_under(tmp_path / "r"))
    assert (tmp_path / "r/step_1/b.pt").read_bytes() == b"1" * 60


def test_completeness_is_one_listing_not_a_head_per_file(tmp_path: Path,
                                                         store: InMemoryObjectStore) -> None:
    """Before downloading, restore checks every listed object is there with its size: for a
    set of many small files a HEAD each cost more than the downloads themselves."""
    put_set(store, "step_1", {f"shard_{i:04d}.pt": b"x" * (i % 7) for i in range(1500)}, 1)
    put_set(store, "step_10", {"other.pt": b"y"}, 0)  # shares step_1's key prefix
    [manifest] = [m for m in list_manifests(store, PREFIX) if m.set_name == "step_1"]
    store.calls.clear()
    report = restore_newest(store, [manifest], tmp_path, "CRC32", None)
    assert report is not None and report.downloaded == 1500
    assert store.calls["head"] == 0
    assert store.calls["list_objects"] == 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3), min_size=1, max_size=6),
       missing=st.sets(st.integers(0, 5)), resized=st.sets(st.integers(0, 5)),
       extra=st.booleans())
def test_a_set_is_complete_exactly_when_every_listed_object_has_its_size(
        sizes: list[int], missing: set[int], resized: set[int], extra: bool) -> None:
    memory = InMemoryObjectStore()
    files = {f"f{i}": b"z" * size for i, size in enumerate(sizes)}
    put_set(memory, "step", files, 1)
    for i in range(len(sizes)):
        key = PREFIX + f"step/f{i}"
        if i in missing:
            memory.objects.pop(key)
        elif i in resized:
            memory.put(key, b"z" * (sizes[i] + 1))
    if extra:  # an object the manifest does not list changes nothing
        memory.put(PREFIX + "step/unlisted", b"u")
    [manifest] = list_manifests(memory, PREFIX)
    expected = not ({i for i in range(len(sizes))} & (missing | resized))
    assert is_complete(memory, manifest) is expected


def test_completeness_is_checked_beside_the_downloads(tmp_path: Path,
                                                      store: InMemoryObjectStore) -> None:
    """The listing that proves a set complete does not hold its downloads back: on S3 a set of
    100,000 files takes 100 listings one after the other."""
    put_set(store, "step_1", {f"f{i}.pt": bytes([i]) * 10 for i in range(6)}, 1_000)
    listing = store.hold("list_objects", key=PREFIX + "step_1")
    restoring = Background(store, tmp_path / "r")
    try:
        assert listing.entered.wait(10)
        wait_for(lambda: store.calls["download"] == 6, timeout=10)
        assert files_under(tmp_path / "r") == [f"step_1/{restore_temporary_name(f'f{i}.pt')}"
                                               for i in range(6)]
    finally:
        listing.release()
        restoring.join()
    assert restoring.error is None and restoring.report is not None
    assert files_under(tmp_path / "r") == [f"step_1/f{i}.pt" for i in range(6)]


def test_a_set_found_incomplete_while_downloading_leaves_nothing_behind(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    """A newer set with an object missing is passed over even though its downloads already
    started (one of them fails for the missing object): its temporaries and the folders made
    for it are removed, and the older set is restored."""
    put_set(store, "step_1", {"deep/er/a.pt": b"1" * 50}, 1_000)
    put_set(store, "step_2", {"deep/er/a.pt": b"2" * 50, "deep/b.pt": b"2" * 60}, 2_000)
    store.objects.pop(PREFIX + "step_2/deep/b.pt")
    listing = store.hold("list_objects", key=PREFIX + "step_2")
    restoring = Background(store, tmp_path / "r")
    try:
        assert listing.entered.wait(10)
        wait_for(lambda: store.calls["download"] >= 1, timeout=10)  # the missing one fails
    finally:
        listing.release()
        restoring.join()
    assert restoring.error is None and restoring.report is not None
    assert (restoring.report.set_name, restoring.report.passed_over) == ("step_1", ("step_2",))
    assert sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*")) \
        == ["step_1", "step_1/deep", "step_1/deep/er", "step_1/deep/er/a.pt"]


def test_a_missing_object_of_an_older_manifest_passes_the_set_over(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    """Manifests written before part sizes were recorded need a HEAD for a composite
    checksum's part size; an object missing there makes the set incomplete, not the restore
    fail."""
    put_set(store, "step_1", {"a.pt": b"1" * 50}, 1_000)
    key = PREFIX + "step_2/a.pt"
    entry = ManifestEntry(key, "step_2/a.pt", 50, 2_000, "AAAAAA==-2")  # no part_size
    store.put(manifest_key(PREFIX, "step_2"),
              Manifest.build("step_2", PREFIX, [entry]).to_json().encode())
    report = restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
    assert report is not None
    assert (report.set_name, report.passed_over) == ("step_1", ("step_2",))


def test_two_manifest_paths_to_one_file_are_refused(tmp_path: Path,
                                                     store: InMemoryObjectStore) -> None:
    """A symlinked folder already in the destination can make two listed files one: refused
    before anything is written, rather than two downloads writing into one file."""
    put_set(store, "step_1", {"a/w.pt": b"a" * 50, "b/w.pt": b"b" * 60}, 1_000)
    (tmp_path / "r/step_1/b").mkdir(parents=True)
    (tmp_path / "r/step_1/a").symlink_to("b", target_is_directory=True)
    with pytest.raises(SpotwatchError, match="lead to the same file"):
        restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
    assert store.calls["download"] == 0


class Interrupting(InMemoryObjectStore):
    """Interrupted (as by Ctrl-C) when asked for its nth download."""

    def __init__(self, nth: int) -> None:
        super().__init__(max_concurrency=4)
        self._nth = nth
        self.interrupted = threading.Event()

    def start_download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                       expected: Expected | None = None) -> PendingDownload:
        self._nth -= 1
        if self._nth == 0:
            self.interrupted.set()
            raise KeyboardInterrupt
        return super().start_download(key, path, size, progress, expected)


def test_an_interrupted_restore_waits_for_its_downloads_and_leaves_nothing(
        tmp_path: Path) -> None:
    store = Interrupting(nth=3)
    put_set(store, "step_1", {f"f{i}.pt": bytes([i]) * 10 for i in range(5)}, 1_000)
    held = store.hold("download", key=PREFIX + "step_1/f0.pt")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    restoring = threading.Thread(target=run)
    restoring.start()
    try:
        assert held.entered.wait(10) and store.interrupted.wait(10)
        # f0 is still being downloaded: restore must not return (and remove its temporaries)
        # before it ends. A bounded look, never a false failure: held, it cannot end.
        restoring.join(0.5)
        assert restoring.is_alive(), "restore returned while a download was under way"
    finally:
        held.release()
        restoring.join(30)
    store.close()
    assert not restoring.is_alive()
    assert [type(exc) for exc in outcome] == [KeyboardInterrupt]
    assert files_under(tmp_path / "r") == []  # f0's temporary too, written after the interrupt


_names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\0"),
                 min_size=1, max_size=255).filter(
    lambda name: len(name.encode()) <= NAME_MAX and name not in (".", ".."))


@settings(max_examples=300)
@given(st.lists(_names, min_size=1, max_size=8, unique=True))
def test_every_temporary_fits_and_no_two_names_share_one(names: list[str]) -> None:
    folder = Path("/r/step_1")
    temps = [temporary(folder / name) for name in names]
    for temp in temps:
        assert temp.parent == folder
        assert temp.name.startswith(".") and temp.name.endswith(RESTORE_TEMP_SUFFIX)
        assert len(os.fsencode(temp.name)) <= NAME_MAX
        assert is_restore_temporary(str(temp.relative_to("/r")))  # a daemon leaves it alone
    assert len(set(temps)) == len(names)


@settings(max_examples=300)
@given(st.lists(_names, min_size=1, max_size=8, unique=True))
def test_every_kept_copy_fits_and_is_never_a_temporary_of_the_set(names: list[str]) -> None:
    """What is in a target's way is kept under a restore temporary's name that fits NAME_MAX
    and is no temporary of the set: a file "x.kept" beside "x" takes the name first chosen."""
    folder = Path("/r/step_1")
    names = [*names, *(f"{name}.kept" for name in names
                       if len(os.fsencode(f"{name}.kept")) <= NAME_MAX)]
    taken = {temporary(folder / name) for name in names}
    for name in names:
        kept = kept_name(folder / name, taken)
        assert kept.parent == folder and kept not in taken
        assert len(os.fsencode(kept.name)) <= NAME_MAX
        assert is_restore_temporary(str(kept.relative_to("/r")))


def test_a_temporary_that_cannot_be_written_fails_the_restore_and_leaves_the_rest_alone(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {f"f{i}.pt": bytes([i]) * 10 for i in range(100)}, 1_000)
    blocker = temporary(tmp_path / "r/step_1/f50.pt")
    blocker.mkdir(parents=True)  # a directory where the temporary would go
    (blocker / "keep").write_bytes(b"not spotwatch's")
    with pytest.raises(SpotwatchError, match=r"restore of step_1 failed: .*Is a directory"):
        restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
    assert files_under(tmp_path / "r") == [f"step_1/{blocker.name}/keep"]



@pytest.mark.parametrize("error", [FileNotFoundError, PermissionError, OSError])
def test_a_file_error_without_a_name_still_names_the_file_and_the_cause(
        tmp_path: Path, store: InMemoryObjectStore, error: Callable[[], Exception]) -> None:
    """The CRT reports a temporary removed under a download as a bare FileNotFoundError: the
    error line names the temporary and the cause, never one that ends at "failed:"."""
    put_set(store, "step_1", {"a.pt": b"a" * 50, "b.pt": b"b" * 60}, 1_000)
    store.fail("download", times=None, key=PREFIX + "step_1/b.pt", error=error)
    with pytest.raises(SpotwatchError) as raised:
        restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
    message = str(raised.value)
    assert message.startswith("restore of step_1 failed: [Errno ")
    assert str(temporary(tmp_path / "r/step_1/b.pt")) in message
    assert files_under(tmp_path / "r") == []
