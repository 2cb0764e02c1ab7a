"""Deleting from S3: mirrored local deletions (`sync.delete`), retention (`sync.keep_sets`),
`spotwatch prune --dry-run`, and never anything excluded or not uploaded by spotwatch."""

from __future__ import annotations

import os
import shutil
from typing import Any

from .conftest import Workspace, keys_in, wait_for
from .test_daemon_e2e import flush_summary, save_checkpoint

MANIFESTS = "run1/.spotwatch/manifests/"


def save_set(workspace: Workspace, name: str, age_seconds: int) -> None:
    """A checkpoint set directory whose files are `age_seconds` old (older sets first)."""
    for part in ("model.pt", "optim.pt"):
        path = workspace.checkpoints / name / part
        save_checkpoint(path, 3_000)
        moment = 1_700_000_000 - age_seconds
        os.utime(path, (moment, moment))


def prune_lines(result: Any) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_mirror_deletes_with_dry_run_first(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"delete": True})
    for name in ("a.pt", "keep.pt", "gone/x.pt", "gone/y.pt"):
        save_checkpoint(workspace.checkpoints / name, 2_000)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    # Not spotwatch's: an excluded file and an object someone else put under the prefix.
    for key in ("run1/notes.tmp", "run1/foreign.pt"):
        s3.put_object(Bucket=workspace.bucket, Key=key, Body=b"theirs")
    (workspace.checkpoints / "a.pt").unlink()
    shutil.rmtree(workspace.checkpoints / "gone")
    before = keys_in(s3, workspace.bucket)

    planned = prune_lines(workspace.cli("prune", "-c", "config.yaml", "--dry-run"))
    assert keys_in(s3, workspace.bucket) == before
    gone = {"run1/a.pt", "run1/gone/x.pt", "run1/gone/y.pt", f"{MANIFESTS}a.pt.json",
            f"{MANIFESTS}gone.json"}
    assert {line.split()[2].split("/", 3)[3] for line in planned[:-1]} == gone
    assert planned[-1] == "would delete 5 objects"
    assert planned[0].endswith(".json (deleted locally)")  # manifests before their files

    done = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert done[-1] == "deleted 5 objects"
    assert keys_in(s3, workspace.bucket) == before - gone
    assert {"run1/notes.tmp", "run1/foreign.pt", "run1/keep.pt"} <= keys_in(s3, workspace.bucket)
    assert prune_lines(workspace.cli("prune", "-c", "config.yaml"))[-1] == "deleted 0 objects"


def test_fresh_instance_with_empty_directory_deletes_nothing(workspace: Workspace,
                                                             s3: Any) -> None:
    save_checkpoint(workspace.checkpoints / "a.pt", 1_000)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    # A new instance: empty checkpoint directory, empty state.
    (workspace.checkpoints / "a.pt").unlink()
    shutil.rmtree(workspace.root / "state")
    result = workspace.cli("prune", "-c", "config.yaml", "--delete")
    assert prune_lines(result)[-1] == "deleted 0 objects"
    assert "run1/a.pt" in keys_in(s3, workspace.bucket)


def test_retention_keeps_the_newest_complete_sets(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"keep_sets": 2})
    for age, name in ((300, "step_100"), (200, "step_200"), (100, "step_300")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_100/debug.tmp", Body=b"excluded")

    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert lines[-1] == "deleted 3 objects"
    remaining = keys_in(s3, workspace.bucket)
    assert not any(k.startswith("run1/step_100/") and not k.endswith(".tmp") for k in remaining)
    assert f"{MANIFESTS}step_100.json" not in remaining
    assert "run1/step_100/debug.tmp" in remaining  # excluded: never deleted
    assert {f"{MANIFESTS}step_200.json", f"{MANIFESTS}step_300.json"} <= remaining
    # The local copy stays and is not uploaded again: retention is about S3 only.
    assert (workspace.checkpoints / "step_100" / "model.pt").exists()
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0
    assert workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "5").stdout.endswith(
        "deleted 0 objects\n")


def test_retention_counts_only_complete_sets(workspace: Workspace, s3: Any) -> None:
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    # The newest set lost a file in S3: it is no longer complete, so the older one must stay.
    s3.delete_object(Bucket=workspace.bucket, Key="run1/step_2/model.pt")
    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1"))
    assert lines[-1] == "deleted 0 objects"
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)


def test_daemon_mirrors_deletions_and_applies_retention(workspace: Workspace,
                                                        s3: Any) -> None:
    workspace.write_config(sync={"delete": True, "keep_sets": 2})
    daemon = workspace.start_daemon()
    for number, age in ((1, 300), (2, 200), (3, 100)):
        save_set(workspace, f"step_{number}", age)
        daemon.wait_for_event("set_complete", count=number)
    wait_for(lambda: f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket), timeout=30)
    assert not any(k.startswith("run1/step_1/") for k in keys_in(s3, workspace.bucket))

    save_checkpoint(workspace.checkpoints / "loose.pt", 1_000)
    wait_for(lambda: "run1/loose.pt" in keys_in(s3, workspace.bucket))
    (workspace.checkpoints / "loose.pt").unlink()
    wait_for(lambda: "run1/loose.pt" not in keys_in(s3, workspace.bucket), timeout=30)
    reasons = {(e["key"], e["reason"]) for e in daemon.named("object_deleted")}
    assert ("run1/loose.pt", "deleted locally") in reasons
    assert ("run1/step_1/model.pt", "retention") in reasons
    assert daemon.stop() == 0


def test_prune_usage_errors(workspace: Workspace) -> None:
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == ("spotwatch: error: nothing to prune: set sync.delete or "
                                     "sync.keep_sets (or pass --delete / --keep-sets)")
    workspace.write_config(sync={"keep_sets": -1})
    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 2 and "sync.keep_sets" in result.stderr
    assert "Traceback" not in result.stderr
