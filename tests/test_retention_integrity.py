"""Retention never counts a set whose objects were replaced in S3 after it was sealed: end to end
with the CLI against the moto server, on both transfer clients, single and multipart objects."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.store import DELETE_BATCH
from spotwatch.config import WatchDir
from spotwatch.keys import part_key
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.pruner import Deletion, Pruner
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, Part
from spotwatch.sync.sets.remote import is_complete, is_intact

from .conftest import Workspace, keys_in, object_bytes, wait_for
from .memory_store import InMemoryObjectStore, crc32_checksum
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_prune import MANIFESTS, prune_lines

MiB = 1 << 20
SMALL_PARTS = {"multipart_threshold": "5MB", "multipart_chunksize": "5MB"}


def save_sets(workspace: Workspace) -> None:
    """step_1 (older) and step_2 (newer), each with a small file and a multipart one."""
    for age, name in ((200, "step_1"), (100, "step_2")):
        for file, size in (("small.pt", 3_000), ("big.pt", 6 * MiB)):
            path = workspace.checkpoints / name / file
            save_checkpoint(path, size)
            moment = 1_700_000_000 - age
            os.utime(path, (moment, moment))


@pytest.mark.usefixtures("transfer_client")
@pytest.mark.parametrize("sse", ["none", "aws:kms"])
@pytest.mark.parametrize("replaced", ["small.pt", "big.pt"])
def test_an_object_replaced_with_as_many_bytes_keeps_the_older_set(
        workspace: Workspace, s3: Any, sse: str, replaced: str) -> None:
    workspace.write_config(transfer={**SMALL_PARTS, "sse": sse})
    save_sets(workspace)
    flush_summary(workspace.cli("flush", "-c", "config.yaml", timeout=120))
    assert recorded_etags(s3, workspace.bucket, "step_2") == listed_etags(s3, workspace.bucket,
                                                                          "step_2")
    key = f"run1/step_2/{replaced}"
    size = s3.head_object(Bucket=workspace.bucket, Key=key)["ContentLength"]
    s3.put_object(Bucket=workspace.bucket, Key=key, Body=os.urandom(size))  # same size

    planned = prune_lines(workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1",
                                        "--dry-run"))
    assert planned == ["would delete 0 objects"]
    assert prune_lines(workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1")) == [
        "deleted 0 objects"]
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout and "passed over: step_2" in result.stdout
    assert '"set_corrupt"' in result.stderr  # restore still reads the bytes to tell


def test_the_daemon_keeps_the_older_set_until_a_newer_one_is_intact(workspace: Workspace,
                                                                     s3: Any) -> None:
    save_sets(workspace)
    flush_summary(workspace.cli("flush", "-c", "config.yaml", timeout=120))
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_2/small.pt", Body=os.urandom(3_000))
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    assert daemon.wait_for_event("set_not_counted")["key"] == "run1/step_2/small.pt"
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)
    # A newer set sealed intact counts: then the older ones go.
    save_checkpoint(workspace.checkpoints / "step_3" / "small.pt", 3_000)
    daemon.wait_for_event("set_complete")
    wait_for(lambda: not {f"{MANIFESTS}step_1.json", f"{MANIFESTS}step_2.json"}
             & keys_in(s3, workspace.bucket), timeout=30)
    assert daemon.stop() == 0


def recorded_etags(s3: Any, bucket: str, set_name: str) -> dict[str, str]:
    manifest = json.loads(object_bytes(s3, bucket, f"{MANIFESTS}{set_name}.json"))
    return {entry["key"]: entry["etag"] for entry in manifest["files"]}


def listed_etags(s3: Any, bucket: str, set_name: str) -> dict[str, str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"run1/{set_name}/")["Contents"]
    return {item["Key"]: item["ETag"] for item in listed}


# -- the check itself, for generated sets, uploads and changes made in S3 since ------------

PREFIX = "run1/"
FILES = ("s/a.pt", "s/b.pt", "s/sub/c.pt", "s/d.pt")
# What happened to an object since its set was sealed.
CHANGES = ("none", "rewritten alike", "same size", "other size", "deleted")


@st.composite
def sealed_sets(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, str], dict[str, bool]]:
    """(file -> how many nodes uploaded it, file -> change since, file -> ETag recorded)."""
    files = draw(st.lists(st.sampled_from(FILES), min_size=1, unique=True))
    return ({f: draw(st.integers(1, 3)) for f in files},
            {f: draw(st.sampled_from(CHANGES)) for f in files},
            {f: draw(st.booleans()) for f in files})


@settings(deadline=None)
@given(sealed_sets())
def test_a_set_is_intact_only_while_every_recorded_upload_is_still_the_object(
        sealed: tuple[dict[str, int], dict[str, str], dict[str, bool]]) -> None:
    uploaders, changes, recorded = sealed
    store = InMemoryObjectStore()
    entries: list[ManifestEntry] = []
    for path, nodes in uploaders.items():
        data = path.encode() * 10
        for _ in range(nodes):  # each node uploads the file alike; the last upload stays
            etag = store.put(PREFIX + path, data).etag
            entries.append(ManifestEntry(PREFIX + path, path, len(data), 0, crc32_checksum(data),
                                         etag=etag if recorded[path] else None))
        change = changes[path]
        if change == "deleted":
            store.delete(PREFIX + path)
        elif change != "none":
            body = {"rewritten alike": data, "same size": data.upper(),
                    "other size": data + b"!"}[change]
            store.put(PREFIX + path, body)
    whole = Manifest.build("s", PREFIX, list({e.key: e for e in entries}.values()))

    there = all(changes[f] not in ("other size", "deleted") for f in uploaders)
    untouched = all(changes[f] == "none" or not recorded[f] for f in uploaders)
    assert is_complete(store, whole) is there  # restore's test: then it reads the bytes
    assert is_intact(store, whole, entries) is (there and untouched)
    # Only the last of several uploads of a key is in S3: one node's entry alone does not do.
    first_only = {e.key: e for e in reversed(entries)}.values()
    assert is_intact(store, Manifest.build("s", PREFIX, list(first_only))) is (
        there and untouched and all(uploaders[f] == 1 or not recorded[f] for f in uploaders))


@pytest.mark.parametrize("listed", ['"0f343b0931126a20f133d67c2b018a3b"',
                                    "0f343b0931126a20f133d67c2b018a3b"])
def test_an_etag_matches_with_or_without_its_quotes(listed: str) -> None:
    store = InMemoryObjectStore()
    store.put("run1/s/a.pt", b"1234")
    store.objects["run1/s/a.pt"].etag = listed
    entry = ManifestEntry("run1/s/a.pt", "s/a.pt", 4, 0, crc32_checksum(b"1234"),
                          etag='"0f343b0931126a20f133d67c2b018a3b"')
    assert is_intact(store, Manifest.build("s", PREFIX, [entry]))


def test_a_set_restore_would_refuse_for_want_of_a_checksum_does_not_count() -> None:
    store = InMemoryObjectStore()
    etag = store.put("run1/s/a.pt", b"1234").etag
    entry = ManifestEntry("run1/s/a.pt", "s/a.pt", 4, 0, None, etag=etag)
    assert is_complete(store, Manifest.build("s", PREFIX, [entry]))
    assert not is_intact(store, Manifest.build("s", PREFIX, [entry]))


def test_a_job_set_whose_nodes_upload_one_file_alike_counts(tmp_path: Path) -> None:
    """Two nodes upload config.json alike, each getting its own ETag (SSE-KMS's are per
    upload); the object is the later one, which the lower rank's entry does not name."""
    store = InMemoryObjectStore()
    for step in (1, 2):
        shared = f"config of step {step}".encode()
        for rank in (0, 1):
            files = {f"step_{step}/__{rank}_0.distcp": f"shard {rank}".encode(),
                     f"step_{step}/config.json": shared}
            entries = [ManifestEntry(PREFIX + path, path, len(data), step, crc32_checksum(data),
                                     etag=store.put(PREFIX + path, data).etag)
                       for path, data in files.items()]
            part = Part(JobNode("job-1", 2, rank), Manifest.build(f"step_{step}", PREFIX,
                                                                  entries))
            store.put(part_key(PREFIX, "job-1", f"step_{step}", rank), part.to_json().encode())
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    pruner = Pruner(store, ledger, False, 1, JobNode("job-1", 2, 0))
    plan = pruner.plan([WatchDir(tmp_path, PREFIX)])
    ledger.close()
    parts = {part_key(PREFIX, "job-1", "step_1", rank) for rank in (0, 1)}
    assert {d.key for d in plan} == parts | {
        f"{PREFIX}step_1/__0_0.distcp", f"{PREFIX}step_1/__1_0.distcp",
        f"{PREFIX}step_1/config.json"}
    assert {d.key for d in plan if d.seal} == parts  # deleted in requests of their own



class RefusingStore(InMemoryObjectStore):
    """Refuses to delete the keys named; records each DeleteObjects batch."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused
        self.batches: list[list[str]] = []

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        self.batches.append(list(keys))
        super().delete_many([key for key in keys if key not in self.refused])
        return {key: "AccessDenied: Access Denied" for key in keys if key in self.refused}


@given(st.integers(0, 1500), st.integers(0, 1500), st.data())
@settings(max_examples=40, deadline=None)
def test_a_refused_manifest_deletion_leaves_every_file_in_place(
        tmp_path_factory: pytest.TempPathFactory, seals: int, files: int,
        data: st.DataObject) -> None:
    """Seals go in requests of their own, before any file: one DeleteObjects request may delete
    a set's files and refuse its manifest, which would leave the set looking complete."""
    deletions = ([Deletion(f"{PREFIX}.spotwatch/manifests/step_{n}.json", "retention", seal=True)
                  for n in range(seals)]
                 + [Deletion(f"{PREFIX}step_{n}/model.pt", "retention") for n in range(files)])
    refused = {deletion.key for deletion in deletions
               if deletion.seal and data.draw(st.booleans(), label=deletion.key)}
    store = RefusingStore(refused)
    for deletion in deletions:
        store.put(deletion.key, b"x")
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3")
    deleted = Pruner(store, ledger, False, 1).apply(deletions)
    ledger.close()
    assert all(len({key.endswith(".json") for key in batch}) == 1 for batch in store.batches)
    assert all(len(batch) <= DELETE_BATCH for batch in store.batches)
    if refused:
        assert all(deletion.seal for deletion in deleted)
        assert all(deletion.key in store.objects for deletion in deletions if not deletion.seal)
    else:
        assert deleted == deletions


def test_a_prune_cancelled_after_its_manifests_went_still_deletes_their_files(
        tmp_path: Path) -> None:
    """No later plan would find a dropped set's files without its manifest."""
    deletions = [Deletion(f"{PREFIX}.spotwatch/manifests/step_1.json", "retention", seal=True),
                 Deletion(f"{PREFIX}step_1/model.pt", "retention")]
    store = RefusingStore(set())
    for deletion in deletions:
        store.put(deletion.key, b"x")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    pruner = Pruner(store, ledger, False, 1)
    original = store.delete_many

    def cancel_after_the_seals(keys: Sequence[str]) -> dict[str, str]:
        refused = original(keys)
        pruner.cancelled.set()  # an upload arrived while the manifests were deleted
        return refused

    store.delete_many = cancel_after_the_seals  # type: ignore[method-assign]
    assert pruner.apply(deletions) == deletions
    ledger.close()
    assert not store.objects
