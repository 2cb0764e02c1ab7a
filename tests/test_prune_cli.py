"""`spotwatch prune` as operators run it (cron, by hand): its output and exit code say what it
did, end to end with the CLI against the moto server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import Workspace, keys_in, object_bytes
from .faultproxy import FaultProxy, Request
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_prune import MANIFESTS, save_set


def _deletes(request: Request) -> bool:
    return "delete" in request.query  # DeleteObjects


def test_each_key_s3_refuses_to_delete_is_named_with_its_reason(workspace: Workspace,
                                                                s3: Any) -> None:
    """DeleteObjects answers 200 and refuses keys one by one (a grant missing for a prefix):
    each warning says S3's code and message, so a missing grant is not taken for an outage."""
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("refuse-keys", _deletes, times=100)
        result = workspace.cli("prune", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
        assert proxy.count("POST", "refuse-keys") >= 1
    assert result.returncode == 1
    refused = [event for line in result.stderr.splitlines() if line.startswith("{")
               for event in [json.loads(line)] if event["event"] == "delete_failed"]
    assert refused and all(event["error"] == "AccessDenied: Access Denied"
                           for event in refused)
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)


def test_deletions_s3_refuses_make_prune_fail(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("403", _deletes, times=100)  # botocore does not retry AccessDenied
        result = workspace.cli("prune", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["deleted 0 objects"]
    assert result.stderr.splitlines()[-1] == (
        "spotwatch: error: 3 of 3 objects were not deleted (see the warnings above); "
        "the next prune tries again")
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)
    # Once S3 takes them, the same command deletes them and succeeds.
    done = workspace.cli("prune", "-c", "config.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "deleted 3 objects"


def test_a_set_that_lost_a_file_to_a_mirrored_deletion_is_sealed_again(
        workspace: Workspace, s3: Any) -> None:
    """Deleting one file of a sealed set (say the optimizer state of an old checkpoint) and
    mirroring that with `prune --delete` leaves the rest of the set a checkpoint."""
    save_set(workspace, "step_1", 200)
    save_set(workspace, "step_2", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    model = (workspace.checkpoints / "step_1" / "model.pt").read_bytes()
    (workspace.checkpoints / "step_1" / "optim.pt").unlink()
    result = workspace.cli("prune", "-c", "config.yaml", "--delete")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "deleted 2 objects"
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_1.json"))
    assert [entry["path"] for entry in manifest["files"]] == ["step_1/model.pt"]
    # Restore falls back to it as to any complete set.
    s3.delete_object(Bucket=workspace.bucket, Key=f"{MANIFESTS}step_2.json")
    target = workspace.root / "restored"
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert "restored step_1" in restored.stdout
    assert (target / "step_1" / "model.pt").read_bytes() == model
    assert not (target / "step_1" / "optim.pt").exists()


def test_a_set_sealed_again_by_prune_loses_the_held_copies_a_rewrite_left(
        workspace: Workspace, s3: Any) -> None:
    """A daemon stopped while it replaced a file of a sealed set leaves that file's held copy
    (sync.sets.held). `prune --delete` dropping the set's manifest to seal it again deletes
    it with the manifest; a held copy of a set it does not touch stays."""
    save_set(workspace, "step_1", 200)
    save_set(workspace, "step_2", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    held = "run1/.spotwatch/held/"
    for name in ("step_1", "step_2"):
        s3.copy_object(Bucket=workspace.bucket, Key=f"{held}{name}/model.pt",
                       CopySource={"Bucket": workspace.bucket, "Key": f"run1/{name}/model.pt"})
    (workspace.checkpoints / "step_1" / "optim.pt").unlink()
    result = workspace.cli("prune", "-c", "config.yaml", "--delete")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_1.json"))
    assert [entry["path"] for entry in manifest["files"]] == ["step_1/model.pt"]
    assert [key for key in keys_in(s3, workspace.bucket) if key.startswith(held)] == [
        f"{held}step_2/model.pt"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_watched_directory_moved_with_its_config_mirrors_no_deletion(
        workspace: Workspace, s3: Any, dry_run: bool) -> None:
    """The checkpoints moved to a bigger volume, watch.path changed to follow them, same
    prefix: every file is still there, so nothing is deleted, and nothing is uploaded again."""
    workspace.write_config(sync={"delete": True})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    before = keys_in(s3, workspace.bucket)
    moved = workspace.root / "bigger-volume"
    workspace.checkpoints.rename(moved)
    workspace.checkpoints = moved
    workspace.write_config(sync={"delete": True})
    (moved / "step_2" / "optim.pt").unlink()  # a real deletion there still mirrors

    result = workspace.cli("prune", "-c", "config.yaml", *(["--dry-run"] if dry_run else []))
    assert result.returncode == 0, result.stderr
    verb = "would delete" if dry_run else "deleted"
    sealed = "would seal" if dry_run else "sealed"
    assert result.stdout.splitlines() == [
        f"{verb} s3://{workspace.bucket}/{MANIFESTS}step_2.json (deleted locally)",
        f"{verb} s3://{workspace.bucket}/run1/step_2/optim.pt (deleted locally)",
        f"{sealed} s3://{workspace.bucket}/run1/step_2 again with the files left of it "
        "(a new manifest)",
        f"{verb} 2 objects"]
    if not dry_run:
        assert keys_in(s3, workspace.bucket) == before - {"run1/step_2/optim.pt"}
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0


def test_a_pruned_set_saved_again_in_part_is_uploaded_whole_and_sealed(
        workspace: Workspace, s3: Any) -> None:
    """Retention removed step_1 from S3 (its local files stay). The trainer, resumed from an
    earlier step, saves step_1 again but rewrites only the model: the optimizer file it left
    as it was must go to S3 again too, or step_1 is never sealed and restore cannot reach it."""
    step_1_pruned(workspace)
    model = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 3_000)
    optim = (workspace.checkpoints / "step_1" / "optim.pt").read_bytes()
    step_1_sealed_whole_by_a_flush(workspace, s3)
    target = workspace.root / "restored"
    restored = workspace.cli("restore", "-c", "config.yaml", "--set", "step_1",
                             "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert (target / "step_1" / "model.pt").read_bytes() == model
    assert (target / "step_1" / "optim.pt").read_bytes() == optim


def test_deleting_every_uploaded_file_beside_retired_ones_still_mirrors(
        workspace: Workspace, s3: Any) -> None:
    """Retention removed step_1 from S3 and left its files on disk; the trainer then deletes
    step_2, the only set spotwatch's objects still stand for. The directory is plainly the same
    one (step_1 is there), so the deletion mirrors: a directory holding none of the sets
    uploaded from it is skipped only when none of the retired ones are there either."""
    workspace.write_config(sync={"keep_sets": 1, "delete": True})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert workspace.cli("prune", "-c", "config.yaml").stdout.splitlines()[-1] == (
        "deleted 3 objects")  # step_1's manifest and files
    shutil.rmtree(workspace.checkpoints / "step_2")
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "deleted 3 objects"
    assert "mirror_skipped" not in result.stderr
    assert not any(key.startswith("run1/step_2/") for key in keys_in(s3, workspace.bucket))


def test_a_pruned_set_whose_link_is_pointed_elsewhere_is_uploaded_whole_and_sealed(
        workspace: Workspace, s3: Any) -> None:
    """A link of a set retention removed (its files stay on disk) is pointed elsewhere: the set
    changed, so it goes to S3 whole again, as when one of its files is saved again, rather than
    staying incomplete with its files current in the ledger and never uploaded."""
    step_1_pruned(workspace, link_to="model.pt")
    os.remove(workspace.checkpoints / "step_1" / "last.pt")
    os.symlink("optim.pt", workspace.checkpoints / "step_1" / "last.pt")
    manifest = step_1_sealed_whole_by_a_flush(workspace, s3)
    assert [(link["path"], link["target"]) for link in manifest["links"]] == [
        ("step_1/last.pt", "optim.pt")]


def step_1_pruned(workspace: Workspace, link_to: str | None = None) -> None:
    """step_1 (with a link last.pt, if link_to) and step_2 flushed, then step_1 removed from
    S3 by retention (keep_sets 1), its files left on disk."""
    workspace.write_config(sync={"keep_sets": 1})
    save_set(workspace, "step_1", 200)
    if link_to is not None:
        os.symlink(link_to, workspace.checkpoints / "step_1" / "last.pt")
    save_set(workspace, "step_2", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    pruned = workspace.cli("prune", "-c", "config.yaml")
    assert pruned.stdout.splitlines()[-1] == "deleted 3 objects", pruned.stderr


def step_1_sealed_whole_by_a_flush(workspace: Workspace, s3: Any) -> dict[str, Any]:
    """Flush; step_1's manifest, which must list both its files."""
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    assert "set_incomplete" not in flushed.stderr
    manifest: dict[str, Any] = json.loads(
        object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_1.json"))
    assert sorted(entry["path"] for entry in manifest["files"]) == [
        "step_1/model.pt", "step_1/optim.pt"]
    return manifest


def test_a_file_replaced_by_a_directory_of_its_name_is_mirrored_away(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """With sync.delete, a file that gave way to a directory of the same name is gone as a
    file: its object is deleted, and the new directory's files uploaded. One that gave way to
    a symlink is not: its bytes may be where the link leads (moved to another disk)."""
    workspace.write_config(sync={"delete": True})
    save_checkpoint(workspace.checkpoints / "step_1" / "x.pt", 100)
    save_checkpoint(workspace.checkpoints / "step_2" / "model.pt", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    (workspace.checkpoints / "step_1" / "x.pt").unlink()
    save_checkpoint(workspace.checkpoints / "step_1" / "x.pt" / "y.pt", 100)
    moved = tmp_path / "elsewhere.pt"
    (workspace.checkpoints / "step_2" / "model.pt").rename(moved)
    os.symlink(moved, workspace.checkpoints / "step_2" / "model.pt")
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    keys = keys_in(s3, workspace.bucket)
    assert "run1/step_1/x.pt/y.pt" in keys
    assert "run1/step_1/x.pt" not in keys
    assert {"run1/step_2/model.pt", f"{MANIFESTS}step_2.json"} <= keys, keys


def test_a_set_whose_manifest_went_is_sealed_again_when_its_files_deletion_fails(
        workspace: Workspace, s3: Any) -> None:
    """A mirrored deletion deletes the set's manifest, then its files (a separate request, so
    no set ever looks complete while it goes). When S3 refuses the files' batch, the set must
    still be sealed again with what is left: it had no manifest at all, so restore passed
    over the newest checkpoint, whole on disk and in S3, and every later prune did the same."""
    save_set(workspace, "step_1", 200)
    save_set(workspace, "step_2", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    model = (workspace.checkpoints / "step_2" / "model.pt").read_bytes()
    (workspace.checkpoints / "step_2" / "optim.pt").unlink()
    batches: list[str] = []

    def files_batch(request: Request) -> bool:  # the first DeleteObjects holds the seals
        if _deletes(request):
            batches.append(request.path)
        return _deletes(request) and len(batches) > 1

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("403", files_batch, times=100)
        result = workspace.cli("prune", "-c", "config.yaml", "--delete",
                               AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1, result.stdout
    assert "run1/step_2/optim.pt" in keys_in(s3, workspace.bucket)  # its deletion refused
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_2.json"))
    assert [entry["path"] for entry in manifest["files"]] == ["step_2/model.pt"]
    target = workspace.root / "restored"
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert "restored step_2" in restored.stdout
    assert (target / "step_2" / "model.pt").read_bytes() == model
