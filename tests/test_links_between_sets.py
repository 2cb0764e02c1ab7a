"""A link into another set: a trainer or a dedup step saves step_200 with `embed.pt ->
../step_100/embed.pt` for a file that did not change. step_200's manifest records the file
the link leads to, so that restore gives back step_200 with embed.pt (verified) whether or not
step_100 comes with it, a set whose linked file is gone from S3 is not complete, and retention
never deletes that file while step_200 is kept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from spotwatch.keys import manifest_key, object_key
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry, ManifestError

from .conftest import Workspace, keys_in, object_bytes
from .memory_store import FakeClock, InMemoryObjectStore, crc32_checksum
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_failure_paths import BACKOFF, engine_on, manifest_in, pump_until, quiescent, write
from .test_failure_paths import PREFIX as FAILING_PREFIX
from .test_manifests import PREFIX
from .test_restore_safety import named

MANIFESTS = "run1/.spotwatch/manifests/"
EMBED = "run1/step_100/embed.pt"


def save_deduplicated(workspace: Workspace) -> dict[str, bytes]:
    """step_50 (whole), step_100 (model.pt, embed.pt), step_200 (model.pt, embed.pt linked to
    step_100's) and step_300 (embed.pt linked to step_200's link), each older than the next;
    all flushed. Returns the bytes saved, by path."""
    ckpt = workspace.checkpoints
    saved = {}
    for age, name in ((400, "step_50"), (300, "step_100"), (200, "step_200"), (100, "step_300")):
        saved[f"{name}/model.pt"] = save_checkpoint(ckpt / name / "model.pt", 3_000)
        if name in ("step_50", "step_100"):
            saved[f"{name}/embed.pt"] = save_checkpoint(ckpt / name / "embed.pt", 5_000)
        for path in (ckpt / name).iterdir():
            os.utime(path, (time.time() - age, time.time() - age))
    os.symlink("../step_100/embed.pt", ckpt / "step_200" / "embed.pt")
    os.symlink("../step_200/embed.pt", ckpt / "step_300" / "embed.pt")  # a chain of links
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 6
    return saved


def manifest_links(s3: Any, workspace: Workspace, set_name: str) -> list[dict[str, Any]]:
    data = json.loads(object_bytes(s3, workspace.bucket, manifest_key("run1/", set_name)))
    return data.get("links", [])  # type: ignore[no-any-return]


def test_a_set_linked_into_an_older_one_is_restored_whole_without_it(
        workspace: Workspace, s3: Any) -> None:
    saved = save_deduplicated(workspace)
    for set_name in ("step_300", "step_200"):
        fresh = workspace.root / f"fresh-{set_name}"
        result = restore(workspace, "--to", str(fresh), "--set", set_name)
        assert result.returncode == 0, result.stderr
        assert (fresh / set_name / "embed.pt").read_bytes() == saved["step_100/embed.pt"]
        assert f"{set_name}/embed.pt restored as a file" in result.stdout
        assert not (fresh / "step_100").exists()  # no half of the older set beside it
        assert sorted(os.listdir(fresh / set_name)) == ["embed.pt", "model.pt"]  # no temporary

    # The link has no object of its own: the manifest records the file it leads to.
    [link] = manifest_links(s3, workspace, "step_200")
    assert link["path"] == "step_200/embed.pt" and link["file"]["key"] == EMBED
    assert link["file"]["size"] == 5_000 and link["file"]["checksum"]
    [chained] = manifest_links(s3, workspace, "step_300")
    assert chained["target"] == "../step_200/embed.pt" and chained["file"]["key"] == EMBED
    assert "run1/step_200/embed.pt" not in keys_in(s3, workspace.bucket)


def test_a_step_of_links_into_an_older_one_only_is_a_checkpoint(workspace: Workspace,
                                                                  s3: Any) -> None:
    """Not a set of links only (Lightning's last.ckpt), which is never the one restored.
    (Which of the steps is newest goes by its files' mtimes: --set names this one.)"""
    saved = save_deduplicated(workspace)
    (workspace.checkpoints / "step_400").mkdir()
    os.symlink("../step_100/embed.pt", workspace.checkpoints / "step_400" / "embed.pt")
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    fresh = workspace.root / "fresh"
    result = restore(workspace, "--to", str(fresh), "--set", "step_400")
    assert result.returncode == 0, result.stderr
    assert "restored step_400" in result.stdout
    assert (fresh / "step_400" / "embed.pt").read_bytes() == saved["step_100/embed.pt"]


def test_restored_into_the_watched_directory_the_set_is_uploaded_as_it_now_is(
        workspace: Workspace, s3: Any) -> None:
    """A fresh instance: step_200 restored with embed.pt as a file, which no object has as its
    key; the next flush uploads it as step_200's own and seals the set again, and leaves
    step_100's object as it was."""
    saved = save_deduplicated(workspace)
    etag = s3.head_object(Bucket=workspace.bucket, Key=EMBED)["ETag"]
    ckpt = workspace.checkpoints
    for name in ("step_50", "step_100", "step_200", "step_300"):
        for path in (ckpt / name).iterdir():
            path.unlink()
        (ckpt / name).rmdir()
    (workspace.root / "state").rename(workspace.root / "old-state")
    result = restore(workspace, "--set", "step_200")
    assert result.returncode == 0, result.stderr
    assert (ckpt / "step_200" / "embed.pt").read_bytes() == saved["step_100/embed.pt"]
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    data = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_200.json"))
    assert sorted(entry["key"] for entry in data["files"]) == [
        "run1/step_200/embed.pt", "run1/step_200/model.pt"]
    assert "links" not in data
    assert object_bytes(s3, workspace.bucket, "run1/step_200/embed.pt") == saved[
        "step_100/embed.pt"]
    assert s3.head_object(Bucket=workspace.bucket, Key=EMBED)["ETag"] == etag


def test_a_link_is_made_again_only_to_a_file_that_verifies(workspace: Workspace,
                                                           s3: Any) -> None:
    """Restored where step_100 is already there, step_200's link is a link again; where the
    file it leads to holds other bytes, step_200 gets the bytes it was sealed with."""
    saved = save_deduplicated(workspace)
    target = workspace.root / "restored"
    assert restore(workspace, "--to", str(target), "--set", "step_100").returncode == 0
    result = restore(workspace, "--to", str(target), "--set", "step_200")
    assert result.returncode == 0, result.stderr
    assert "link step_200/embed.pt -> ../step_100/embed.pt" in result.stdout
    assert os.readlink(target / "step_200" / "embed.pt") == "../step_100/embed.pt"

    (target / "step_100" / "embed.pt").write_bytes(os.urandom(5_000))  # changed since
    result = restore(workspace, "--to", str(target), "--set", "step_200")
    assert result.returncode == 0, result.stderr
    assert not (target / "step_200" / "embed.pt").is_symlink()
    assert (target / "step_200" / "embed.pt").read_bytes() == saved["step_100/embed.pt"]


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_set_whose_linked_file_is_gone_is_passed_over(workspace: Workspace, s3: Any,
                                                        change: str) -> None:
    saved = save_deduplicated(workspace)
    if change == "deleted":
        s3.delete_object(Bucket=workspace.bucket, Key=EMBED)
    else:  # as many other bytes: only the checksum tells
        s3.put_object(Bucket=workspace.bucket, Key=EMBED, Body=os.urandom(5_000))
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_50" in result.stdout
    assert "passed over: step_300, step_200, step_100" in result.stdout
    assert (target / "step_50" / "embed.pt").read_bytes() == saved["step_50/embed.pt"]
    assert not (target / "step_200").exists()
    if change == "deleted":
        warnings = {w["set"]: w for w in named(result.stderr, "set_incomplete")}
        assert warnings["step_200"]["link"] == "step_200/embed.pt"
        assert warnings["step_200"]["key"] == EMBED
        assert "link step_200/embed.pt leads to is missing" in warnings["step_200"]["reason"]
    else:
        assert {w["set"] for w in named(result.stderr, "set_corrupt")} == {
            "step_300", "step_200", "step_100"}


def test_retention_keeps_the_file_a_kept_set_links_to(workspace: Workspace, s3: Any) -> None:
    saved = save_deduplicated(workspace)
    workspace.write_config(sync={"keep_sets": 1})
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    left = keys_in(s3, workspace.bucket)
    # step_300 is kept, and with it the file its link leads to; all else of the older sets goes.
    assert {key for key in left if not key.startswith(MANIFESTS)} == {
        "run1/step_300/model.pt", EMBED}
    assert {key for key in left if key.startswith(MANIFESTS)} == {f"{MANIFESTS}step_300.json"}
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_300" in result.stdout
    assert (target / "step_300" / "embed.pt").read_bytes() == saved["step_100/embed.pt"]


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_set_whose_linked_file_is_gone_does_not_count_for_retention(
        workspace: Workspace, s3: Any, change: str) -> None:
    save_deduplicated(workspace)
    if change == "deleted":
        s3.delete_object(Bucket=workspace.bucket, Key=EMBED)
    else:  # as many other bytes: another ETag
        s3.put_object(Bucket=workspace.bucket, Key=EMBED, Body=os.urandom(5_000))
    workspace.write_config(sync={"keep_sets": 1})
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    # Neither step_300 nor step_200 nor step_100 is whole: step_50 is the one set counted.
    assert {key for key in keys_in(s3, workspace.bucket) if key.startswith(MANIFESTS)} == {
        f"{MANIFESTS}{name}.json" for name in ("step_50", "step_100", "step_200", "step_300")}
    target = workspace.root / "restored"
    assert "restored step_50" in restore(workspace, "--to", str(target)).stdout


def test_a_set_is_not_sealed_before_the_file_its_link_leads_to(workspace: Workspace,
                                                               s3: Any) -> None:
    """The linked file excluded by the filters never reaches S3: the set linking to it is
    reported incomplete, never sealed without it."""
    ckpt = workspace.checkpoints
    workspace.write_config(watch=[{"path": str(ckpt), "prefix": "run1/",
                                   "exclude": [f"{ckpt}/step_100/embed.pt"]}])
    save_checkpoint(ckpt / "step_100" / "embed.pt", 5_000)
    save_checkpoint(ckpt / "step_100" / "model.pt", 3_000)
    save_checkpoint(ckpt / "step_200" / "model.pt", 3_000)
    os.symlink("../step_100/embed.pt", ckpt / "step_200" / "embed.pt")
    result = workspace.cli("flush", "-c", "config.yaml")
    assert f"{MANIFESTS}step_100.json" in keys_in(s3, workspace.bucket)
    assert f"{MANIFESTS}step_200.json" not in keys_in(s3, workspace.bucket)
    [incomplete] = [event for event in named(result.stderr, "set_incomplete")
                    if event["set"] == "run1/step_200"]
    assert incomplete["missing"] == ["step_100/embed.pt"]


def _entry(path: str, **change: Any) -> dict[str, Any]:
    return {"key": PREFIX + path, "path": path, "size": 5, "mtime_ns": 1,
            "checksum": "c", **change}


def _linking(file: dict[str, Any]) -> dict[str, Any]:
    return {"format": 1, "set": "step_2", "prefix": PREFIX, "sealed_at": 1.0,
            "files": [_entry("step_2/model.pt")],
            "links": [{"path": "step_2/embed.pt", "target": "../step_1/embed.pt",
                       "file": file}]}


def test_a_linked_file_reads_back_and_a_link_without_one_is_written_as_before() -> None:
    linked = ManifestEntry(object_key(PREFIX, "step_1/embed.pt"), "step_1/embed.pt", 5, 1, "c",
                           None, "CRC32", '"etag"')
    manifest = Manifest.build("step_2", PREFIX, [], [
        LinkEntry("step_2/embed.pt", "../step_1/embed.pt", linked),
        LinkEntry("step_2/latest.pt", "embed.pt")])
    assert Manifest.from_json(manifest.to_json(), PREFIX) == manifest
    assert manifest.linked_files == (linked,)
    assert json.loads(manifest.to_json())["links"][1] == {"path": "step_2/latest.pt",
                                                          "target": "embed.pt"}


@pytest.mark.parametrize("file", [
    _entry("step_1/embed.pt", key="other/step_1/embed.pt"),  # another prefix
    _entry(".spotwatch/manifests/step_1.json"),  # spotwatch's own key space
    _entry("step_1/../x"),
    _entry("step_1/embed.pt", size=-1),
    {"path": "step_1/embed.pt"},
    "run1/step_1/embed.pt",
])
def test_a_malformed_linked_file_is_refused(file: Any) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(_linking(file)), PREFIX)


def test_a_set_waits_for_the_file_its_link_leads_to_then_lists_it(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """The linked file's upload fails at first: the set linking to it is sealed only once
    that file is durable, and then lists it."""
    root = tmp_path / "ckpt"
    write(root, "step_100/embed.pt", b"embedding")
    write(root, "step_200/model.pt", b"model")
    os.symlink("../step_100/embed.pt", root / "step_200" / "embed.pt")
    link = step_200_link_once_durable(root, tmp_path, store, clock, "step_100/embed.pt")
    assert link.file is not None and link.file.key == f"{FAILING_PREFIX}step_100/embed.pt"
    assert link.file.checksum == crc32_checksum(b"embedding")


def step_200_link_once_durable(root: Path, state: Path, store: InMemoryObjectStore,
                               clock: FakeClock, failing: str) -> LinkEntry:
    """The one link of step_200, whose manifest is not written while the first upload of the
    file `failing` (below root) fails, but once it is durable; every other file of root
    uploads at once."""
    store.fail("upload_file", times=1, key=f"{FAILING_PREFIX}{failing}")
    others = sum(1 for path in root.rglob("*") if path.is_file() and not path.is_symlink()) - 1
    with engine_on(root, state, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: engine.retries.failures(root / failing) == 1
                   and engine.totals.files == others, clock)
        assert manifest_key(FAILING_PREFIX, "step_200") not in store.objects
        pump_until(engine, lambda: quiescent(engine), clock, step=BACKOFF.cap)
    [link] = manifest_in(store, "step_200").links
    return link
