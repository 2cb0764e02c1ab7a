"""Held copies (sync.sets.held) on the in-memory store and against moto: the conditional copy,
copies made against the manifest sealed last, deleted at the next seal and with their set by
retention, and restore reading a held copy where the object at its key was replaced."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import S3ObjectStore, StoreError
from spotwatch.config import TransferSettings
from spotwatch.keys import held_key, manifest_key
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.orphans import MultipartNotes, abort_orphaned_uploads
from spotwatch.sync.pruner import keys_to_reseal, plan_deletions
from spotwatch.sync.restore.set_fetch import restore_newest
from spotwatch.sync.sets.held import HeldCopies
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_manifests
from spotwatch.sync.sets.sealed import SealedSets

from .conftest import REGION
from .memory_store import InMemoryObjectStore, crc32_checksum

PREFIX = "run/"


@pytest.fixture
def store() -> Iterator[InMemoryObjectStore]:
    memory = InMemoryObjectStore(max_concurrency=4)
    yield memory
    memory.close()


def seal(store: InMemoryObjectStore, name: str, files: dict[str, bytes],
         mtime_ns: int = 1_000) -> Manifest:
    """Upload the files of set `name` and write its manifest, ETags recorded as a seal does."""
    entries = []
    for relative, data in files.items():
        path = name if relative == "" else f"{name}/{relative}"
        stored = store.put(PREFIX + path, data)
        entries.append(ManifestEntry(PREFIX + path, path, len(data), mtime_ns,
                                     crc32_checksum(data), etag=stored.etag))
    manifest = Manifest.build(name, PREFIX, entries)
    store.put(manifest_key(PREFIX, name), manifest.to_json().encode())
    return manifest


def written(manifest: Manifest, held: HeldCopies, store: InMemoryObjectStore) -> None:
    """The manifest written as the sealer writes it: through HeldCopies.sealing."""
    future: Future[None] = Future()
    done = held.sealing(PREFIX, manifest.set_name, manifest, future)
    store.put(manifest_key(PREFIX, manifest.set_name), manifest.to_json().encode())
    future.set_result(None)
    done.result(timeout=10)


def held_keys(store: InMemoryObjectStore) -> list[str]:
    return sorted(key for key in store.objects if key.startswith(PREFIX + ".spotwatch/held/"))


# -- the conditional copy -------------------------------------------------------------------


def protected(held: HeldCopies, prefix: str, set_name: str, key: str) -> None:
    """HeldCopies.protect, and the copy it started (if any) waited for."""
    copying = held.protect(prefix, set_name, key)
    if copying is not None:
        copying.result(timeout=30)

def test_fake_store_copies_only_the_version_with_the_etag(store: InMemoryObjectStore) -> None:
    v1 = store.put("run/model.pt", b"v1")
    assert store.copy_if_match("run/model.pt", "run/held", f'"{v1.etag}"', 2)
    assert store.data("run/held") == b"v1"
    store.put("run/model.pt", b"v2 longer")
    # S3's 412: the object is another version now; the held copy made before stays.
    assert not store.copy_if_match("run/model.pt", "run/held", v1.etag, 2)
    assert store.data("run/held") == b"v1"
    assert not store.copy_if_match("run/gone.pt", "run/held2", v1.etag, 2)
    assert "run/held2" not in store.objects


def real_store(bucket: str) -> S3ObjectStore:
    settings = TransferSettings(client="classic")
    return S3ObjectStore(make_s3_client(REGION, settings), bucket, settings)


def test_s3_store_copies_server_side_and_says_when_the_source_is_gone(s3: Any,
                                                                      bucket: str) -> None:
    """Against moto_server. moto ignores CopySourceIfMatch (it copies whatever version is
    there), so the 412 path is tested below with S3's answer, and on the fake store."""
    store = real_store(bucket)
    try:
        etag = s3.put_object(Bucket=bucket, Key="run/model.pt", Body=b"sealed")["ETag"]
        assert store.copy_if_match("run/model.pt", "run/.spotwatch/held/model.pt", etag, 6)
        held = s3.get_object(Bucket=bucket, Key="run/.spotwatch/held/model.pt",
                             ChecksumMode="ENABLED")
        assert held["Body"].read() == b"sealed"
        assert held.get("ChecksumCRC32")  # written with the store's write settings
        assert not store.copy_if_match("run/none.pt", "run/.spotwatch/held/none.pt", etag, 6)
    finally:
        store.close()


def test_s3_store_copies_no_other_version_where_the_store_ignores_the_condition(
        s3: Any, bucket: str) -> None:
    """moto, like some S3-compatible servers, ignores CopySourceIfMatch: a second crash in the
    same window (the object replaced again, its seal never written) would copy the unsealed
    version over the held copy of the sealed one. The store asks the object's ETag first."""
    store = real_store(bucket)
    held = "run/.spotwatch/held/model.pt"
    try:
        sealed = s3.put_object(Bucket=bucket, Key="run/model.pt", Body=b"sealed")["ETag"]
        assert store.copy_if_match("run/model.pt", held, sealed, 6)
        s3.put_object(Bucket=bucket, Key="run/model.pt", Body=b"newer!")  # its seal never came
        assert not store.copy_if_match("run/model.pt", held, sealed, 6)
        assert s3.get_object(Bucket=bucket, Key=held)["Body"].read() == b"sealed"
    finally:
        store.close()


@pytest.mark.parametrize(("code", "status", "copied"), [
    ("PreconditionFailed", 412, False), ("InternalError", 500, None), ("AccessDenied", 403, None)])
def test_s3_store_reads_a_412_as_another_version_and_raises_any_other_failure(
        s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, code: str, status: int,
        copied: bool | None) -> None:
    store = real_store(bucket)
    etag = s3.put_object(Bucket=bucket, Key="run/a", Body=b"0123456789")["ETag"]
    seen: list[dict[str, Any]] = []

    def refuse(**kwargs: Any) -> None:
        seen.append(kwargs)
        raise ClientError({"Error": {"Code": code, "Message": code},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "CopyObject")

    monkeypatch.setattr(store.client, "copy_object", refuse)
    try:
        if copied is None:
            with pytest.raises(StoreError):
                store.copy_if_match("run/a", "run/b", etag, 10)
        else:
            assert store.copy_if_match("run/a", "run/b", etag, 10) is copied
    finally:
        store.close()
    assert seen[0]["CopySourceIfMatch"] == etag
    assert seen[0]["ChecksumAlgorithm"] == "CRC32"


# -- made against the manifest sealed last, deleted at the next seal ------------------------

def test_a_rewrite_after_each_seal_holds_the_version_sealed_last(
        store: InMemoryObjectStore) -> None:
    sealed_sets = SealedSets(store, None, 0)
    held = HeldCopies(store, sealed_sets, node=None)
    m1 = seal(store, "model.pt", {"": b"v1"})
    protected(held, PREFIX, "model.pt", "run/model.pt")  # read from S3 (sealed before the start)
    assert store.data(held_key(PREFIX, "model.pt")) == b"v1"
    store.put("run/model.pt", b"v2!")  # the new version's upload
    # restorable now: the manifest lists v1, the held copy holds it
    assert held_keys(store) == ["run/.spotwatch/held/model.pt"]
    entry = m1.files[0]
    v2 = store.objects["run/model.pt"]
    m2 = Manifest.build("model.pt", PREFIX, [ManifestEntry(
        entry.key, entry.path, 3, 2_000, crc32_checksum(b"v2!"), etag=v2.etag)])
    written(m2, held, store)
    assert held_keys(store) == []  # the seal deleted it
    # The next rewrite is held against the manifest just written (not the one read at first,
    # whose ETag would get a 412 and leave v2 unprotected).
    protected(held, PREFIX, "model.pt", "run/model.pt")
    assert store.data(held_key(PREFIX, "model.pt")) == b"v2!"


def test_a_rewrite_waits_for_its_sets_seal_under_way(store: InMemoryObjectStore) -> None:
    sealed_sets = SealedSets(store, None, 0)
    held = HeldCopies(store, sealed_sets, node=None)
    m1 = seal(store, "model.pt", {"": b"v1"})
    v2 = store.put("run/model.pt", b"v2!")
    m2 = Manifest.build("model.pt", PREFIX, [ManifestEntry(
        m1.files[0].key, "model.pt", 3, 2_000, crc32_checksum(b"v2!"), etag=v2.etag)])
    future: Future[None] = Future()
    held.sealing(PREFIX, "model.pt", m2, future)
    protecting = threading.Thread(target=protected, args=(held, PREFIX, "model.pt", "run/model.pt"))
    protecting.start()
    protecting.join(0.3)
    assert protecting.is_alive() and held_keys(store) == []  # waits for the seal
    store.put(manifest_key(PREFIX, "model.pt"), m2.to_json().encode())
    future.set_result(None)
    protecting.join(10)
    assert store.data(held_key(PREFIX, "model.pt")) == b"v2!"  # against the new manifest


def test_a_failed_copy_fails_the_upload_and_a_failed_seal_keeps_the_held_copy(
        store: InMemoryObjectStore) -> None:
    held = HeldCopies(store, SealedSets(store, None, 0), node=None)
    manifest = seal(store, "step_1", {"a.pt": b"a1", "b.pt": b"b1"})
    store.fail("copy_if_match", error=lambda: StoreError("S3 down"))
    with pytest.raises(StoreError):
        protected(held, PREFIX, "step_1", "run/step_1/a.pt")
    protected(held, PREFIX, "step_1", "run/step_1/a.pt")
    store.put("run/step_1/a.pt", b"a2")
    future: Future[None] = Future()
    done = held.sealing(PREFIX, "step_1", manifest, future)
    future.set_exception(StoreError("manifest PUT failed"))
    with pytest.raises(StoreError):
        done.result(timeout=10)
    assert held_keys(store) == ["run/.spotwatch/held/step_1/a.pt"]
    protected(held, PREFIX, "step_1", "run/step_1/a.pt")  # 412: the copy of a1 stays
    assert store.data("run/.spotwatch/held/step_1/a.pt") == b"a1"


def test_a_manifest_write_that_failed_yet_landed_is_read_back_for_the_next_rewrite(
        store: InMemoryObjectStore) -> None:
    """A reply lost: the daemon sees a failure, S3 holds the new manifest. The next rewrite
    must hold the version that manifest lists, not get a 412 against the one before."""
    held = HeldCopies(store, SealedSets(store, None, 0), node=None)
    m1 = seal(store, "model.pt", {"": b"v1"})
    protected(held, PREFIX, "model.pt", "run/model.pt")
    v2 = store.put("run/model.pt", b"v2!")
    m2 = Manifest.build("model.pt", PREFIX, [ManifestEntry(
        m1.files[0].key, "model.pt", 3, 2_000, crc32_checksum(b"v2!"), etag=v2.etag)])
    future: Future[None] = Future()
    done = held.sealing(PREFIX, "model.pt", m2, future)
    store.put(manifest_key(PREFIX, "model.pt"), m2.to_json().encode())
    future.set_exception(StoreError("connection reset after the request"))
    with pytest.raises(StoreError):
        done.result(timeout=10)
    protected(held, PREFIX, "model.pt", "run/model.pt")
    assert store.data(held_key(PREFIX, "model.pt")) == b"v2!"


def test_held_copies_a_crash_left_are_deleted_at_the_sets_next_seal(
        store: InMemoryObjectStore) -> None:
    manifest = seal(store, "step_1", {"a.pt": b"a1"})
    store.put("run/.spotwatch/held/step_1/a.pt", b"a0")
    store.put("run/.spotwatch/held/step_10/a.pt", b"other set")
    held = HeldCopies(store, SealedSets(store, None, 0), node=None)
    written(manifest, held, store)
    assert held_keys(store) == ["run/.spotwatch/held/step_10/a.pt"]


def test_retention_deletes_a_dropped_sets_held_copies_after_its_manifest() -> None:
    def manifest(name: str, mtime: int) -> Manifest:
        return Manifest.build(name, PREFIX, [ManifestEntry(
            f"{PREFIX}{name}/a.pt", f"{name}/a.pt", 1, mtime, "AAAAAA==")])

    held = ["run/.spotwatch/held/step_1/a.pt", "run/.spotwatch/held/step_2/a.pt",
            "run/.spotwatch/held/step_10/a.pt"]
    plan = plan_deletions(PREFIX, lambda _: True, [manifest("step_2", 2), manifest("step_1", 1)],
                          [], 1, lambda _: True, held)
    assert [(d.key, d.seal, d.held) for d in plan] == [
        ("run/.spotwatch/manifests/step_1.json", True, False),
        ("run/step_1/a.pt", False, False),
        ("run/.spotwatch/held/step_1/a.pt", False, True)]
    gone = plan_deletions(PREFIX, lambda _: True, [manifest("step_2", 2)],
                          ["run/step_2/a.pt"], 0, lambda _: True, held)
    assert [d.key for d in gone if d.held] == ["run/.spotwatch/held/step_2/a.pt"]
    assert keys_to_reseal(gone) == ["run/step_2", "run/step_2/a.pt"]  # held copies: none


def test_on_a_job_each_node_deletes_only_its_own_held_copies_unless_retention() -> None:
    """A node mirroring its own deletion in a set leaves the held copies of other nodes'
    files (each may be between its rewrite and sealing its part again); retention's, which
    rank 0 carries out for the whole job, go whoever made them."""
    from spotwatch.sync.pruner import Deletion, job_deletions
    from spotwatch.sync.sets.parts import JobNode, JobSet

    def part(rank: int) -> Manifest:
        return Manifest.build("step_2", PREFIX, [ManifestEntry(
            f"{PREFIX}step_2/r{rank}.pt", f"step_2/r{rank}.pt", 1, 2, "AAAAAA==")])

    job_set = JobSet("step_2", 2, {0: part(0), 1: part(1)})
    planned = [Deletion(held_key(PREFIX, f"step_2/r{rank}.pt"), reason, held=True)
               for rank in (0, 1) for reason in ("deleted locally", "retention")]

    def kept(rank: int) -> list[tuple[str, str]]:
        return [(d.key.rsplit("/", 1)[-1], d.reason) for d in job_deletions(
            planned, PREFIX, [job_set], JobNode("job", 2, rank))]

    assert kept(1) == [("r1.pt", "deleted locally"), ("r1.pt", "retention")]
    assert kept(0) == [("r0.pt", "deleted locally"), ("r0.pt", "retention"),
                       ("r1.pt", "retention")]


# -- restore: a held copy stands in for a replaced object -----------------------------------

STATES = ("intact", "rewritten", "same_size", "missing", "rewritten_unheld", "missing_unheld",
          "same_size_unheld")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(states=st.lists(st.sampled_from(STATES), min_size=1, max_size=5),
       crc_match=st.booleans())
def test_restore_reads_held_copies_where_objects_were_replaced(
        tmp_path_factory: pytest.TempPathFactory, states: list[str], crc_match: bool) -> None:
    """Each file of a sealed set is intact, or was replaced (other size, or the same size and
    other bytes) or deleted, with or without a held copy of its sealed version: the set comes
    back, as sealed, exactly when every replaced file has its held copy; a held copy's bytes
    are verified (crc_match False: one held copy holds other bytes of the listed size, and
    the set is refused)."""
    store = InMemoryObjectStore()
    root = tmp_path_factory.mktemp("restore")
    try:
        files = {f"f{i}.pt": bytes([65 + i]) * (10 + i) for i in range(len(states))}
        manifest = seal(store, "step_1", files)
        corrupt_held = False
        for (name, data), state in zip(files.items(), states, strict=True):
            key = f"{PREFIX}step_1/{name}"
            if not state.endswith("_unheld") and state != "intact":
                held_bytes = data
                if not crc_match and not corrupt_held:
                    held_bytes, corrupt_held = b"X" * len(data), True
                store.put(held_key(PREFIX, f"step_1/{name}"), held_bytes)
            if state.startswith("rewritten"):
                store.put(key, data + b"new")
            elif state.startswith("same_size"):
                store.put(key, data.lower())
            elif state.startswith("missing"):
                store.objects.pop(key)
        ledger = Ledger(root / "ledger.db")
        report = restore_newest(store, list_manifests(store, PREFIX), root / "to", "CRC32",
                                ledger)
        restorable = not corrupt_held and not any(
            state.endswith("_unheld") for state in states)
        assert (report is not None) == restorable
        if report is None:
            assert not (root / "to" / "step_1").exists()
            return
        for name, data in files.items():
            assert (root / "to/step_1" / name).read_bytes() == data
        # Files read from a held copy are not recorded as the object at their key (another
        # version): a daemon watching uploads them again.
        recorded = {entry.key for entry in manifest.files
                    if ledger.recorded_size(store.bucket, entry.key) is not None}
        assert recorded == {f"{PREFIX}step_1/{name}" for name, state in
                            zip(files, states, strict=True) if state == "intact"}
        ledger.close()
    finally:
        store.close()


def test_restore_of_an_intact_set_lists_no_held_copies(store: InMemoryObjectStore,
                                                       tmp_path: Path) -> None:
    seal(store, "step_1", {"a.pt": b"a" * 10})
    store.put("run/.spotwatch/held/step_1/a.pt", b"b" * 10)  # a leftover: never read
    manifests = list_manifests(store, PREFIX)
    store.calls.clear()
    report = restore_newest(store, manifests, tmp_path, "CRC32", None)
    assert report is not None and (tmp_path / "step_1/a.pt").read_bytes() == b"a" * 10
    assert store.calls["list_objects"] == 1


def test_a_held_copy_deleted_under_the_restore_passes_the_set_over(
        store: InMemoryObjectStore, tmp_path: Path) -> None:
    """A daemon beside the restore seals the set again and deletes the held copy it was
    reading: the set is incomplete as read, and the next older one is restored, not the
    whole restore failed."""
    from spotwatch.aws.store import ObjectMissing

    seal(store, "step_1", {"a.pt": b"one"}, mtime_ns=1_000)
    seal(store, "step_2", {"a.pt": b"two"}, mtime_ns=2_000)
    manifests = list_manifests(store, PREFIX)
    store.put("run/.spotwatch/held/step_2/a.pt", b"two")
    store.put("run/step_2/a.pt", b"2v2")  # the rewrite, its seal not written yet
    store.fail("download", key="run/.spotwatch/held/step_2/a.pt",
               error=lambda: ObjectMissing("gone"))
    passed_over: list[str] = []
    report = restore_newest(store, manifests, tmp_path, "CRC32", None, passed_over)
    assert report is not None and report.set_name == "step_1"
    assert passed_over == ["step_2"]
    assert (tmp_path / "step_1/a.pt").read_bytes() == b"one"


def test_s3_store_copies_an_object_too_large_for_one_copy_in_parts(
        s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 5 GiB S3 takes no CopyObject: s3transfer's managed copy, here made to run for a
    small object (UploadPartCopy), with the condition and the write settings."""
    monkeypatch.setattr("spotwatch.aws.store.COPY_OBJECT_MAX", 0)
    settings = TransferSettings(client="classic", multipart_threshold=5 * 1024 * 1024,
                                multipart_chunksize=5 * 1024 * 1024)
    store = S3ObjectStore(make_s3_client(REGION, settings), bucket, settings)
    data = os.urandom(11 * 1024 * 1024)
    try:
        etag = s3.put_object(Bucket=bucket, Key="run/big.pt", Body=data)["ETag"]
        assert store.copy_if_match("run/big.pt", "run/.spotwatch/held/big.pt", etag, len(data))
        held = s3.get_object(Bucket=bucket, Key="run/.spotwatch/held/big.pt")
        assert held["Body"].read() == data
        assert held["ETag"].strip('"').endswith("-3")  # copied in parts
        assert not store.copy_if_match("run/none.pt", "run/.spotwatch/held/none.pt", etag, 1)
    finally:
        store.close()


def test_no_copy_is_started_while_a_flush_deadline_runs(store: InMemoryObjectStore) -> None:
    """Under a flush's deadline the new version goes first: a copy of a large file could cost
    it the deadline, and its upload replaces the object only as it completes, the manifest
    written right after."""
    held = HeldCopies(store, SealedSets(store, None, 0), node=None)
    seal(store, "model.pt", {"": b"v1"})
    held.hurry(100.0)
    assert held.protect(PREFIX, "model.pt", "run/model.pt") is None
    assert held_keys(store) == []
    held.hurry(None)  # the deadline is over
    protected(held, PREFIX, "model.pt", "run/model.pt")
    assert store.data(held_key(PREFIX, "model.pt")) == b"v1"


def test_copies_queued_when_a_deadline_begins_are_not_made(store: InMemoryObjectStore) -> None:
    """A deadline beginning while copies wait on the pool: those not begun are not made, and
    their uploads go on at once (the copy under way ends as it would)."""
    held = HeldCopies(store, SealedSets(store, None, 0), node=None)
    names = [f"m{index}.pt" for index in range(6)]
    for name in names:
        seal(store, name, {"": name.encode()})
    gates = [store.hold("copy_if_match", PREFIX + name) for name in names[:4]]
    copies = [held.protect(PREFIX, name, PREFIX + name) for name in names]
    for gate in gates:  # the pool's four threads, each in a copy
        assert gate.entered.wait(10)
    held.hurry(100.0)
    for gate in gates:
        gate.release()
    for copy in copies:
        assert copy is not None
        copy.result(timeout=10)
    assert held_keys(store) == [held_key(PREFIX, name) for name in names[:4]]


def test_a_file_restored_from_a_held_copy_is_sent_again_not_adopted(
        store: InMemoryObjectStore) -> None:
    """The file on disk is the version the manifest lists (restored from its held copy) while
    S3 holds a later one at its key: adopting it would let a later seal list it over other
    bytes. It goes up instead; the same file is adopted while the object is its version."""
    from spotwatch.model import FileVersion
    from spotwatch.sync.sets.sealed import Verdict

    seal(store, "step_3", {"eval.json": b"v1"}, mtime_ns=1_000)
    version = FileVersion(2, 1_000)
    assert SealedSets(store, None, 10_000).judge(
        PREFIX, "step_3", "run/step_3/eval.json", version).verdict is Verdict.ADOPT
    store.put("run/step_3/eval.json", b"v2")  # a rewrite uploaded, its seal never written
    assert SealedSets(store, None, 10_000).judge(
        PREFIX, "step_3", "run/step_3/eval.json", version).verdict is Verdict.UPLOAD


def test_on_a_job_a_file_several_nodes_wrote_is_adopted_whichever_upload_landed_last(
        store: InMemoryObjectStore) -> None:
    """Ranks 0 and 1 both wrote step_1/config.json and each part lists its own upload; the
    object is rank 1's (another ETag: SSE-KMS, other parts). Rank 0 finding its file again at
    a start adopts it: the object is a version the set lists, not a later one."""
    from spotwatch.keys import part_key
    from spotwatch.model import FileVersion
    from spotwatch.sync.sets.parts import JobNode, Part
    from spotwatch.sync.sets.sealed import Verdict

    key = f"{PREFIX}step_1/config.json"
    etags = {0: store.put(key, b"{}").etag, 1: "rank-1-upload"}
    store.objects[key] = replace(store.objects[key], etag=etags[1])  # rank 1's landed last
    for rank in (0, 1):
        manifest = Manifest.build("step_1", PREFIX, [ManifestEntry(
            key, "step_1/config.json", 2, 1_000, crc32_checksum(b"{}"), etag=etags[rank])])
        store.put(part_key(PREFIX, "job", "step_1", rank),
                  Part(JobNode("job", 2, rank), manifest).to_json().encode())
    sets = SealedSets(store, JobNode("job", 2, 0), 10_000)
    assert sets.judge(PREFIX, "step_1", key, FileVersion(2, 1_000)).verdict is Verdict.ADOPT


def test_on_a_job_a_held_copy_stays_while_any_part_lists_another_version_than_the_object(
        store: InMemoryObjectStore) -> None:
    """Ranks 0 and 1 sealed step_2 with a config.json both write alike. Rank 0 rewrote it (its
    held copy keeps the sealed version; its part is not sealed again: killed). Rank 1 seals
    its part again (a new file of its own), still listing the sealed version: the held copy
    stays, as both parts need it (old: rank 1 deleted it, and step_2 was unrestorable). Once
    every part lists the object at the key, the next seal deletes it."""
    from spotwatch.keys import part_key
    from spotwatch.sync.sets.parts import JobNode, Part

    key, held_config = f"{PREFIX}step_2/config.json", held_key(PREFIX, "step_2/config.json")
    sealed = store.put(key, b'{"v": 0}')

    def part(rank: int, etag: str, data: bytes = b'{"v": 0}') -> Manifest:
        entries = [ManifestEntry(key, "step_2/config.json", len(data), 1_000,
                                 crc32_checksum(data), etag=etag)]
        manifest = Manifest.build("step_2", PREFIX, entries)
        store.put(part_key(PREFIX, "job", "step_2", rank),
                  Part(JobNode("job", 2, rank), manifest).to_json().encode())
        return manifest

    for rank in (0, 1):
        part(rank, sealed.etag)
    store.put(held_config, b'{"v": 0}')  # rank 0's copy of the sealed version
    newer = store.put(key, b'{"v": 1}')  # rank 0's rewrite; its part was never sealed again

    held = HeldCopies(store, SealedSets(store, JobNode("job", 2, 1), 0),
                      node=JobNode("job", 2, 1))
    written(part(1, sealed.etag), held, store)
    assert held_keys(store) == [held_config]

    part(0, newer.etag, b'{"v": 1}')  # rank 0 back, sealing the new version
    written(part(1, newer.etag, b'{"v": 1}'), held, store)  # and rank 1 too
    assert held_keys(store) == []


# -- a held copy made in parts, cut short -----------------------------------------------------


def test_a_copy_in_parts_is_noted_while_it_runs_and_kept_noted_when_it_fails(
        store: InMemoryObjectStore, tmp_path: Path) -> None:
    """A held copy too large for one CopyObject is a multipart upload: its key is noted in the
    ledger while it runs, forgotten once it has ended, and kept when it failed (its parts may
    be left), for the next start's cleanup. A copy in one request is never noted."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    held = HeldCopies(store, SealedSets(store, None, 0), node=None,
                      multipart=MultipartNotes(ledger, store.bucket))
    seal(store, "small.pt", {"": b"s" * 10})
    seal(store, "big.pt", {"": b"b" * 100})
    seal(store, "broken.pt", {"": b"x" * 100})
    store.copy_part_threshold = 50
    try:
        protected(held, PREFIX, "small.pt", "run/small.pt")
        assert ledger.unfinished_multipart(store.bucket) == []

        gate = store.hold("copy_if_match", "run/big.pt")
        copying = held.protect(PREFIX, "big.pt", "run/big.pt")
        assert copying is not None and gate.entered.wait(10)
        assert ledger.unfinished_multipart(store.bucket) == [held_key(PREFIX, "big.pt")]
        gate.release()
        copying.result(timeout=10)
        assert ledger.unfinished_multipart(store.bucket) == []

        store.fail("copy_if_match", key="run/broken.pt")
        failing = held.protect(PREFIX, "broken.pt", "run/broken.pt")
        assert failing is not None
        with pytest.raises(StoreError):
            failing.result(timeout=10)
        assert ledger.unfinished_multipart(store.bucket) == [held_key(PREFIX, "broken.pt")]
    finally:
        held.close()
        ledger.close()


def test_a_copy_in_parts_cut_short_is_aborted_at_the_next_start(
        s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against moto: a multipart copy whose completion and abort both fail (as a crash leaves
    it) keeps its upload open and its note; the next start's cleanup aborts it."""
    monkeypatch.setattr("spotwatch.aws.store.COPY_OBJECT_MAX", 0)
    settings = TransferSettings(client="classic", multipart_threshold=5 * 1024 * 1024,
                                multipart_chunksize=5 * 1024 * 1024)
    client = make_s3_client(REGION, settings)

    def refuse(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "InternalError", "Message": "cut short"},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}, "refused")

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    store = S3ObjectStore(client, bucket, settings)
    data = os.urandom(11 * 1024 * 1024)
    held_big = held_key(PREFIX, "big.pt")
    try:
        etag = s3.put_object(Bucket=bucket, Key="run/big.pt", Body=data)["ETag"]
        manifest = Manifest.build("big.pt", PREFIX, [ManifestEntry(
            "run/big.pt", "big.pt", len(data), 1_000, "", etag=etag)])
        s3.put_object(Bucket=bucket, Key=manifest_key(PREFIX, "big.pt"),
                      Body=manifest.to_json().encode())
        held = HeldCopies(store, SealedSets(store, None, 0), node=None,
                          multipart=MultipartNotes(ledger, bucket))
        for operation in ("CompleteMultipartUpload", "AbortMultipartUpload"):
            client.meta.events.register(f"before-call.s3.{operation}", refuse)
        copying = held.protect(PREFIX, "big.pt", "run/big.pt")
        assert copying is not None
        with pytest.raises(StoreError):
            copying.result(timeout=60)
        held.close()
        assert [upload["Key"] for upload in s3.list_multipart_uploads(
            Bucket=bucket).get("Uploads", [])] == [held_big]
        assert ledger.unfinished_multipart(bucket) == [held_big]
    finally:
        store.close()

    restarted = S3ObjectStore(make_s3_client(REGION, settings), bucket, settings)
    try:
        assert abort_orphaned_uploads(restarted, ledger) == 1
    finally:
        restarted.close()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert ledger.unfinished_multipart(bucket) == []
    ledger.close()
