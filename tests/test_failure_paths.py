"""Failure paths of the engine, retry queue, sealer and restore on the in-memory store.

No network and no sleeps: the engine is pumped until a condition holds (with a deadline), and
the clock that paces retries, settling and sealing moves only when a test advances it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotwatch.aws.store import PendingUpload, StoredObject, StoreError
from spotwatch.config import WatchDir
from spotwatch.keys import manifest_key
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync import engine as engine_module
from spotwatch.sync import scan_rule
from spotwatch.sync import uploader as uploader_module
from spotwatch.sync.engine import WITHDRAWN_HOLD_SECONDS, SyncEngine
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.orphans import abort_orphaned_uploads
from spotwatch.sync.planner import PendingFile
from spotwatch.sync.restore.set_fetch import restore_newest
from spotwatch.sync.retry import FAILING_AFTER, Backoff, RetryQueue
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_manifests
from spotwatch.sync.sets.sealer import MAX_ATTEMPTS, RETRY_CAP_SECONDS, RETRY_SECONDS
from spotwatch.sync.tracker import ChangeTracker, walk_files
from spotwatch.sync.uploader import Uploader

from .conftest import wait_for
from .memory_store import FakeClock, InMemoryObjectStore, crc32_checksum

PREFIX = "run/"
QUIET_SECONDS = 5.0
BACKOFF = Backoff(base=5.0, cap=120.0, jitter=0.2)


@contextmanager
def engine_on(root: Path, state: Path, store: InMemoryObjectStore, clock: FakeClock,
              complete_when: tuple[str, ...] = ()) -> Iterator[SyncEngine]:
    tracker = ChangeTracker(WatchDir(root, PREFIX, exclude=(), complete_when=complete_when),
                            1.0, QUIET_SECONDS, clock=clock)
    # No jitter drawn: the waits are exactly the backoff's ceilings.
    retries: RetryQueue[Path, PendingFile] = RetryQueue(BACKOFF, clock, random_unit=lambda: 0.0)
    engine = SyncEngine([tracker], Ledger(state / "ledger.sqlite"),
                        lambda done: Uploader(store, done, clock), wake=woken.set,
                        retries=retries, clock=clock, wall_clock_ns=clock.wall_ns)
    try:
        yield engine
    finally:
        engine.close()


woken = threading.Event()


def quiescent(engine: SyncEngine) -> bool:
    """Nothing pending, uploading, being written or waiting for its manifest."""
    return engine.idle() and not engine.unsettled()


def pump_until(engine: SyncEngine, condition: Callable[[], object], clock: FakeClock,
               step: float = 0.0, timeout: float = 10.0) -> None:
    """Pump the engine as the daemon loop does until the condition holds; the fake clock moves
    by step per round (0: only results from the store's threads are awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        engine.collect_settled()
        engine.pump(upload=True)
        if condition():
            return
        assert time.monotonic() < deadline, "condition not met"
        clock.advance(step)
        woken.wait(0.01)  # an upload result wakes the loop; manifests are polled
        woken.clear()


def write(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def manifest_in(store: InMemoryObjectStore, set_name: str) -> Manifest:
    return Manifest.from_json(store.data(manifest_key(PREFIX, set_name)), PREFIX)


def test_a_file_failing_for_good_backs_off_stays_pending_and_blocks_its_manifest(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    write(root, "step_1/good.pt", b"good")
    write(root, "step_1/bad.pt", b"bad")
    store.fail("upload_file", times=None, key="run/step_1/bad.pt")
    bad = root / "step_1/bad.pt"
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        for attempt in range(1, FAILING_AFTER + 2):
            pump_until(engine, lambda a=attempt: engine.totals.files == 1
                       and engine.retries.failures(root / "step_1/bad.pt") == a, clock)
            assert store.calls["upload_file"] == 1 + attempt  # good.pt once, bad.pt per attempt
            # The failed attempt's result comes before the uploader stops counting it.
            wait_for(lambda: not engine.uploader.is_uploading(bad))
            wait = BACKOFF.ceiling(attempt)
            clock.advance(wait - 0.1)
            engine.pump(upload=True)
            assert bad in engine.retries and not engine.uploader.is_uploading(bad), \
                "retried before its backoff"
            assert engine.pending_files() == 1  # waiting to retry still counts as pending
            clock.advance(0.1)
        pump_until(engine, lambda: "run/step_1" in engine.sealer.incomplete, clock, step=0.5)
        assert engine.sealer.incomplete["run/step_1"] == ["step_1/bad.pt"]
        assert store.data("run/step_1/good.pt") == b"good"
        assert "run/step_1/bad.pt" not in store.objects
        assert manifest_key(PREFIX, "step_1") not in store.objects
        assert engine.pending_files() == 1 and engine.retries.is_failing(root / "step_1/bad.pt")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(["a.pt", "b.bin", "sub/c.pt", "sub/d/e.pt"]),
                      min_size=1, max_size=4, unique=True),
       failing=st.data(), permanent=st.booleans())
def test_a_set_none_of_whose_files_got_through_is_unsealed_then_incomplete(
        names: list[str], failing: st.DataObject, permanent: bool) -> None:
    """Every file of the set fails (a bucket policy denying its prefix): no upload of it ever
    succeeds, yet the set is reported, as is one with a file that got through."""
    denied = failing.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    store = InMemoryObjectStore()
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "ckpt"
        for name in names:
            write(root, f"step_7/{name}", name.encode())
        for name in denied:
            store.fail("upload_file", times=None, key=f"{PREFIX}step_7/{name}",
                       permanent=permanent)
        with engine_on(root, Path(temp), store, clock) as engine:
            engine.reconcile(quiet_seconds=0)
            pump_until(engine, lambda: engine.retries.failures(root / "step_7" / denied[0]) == 1,
                       clock)
            if not permanent:  # may still get through: waiting for its manifest
                assert "run/step_7" in engine.sealer.unsealed()
            pump_until(engine, lambda: "run/step_7" in engine.sealer.incomplete, clock,
                       step=BACKOFF.cap / 8)
            assert engine.sealer.incomplete["run/step_7"] == sorted(
                f"step_7/{name}" for name in denied)
            assert manifest_key(PREFIX, "step_7") not in store.objects


def test_an_upload_the_ledger_could_not_record_is_a_failure_to_every_observer(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The state disk is full when an upload ends: the file stays pending and is uploaded
    again. The metrics and the flush's progress must hear a failure then one upload, as the
    engine counts it, not two uploads and no failure."""
    root = tmp_path / "ckpt"
    write(root, "step_1/a.pt", b"a" * 10)
    heard: list[Outcome] = []
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.add_observer(lambda result: heard.append(result.outcome))
        record = engine.ledger.record
        full_once = iter([LedgerError("database or disk is full")])

        def record_unless_full(*args: Any, **kwargs: Any) -> None:
            for error in full_once:
                raise error
            record(*args, **kwargs)

        monkeypatch.setattr(engine.ledger, "record", record_unless_full)
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: quiescent(engine), clock, step=BACKOFF.cap / 8)
        assert heard == [Outcome.FAILED, Outcome.DONE]
        assert (engine.totals.failures, engine.totals.files) == (1, 1)


def test_a_manifest_write_that_fails_is_retried_then_succeeds(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    write(root, "step_1/a.pt", b"a" * 10)
    write(root, "step_1/b.pt", b"b" * 20)
    store.fail("put_bytes", times=1)
    with engine_on(root, tmp_path, store, clock) as engine, capture_logs() as logs:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: store.calls["put_bytes"] == 1 and not engine._uploads_left(),
                   clock)
        pump_until(engine, lambda: any(e["event"] == "set_manifest_retry" for e in logs), clock)
        clock.advance(RETRY_SECONDS - 0.1)
        engine.pump(upload=True)
        assert store.calls["put_bytes"] == 1, "manifest retried before its pause"
        pump_until(engine, lambda: quiescent(engine), clock, step=0.1)
    assert store.calls["put_bytes"] == 2
    manifest = manifest_in(store, "step_1")
    assert {(f.path, f.size, f.checksum) for f in manifest.files} == {
        ("step_1/a.pt", 10, crc32_checksum(b"a" * 10)),
        ("step_1/b.pt", 20, crc32_checksum(b"b" * 20))}


class _Unanswered:
    """The sealer's view of the sealed manifests, with S3 not answering for them while
    `down` holds."""

    def __init__(self, sealed_sets: Any) -> None:
        self._sealed_sets = sealed_sets
        self.down = True
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sealed_sets, name)

    def current(self, prefix: str, set_name: str) -> Manifest | None:
        self.asked += 1
        if self.down:
            raise StoreError("injected: S3 does not answer")
        return cast("Manifest | None", self._sealed_sets.current(prefix, set_name))


def test_a_set_saved_again_in_place_is_not_sealed_while_its_last_manifest_is_unread(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """A torch.distributed.checkpoint save into a fixed directory, begun again: shard 0 is
    rewritten, the marker is the last save's. While S3 does not answer for the set's last
    manifest, nothing says the marker is stale, so the set is not sealed: it is tried again
    after a pause, and once the manifest is read it waits for its new marker."""
    root = tmp_path / "ckpt"
    write(root, "step/a.distcp", b"a1" * 10)
    write(root, "step/.metadata", b"m1")
    key = manifest_key(PREFIX, "step")
    with engine_on(root, tmp_path, store, clock, (".metadata",)) as engine, \
            capture_logs() as logs:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: quiescent(engine), clock, step=0.1)
        last_save = store.data(key)
        unanswered = _Unanswered(engine.sealer._sealed_sets)
        engine.sealer._sealed_sets = unanswered  # type: ignore[assignment]
        write(root, "step/a.distcp", b"a2" * 10)
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: unanswered.asked >= 2, clock, step=1.0)
        assert any(e["event"] == "set_manifest_retry" for e in logs)
        assert store.data(f"{PREFIX}step/a.distcp") == b"a2" * 10
        assert store.data(key) == last_save
        unanswered.down = False
        pump_until(engine, lambda: any(e["event"] == "set_awaiting_marker" for e in logs),
                   clock, step=1.0)
        assert store.data(key) == last_save
        write(root, "step/.metadata", b"m2")
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: store.data(key) != last_save, clock, step=1.0)
    assert {f.path: f.size for f in manifest_in(store, "step").files} == {
        "step/a.distcp": 20, "step/.metadata": 2}


def test_a_manifest_write_that_keeps_failing_is_reported_and_retried_with_backoff(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    write(root, "step_1/a.pt", b"a")
    store.fail("put_bytes", times=None)
    with engine_on(root, tmp_path, store, clock) as engine, capture_logs() as logs:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: store.calls["put_bytes"] == MAX_ATTEMPTS
                   and "run/step_1" in engine.sealer.incomplete, clock, step=RETRY_SECONDS / 4)
        failed = [e for e in logs if e["event"] == "set_manifest_failed"]
        assert len(failed) == 1 and failed[0]["attempts"] == MAX_ATTEMPTS
        assert failed[0]["set"] == "run/step_1"
        # Reported, and no flush waits for it; but never given up: it is tried again, later
        # and later, and the set is sealed once S3 takes the manifest.
        assert engine.sealer.unsealed() == set()
        assert engine.flush_settled(None)
        waits = [e["retry_in"] for e in logs if e["event"] in ("set_manifest_retry",
                                                             "set_manifest_failed")]
        assert waits == sorted(waits) and waits[-1] > waits[0]
        pump_until(engine, lambda: store.calls["put_bytes"] == MAX_ATTEMPTS + 2, clock,
                   step=RETRY_CAP_SECONDS / 8)
        assert manifest_key(PREFIX, "step_1") not in store.objects
        store.clear_faults()
        pump_until(engine, lambda: quiescent(engine), clock, step=RETRY_CAP_SECONDS / 8)
    assert manifest_in(store, "step_1").files[0].path == "step_1/a.pt"
    assert "run/step_1" not in engine.sealer.incomplete
    assert len([e for e in logs if e["event"] == "set_manifest_failed"]) == 1
    assert store.data("run/step_1/a.pt") == b"a"


def test_a_file_changed_mid_upload_is_uploaded_again(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    path = write(root, "step_1/model.pt", b"first version")
    gate = store.hold("upload_file", key="run/step_1/model.pt")
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, gate.entered.is_set, clock)
        path.write_bytes(b"the second, longer version")  # the store read the first one
        gate.release()
        # Superseded: the file is awaited until quiet (no watchdog here), then sent again.
        pump_until(engine, lambda: quiescent(engine), clock, step=QUIET_SECONDS / 4)
    assert store.calls["upload_file"] == 2
    assert store.data("run/step_1/model.pt") == path.read_bytes()
    [entry] = manifest_in(store, "step_1").files
    assert (entry.size, entry.checksum) == (path.stat().st_size,
                                            crc32_checksum(path.read_bytes()))


def test_orphaned_multipart_uploads_of_noted_keys_are_aborted(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ours = store.start_upload("run/step_1/big.pt")
    longer = store.start_upload("run/step_1/big.pt.bak")  # the prefix matches, the key not
    ledger.multipart_started(store.bucket, "run/step_1/big.pt")
    store.fail("open_uploads", times=1)
    try:
        assert abort_orphaned_uploads(store, ledger) == 0  # failed: stays noted
        assert ledger.unfinished_multipart(store.bucket) == ["run/step_1/big.pt"]
        assert abort_orphaned_uploads(store, ledger) == 1
        assert store.uploads == [longer] and ours not in store.uploads
        assert ledger.unfinished_multipart(store.bucket) == []
    finally:
        ledger.close()


# -- restore ----------------------------------------------------------------------------------


def put_set(store: InMemoryObjectStore, name: str, files: dict[str, bytes],
            mtime_ns: int) -> None:
    entries = []
    for relative, data in files.items():
        key = PREFIX + f"{name}/{relative}"
        store.put(key, data)
        entries.append(ManifestEntry(key, f"{name}/{relative}", len(data), mtime_ns,
                                     crc32_checksum(data)))
    store.put(manifest_key(PREFIX, name), Manifest.build(name, PREFIX, entries)
                 .to_json().encode())


def test_restore_passes_over_a_corrupt_object_and_a_malformed_manifest(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {"model.pt": b"one" * 100, "opt.pt": b"o1"}, 1_000)
    put_set(store, "step_2", {"model.pt": b"two" * 100, "opt.pt": b"o2"}, 2_000)
    # step_2's model: the listed size, other bytes (the manifest's checksum no longer fits).
    store.put("run/step_2/model.pt", b"TWO" * 100)
    store.put(manifest_key(PREFIX, "step_3"), json.dumps({"format": 1, "set": 3}).encode())
    destination = tmp_path / "restored"
    with capture_logs() as logs:
        report = restore_newest(store, list_manifests(store, PREFIX), destination, "CRC32",
                                None)
    assert report is not None
    assert (report.set_name, report.passed_over, report.downloaded) == ("step_1", ("step_2",), 2)
    assert (destination / "step_1/model.pt").read_bytes() == b"one" * 100
    assert os.stat(destination / "step_1/opt.pt").st_mtime_ns == 1_000
    assert sorted(p.name for p in destination.rglob("*") if p.is_file()) == ["model.pt",
                                                                              "opt.pt"]
    events = {(e["event"], e.get("set") or e.get("key")) for e in logs}
    assert ("manifest_skipped", manifest_key(PREFIX, "step_3")) in events
    assert ("set_corrupt", "step_2") in events


def test_restore_skips_a_set_whose_object_is_missing(tmp_path: Path,
                                                     store: InMemoryObjectStore) -> None:
    put_set(store, "step_1", {"a.pt": b"1"}, 1_000)
    put_set(store, "step_2", {"a.pt": b"2"}, 2_000)
    del store.objects["run/step_2/a.pt"]
    report = restore_newest(store, list_manifests(store, PREFIX), tmp_path / "r", "CRC32", None)
    assert report is not None and (report.set_name, report.passed_over) == ("step_1",
                                                                            ("step_2",))


# -- whatever the faults, once they stop everything ends up stored and sealed -----------------

FILES = {"step_1/a.pt": b"a" * 7, "step_1/sub/b.pt": b"b" * 3, "step_2/c.pt": b"c" * 11}
KEYS = sorted(PREFIX + relative for relative in FILES)

faults = st.lists(st.one_of(
    st.tuples(st.just("upload_file"), st.sampled_from([None, *KEYS]),
              st.integers(1, 6), st.booleans()),
    # Any number in a row: a manifest write is retried, with backoff, until it succeeds.
    st.tuples(st.just("put_bytes"), st.none(), st.integers(1, 2 * MAX_ATTEMPTS),
              st.booleans()),
), max_size=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(faults=faults)
def test_after_any_faults_every_file_is_stored_and_every_set_sealed(
        faults: list[tuple[str, str | None, int, bool]]) -> None:
    store = InMemoryObjectStore()
    clock = FakeClock()
    for operation, key, times, permanent in faults:
        store.fail(operation, times=times, key=key, permanent=permanent)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "ckpt"
        for relative, data in FILES.items():
            write(root, relative, data)
        with engine_on(root, Path(temp), store, clock) as engine:
            engine.reconcile(quiet_seconds=0)
            pump_until(engine, lambda: quiescent(engine), clock, step=BACKOFF.cap / 8, timeout=30)
    for relative, data in FILES.items():
        assert store.data(PREFIX + relative) == data
    for name in ("step_1", "step_2"):
        listed = {f.path: f.checksum for f in manifest_in(store, name).files}
        assert listed == {r: crc32_checksum(d) for r, d in FILES.items() if r.startswith(name)}


@pytest.mark.parametrize("permanent", [False, True])
def test_an_upload_failing_because_its_file_changed_is_superseded_not_failed(
        tmp_path: Path, permanent: bool) -> None:
    """The CRT ends a single PutObject whose file was cut short while sent with an error
    (AWS_ERROR_S3_INCORRECT_CONTENT_LENGTH): that is the change's doing, not a failure to
    count, retry later or give up on; the new version is uploaded."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"x" * 1000)
    store = InMemoryObjectStore()
    gate = store.hold("upload_file")
    store.fail("upload_file", permanent=permanent)
    results: list[UploadResult] = []
    uploader = Uploader(store, results.append)
    uploader.submit(UploadJob(path, "run1/model.pt", Snapshot.of(os.stat(path))))
    assert gate.entered.wait(10)
    path.write_bytes(b"final")
    gate.release()
    wait_for(lambda: results)
    uploader.shutdown()
    assert results[0].outcome is Outcome.CHANGED
    assert results[0].error is None


def test_a_rescan_does_not_cut_a_failing_files_backoff_short(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan that compares every file (after lost events) finds a file waiting to retry,
    unchanged: it keeps waiting, so a file that fails for good is not tried again at every
    scan."""
    root = tmp_path / "ckpt"
    bad = write(root, "step_1/bad.pt", b"bad")
    store.fail("upload_file", times=None, key="run/step_1/bad.pt")
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: engine.retries.failures(bad) == 1, clock)
        wait_for(lambda: not engine.uploader.is_uploading(bad))
        calls = store.calls["upload_file"]
        clock.advance(BACKOFF.ceiling(1) - 0.1)
        lost = iter([True])
        monkeypatch.setattr(engine_module, "events_were_lost", lambda: next(lost, False))
        engine.collect_settled()  # the scan after lost events: every file compared
        engine.pump(upload=True)
        assert store.calls["upload_file"] == calls and bad in engine.retries, \
            "the rescan retried it before its backoff"
        assert not engine.uploader.is_uploading(bad)


def test_after_lost_events_a_directory_renamed_in_with_old_files_is_uploaded(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint staged elsewhere before the last scan, then renamed into the watched
    directory (Hugging Face's tmp-checkpoint-N -> checkpoint-N): a directory's rename changes
    neither the mtime nor the ctime of the files in it. Its events lost to an inotify queue
    overflow, the rescan must look at every file, not only at those changed since the last
    scan. (The fake wall clock runs an hour ahead: the files date from before that scan.)"""
    root = tmp_path / "ckpt"
    root.mkdir()
    staged = write(tmp_path / "staging", "tmp-checkpoint-300/model.pt", b"weights")
    lost = iter([True])
    monkeypatch.setattr(engine_module, "events_were_lost", lambda: next(lost, False))
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        staged.parent.rename(root / "checkpoint-300")  # its events: lost
        pump_until(engine, lambda: PREFIX + "checkpoint-300/model.pt" in store.objects, clock,
                   step=1.0)


def test_a_rescan_after_the_clock_stepped_back_finds_the_changes_made_since(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """The wall clock ran an hour ahead at the last scan, then was stepped back (NTP, a
    hypervisor's time sync): files changed since have mtimes before that scan began. The
    periodic scan must still find a change no event reported (a write through a memory
    mapping), or the old bytes stay in S3 for good."""
    wall_offset_ns = [3600 * 10**9]

    def wall_ns() -> int:
        return time.time_ns() + wall_offset_ns[0]

    root = tmp_path / "ckpt"
    path = write(root, "step_1/model.pt", b"first")
    os.utime(path, ns=(time.time_ns() - 10**10,) * 2)
    tracker = ChangeTracker(WatchDir(root, PREFIX, exclude=()), 1.0, QUIET_SECONDS, clock=clock)
    engine = SyncEngine([tracker], Ledger(tmp_path / "ledger.sqlite"),
                        lambda done: Uploader(store, done, clock), wake=woken.set,
                        clock=clock, wall_clock_ns=wall_ns)
    try:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: manifest_key(PREFIX, "step_1") in store.objects, clock, step=1.0)
        wall_offset_ns[0] = 0  # stepped back to the true time
        clock.advance(300.0)
        path.write_bytes(b"second")  # no event: no observer watches
        os.utime(path, ns=(time.time_ns() - 10**10,) * 2)  # settled
        engine.rescan_when_due(interval=300.0)
        pump_until(engine, lambda: store.data(PREFIX + "step_1/model.pt") == b"second", clock,
                   step=1.0)
    finally:
        engine.close()


def test_a_periodic_rescan_of_many_files_hands_the_loop_back_between_slices(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of the watched directories is stat'ed by each periodic scan (a network round
    trip each on a shared file system): done at one go on the daemon's loop, a large tree
    keeps the trainer from being told of a notice, and systemd's watchdog from being fed, for
    as long. The scan goes a slice at a time (here: a file per call), and still finds the
    change no event reported."""
    root = tmp_path / "ckpt"
    paths = [write(root, f"step_{n // 10}/shard_{n % 10}.pt", b"x") for n in range(30)]
    looked_at = [0]

    def counted(*args: Any, **kwargs: Any) -> Iterator[tuple[Path, os.stat_result]]:
        for found in walk_files(*args, **kwargs):
            looked_at[0] += 1
            yield found

    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: quiescent(engine) and len(store.objects) == 33, clock,
                   step=1.0)
        monkeypatch.setattr(scan_rule, "walk_files", counted)  # the walk every scan goes by
        monkeypatch.setattr(engine_module, "RESCAN_SLICE_SECONDS", 0.0, raising=False)
        changed = paths[-1]
        clock.advance(10.0)
        changed.write_bytes(b"written through a mapping")  # no observer: no event
        # Changed after the last scan, and settled (older than QUIET_SECONDS).
        os.utime(changed, ns=(clock.wall_ns() - 6 * 10**9,) * 2)
        engine.rescan_when_due(interval=5.0)
        assert 0 < looked_at[0] < len(paths), "the scan kept the loop for every file"
        deadline = time.monotonic() + 30  # a bound for a loaded machine, not a latency
        while store.data(PREFIX + "step_2/shard_9.pt") != b"written through a mapping":
            assert time.monotonic() < deadline, "the change was never uploaded"
            engine.rescan_when_due(interval=5.0)
            engine.collect_settled()
            engine.pump(upload=True)
            woken.wait(0.01)
            woken.clear()


class _HeldStore(InMemoryObjectStore):
    """Uploads that hold until released; one taken back ends, cancelled, only then too: as a
    cancelled multipart upload that s3transfer dequeues late."""

    def __init__(self) -> None:
        super().__init__(max_concurrency=1)
        self.release = threading.Event()
        self.started: list[str] = []

    def upload_file(self, path: Path, key: str, size: int,
                    progress: Any = None) -> PendingUpload:
        self.started.append(key)
        done: Future[StoredObject] = Future()
        withdrawn = threading.Event()
        data = path.read_bytes()

        def finish() -> None:
            self.release.wait(30)
            if withdrawn.is_set():
                done.cancel()
                done.set_running_or_notify_cancel()
                return
            stored = self.put(key, data)
            done.set_result(StoredObject(stored.checksum, len(data), etag=stored.etag))

        def withdraw() -> bool:
            withdrawn.set()
            return True

        threading.Thread(target=finish, daemon=True).start()
        return PendingUpload(done, withdrawn.set, withdraw)


def test_a_flush_waits_for_uploads_it_took_back_only_so_long(
        tmp_path: Path, clock: FakeClock) -> None:
    """At a flush, uploads not yet begun are taken back so that the newest set goes first;
    should their cancellation come late, the newest set's files are handed over all the
    same once WITHDRAWN_HOLD_SECONDS passed, not after everything ahead of them went."""
    store = _HeldStore()
    root = tmp_path / "ckpt"
    for step in (1, 2):
        write(root, f"step_{step}/model.pt", b"old")
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        engine.pump(upload=True)
        # Twice the concurrency handed over (each once judged against its set in S3, on a
        # thread of the uploader's: sync.sets.sealed).
        wait_for(lambda: len(store.started) == 2)
        write(root, "step_9/model.pt", b"newest")
        engine.reconcile(quiet_seconds=0)
        engine.put_newest_first()
        engine.pump(upload=True)
        assert sorted(store.started) == ["run/step_1/model.pt", "run/step_2/model.pt"]
        clock.advance(WITHDRAWN_HOLD_SECONDS)
        engine.pump(upload=True)
        try:
            wait_for(lambda: "run/step_9/model.pt" in store.started[2:])
        finally:
            store.release.set()


def test_a_rescan_while_a_manifest_is_on_its_way_seals_nothing_again(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """A link that is as the manifest on its way lists it is no change: only a link that
    differs from that manifest seals its set again (a rescan meets every link)."""
    root = tmp_path / "ckpt"
    write(root, "step_1/model.pt", b"model")
    (root / "step_1" / "weights.pt").symlink_to("model.pt")
    manifest = "run/.spotwatch/manifests/step_1.json"
    gate = store.hold("put_bytes", key=manifest)
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, gate.entered.is_set, clock, step=0.1)
        clock.advance(3600)
        engine.rescan_when_due(interval=1.0)  # meets weights.pt as the manifest lists it
        pump_until(engine, lambda: engine._periodic is None, clock)
        gate.release()
        pump_until(engine, lambda: manifest in store.objects and quiescent(engine), clock,
                   step=0.1)
        assert store.calls["put_bytes"] == 1
        assert json.loads(store.data(manifest))["links"] == [
            {"path": "step_1/weights.pt", "target": "model.pt"}]


@settings(max_examples=20, deadline=None)
@given(ages=st.permutations(range(4)))
def test_sets_ready_together_are_sealed_newest_first(ages: list[int]) -> None:
    """Sets whose files all went up before the sealer looked are sealed in one pass: their
    manifests go in the planner's order, the set with the newest file first, whatever order
    the sets were found or uploaded in."""
    store = InMemoryObjectStore(max_concurrency=1)  # one write at a time: in the order sent
    clock = FakeClock()
    long_ago = time.time() - 600
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "ckpt"
        for step, age in enumerate(ages):
            path = write(root, f"step_{step}/model.pt", b"x" * (step + 1))
            os.utime(path, (long_ago - age, long_ago - age))
        with engine_on(root, Path(temp), store, clock) as engine:
            engine.reconcile(quiet_seconds=0)
            pump_until(engine, lambda: quiescent(engine), clock)
        written = sorted((int(store.objects[manifest_key(PREFIX, f"step_{step}")]
                              .etag.removeprefix("etag-")), step) for step in range(len(ages)))
        assert [step for _, step in written] == sorted(range(len(ages)), key=ages.__getitem__)


def test_a_check_after_upload_that_raises_fails_the_upload_instead_of_holding_it(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong in the check after an upload (here an error no check expects from
    looking at the file again), the file is failed and retried, never left counted as
    uploading, which would hold its set and every flush for good."""
    root = tmp_path / "ckpt"
    target = write(root, "step_1/model.pt", b"weights")
    real_stat = os.stat
    raised: list[str] = []

    def stat_failing_once(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path) == str(target) and store.calls["upload_file"] and not raised:
            raised.append(str(path))
            raise RuntimeError("unexpected")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(uploader_module.os, "stat", stat_failing_once)
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: engine.retries.failures(target) == 1, clock)
        pump_until(engine, lambda: quiescent(engine), clock, step=BACKOFF.cap / 8)
    assert raised and store.data(f"{PREFIX}step_1/model.pt") == b"weights"
    assert manifest_in(store, "step_1").files[0].path == "step_1/model.pt"
