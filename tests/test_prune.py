"""Deleting from S3: mirrored local deletions (`sync.delete`), retention (`sync.keep_sets`),
`spotwatch prune --dry-run`, and never anything excluded, not uploaded by spotwatch, or listed
by a kept set's manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.emulator import ImdsEmulator
from spotwatch.keys import (
    belongs_to_set,
    manifest_key,
    object_key,
    series_of,
    step_number,
    step_order,
)
from spotwatch.sync.pruner import plan_deletions
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .conftest import Workspace, keys_in, object_bytes, wait_for
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


def test_retention_keeps_each_series_of_sets_apart(workspace: Workspace, s3: Any) -> None:
    """DeepSpeed's layout: global_stepN/ directories, and a `latest` file beside them that
    names the newest; rewritten at every save, it is always the newest set, and it must not
    count against the steps (keep_sets 1 left none of them)."""
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((400, "global_step100"), (300, "global_step200")):
        save_set(workspace, name, age)
    (workspace.checkpoints / "config.json").write_text("{}")  # older than the steps
    os.utime(workspace.checkpoints / "config.json", (1_699_999_500, 1_699_999_500))
    (workspace.checkpoints / "latest").write_text("global_step200")
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))

    result = workspace.cli("prune", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    remaining = keys_in(s3, workspace.bucket)
    assert f"{MANIFESTS}global_step100.json" not in remaining
    assert not any(k.startswith("run1/global_step100/") for k in remaining)
    assert {f"{MANIFESTS}global_step200.json", f"{MANIFESTS}latest.json",
            f"{MANIFESTS}config.json.json", "run1/latest", "run1/config.json",
            "run1/global_step200/model.pt"} <= remaining


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


def test_daemon_retention_runs_beside_a_log_written_all_the_time(workspace: Workspace,
                                                                  s3: Any) -> None:
    # A top-level log the trainer appends to all the time never settles; retention of the
    # checkpoint sets beside it must go on regardless.
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    save_set(workspace, "step_1", 300)
    daemon.wait_for_event("set_complete")
    stop = threading.Event()

    def append_log() -> None:
        with (workspace.checkpoints / "train.log").open("a") as log:
            while not stop.wait(0.1):
                log.write("step loss=1.0\n")
                log.flush()

    writer = threading.Thread(target=append_log)
    writer.start()
    try:
        save_set(workspace, "step_2", 200)
        daemon.wait_for_event("set_complete", count=2)
        wait_for(lambda: f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket),
                 timeout=30)
        keys = keys_in(s3, workspace.bucket)
        assert not any(k.startswith("run1/step_1/") for k in keys)
        assert {f"{MANIFESTS}step_2.json", "run1/step_2/model.pt"} <= keys
    finally:
        stop.set()
        writer.join()
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


def test_a_poisoned_old_manifest_deletes_nothing_of_a_kept_set_nor_foreign_keys(
        workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    foreign = {"other-team/secret.bin", "run1/foreign.pt"}
    for key in foreign:
        s3.put_object(Bucket=workspace.bucket, Key=key, Body=b"theirs")
    # step_1's manifest, rewritten to list the kept set's object and keys that are not its own.
    poisoned = json.loads(s3.get_object(Bucket=workspace.bucket,
                                        Key=f"{MANIFESTS}step_1.json")["Body"].read())
    template = poisoned["files"][0]
    poisoned["prefix"] = ""
    poisoned["files"] += [{**template, "key": key, "path": key}
                          for key in ("run1/step_2/model.pt", *sorted(foreign))]
    s3.put_object(Bucket=workspace.bucket, Key=f"{MANIFESTS}step_1.json",
                  Body=json.dumps(poisoned).encode())
    before = keys_in(s3, workspace.bucket)

    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert lines[-1] == "deleted 0 objects"  # the manifest is not one spotwatch wrote: skipped
    assert keys_in(s3, workspace.bucket) == before
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(workspace.root / "r"))
    assert restored.returncode == 0 and "restored step_2" in restored.stdout


def _moved_away(directory: Path) -> str:
    directory.rename(directory.with_name("unmounted"))
    return "the watched directory is missing"


def _mount_point_left_empty(directory: Path) -> str:
    directory.rename(directory.with_name("unmounted"))
    directory.mkdir()  # the mount point, its volume not mounted (yet)
    return "the watched directory is empty"


def _fresh_volume_mounted(directory: Path) -> str:
    """A newly made file system mounted there (an instance store wiped by a stop and start,
    formatted again at boot): not empty, it holds its lost+found, and none of the sets."""
    directory.rename(directory.with_name("unmounted"))
    (directory / "lost+found").mkdir(parents=True)
    return "the watched directory holds none of the sets uploaded from it"


@pytest.mark.parametrize("hide", [_moved_away, _mount_point_left_empty, _fresh_volume_mounted])
def test_a_watched_directory_out_of_sight_mirrors_no_deletion(
        workspace: Workspace, s3: Any, hide: Callable[[Path], str]) -> None:
    workspace.write_config(sync={"delete": True})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    before = keys_in(s3, workspace.bucket)
    # Its files were not deleted, only out of sight.
    reason = hide(workspace.checkpoints)
    for dry_run in (("--dry-run",), ()):
        result = workspace.cli("prune", "-c", "config.yaml", *dry_run)
        assert prune_lines(result)[-1].endswith(" 0 objects")
        assert reason in result.stderr
    assert keys_in(s3, workspace.bucket) == before

    shutil.rmtree(workspace.checkpoints, ignore_errors=True)
    (workspace.root / "unmounted").rename(workspace.checkpoints)
    (workspace.checkpoints / "step_2" / "optim.pt").unlink()  # a real deletion still mirrors
    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert lines[-1] == "deleted 2 objects"  # the set's manifest, then the file
    assert keys_in(s3, workspace.bucket) == before - {"run1/step_2/optim.pt"}
    resealed = json.loads(s3.get_object(Bucket=workspace.bucket,
                                        Key=f"{MANIFESTS}step_2.json")["Body"].read())
    assert [entry["path"] for entry in resealed["files"]] == ["step_2/model.pt"]


def _restored(workspace: Workspace) -> str:
    result = workspace.cli("restore", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "restored step_3" in result.stdout
    return "step_3"


def _saved_anew(workspace: Workspace) -> str:
    """The daemon (here a flush) starts on the new volume, then the trainer saves there."""
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0
    save_set(workspace, "step_4", 0)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    return "step_4"


@pytest.mark.parametrize("put_back", [_restored, _saved_anew])
@pytest.mark.parametrize("hide", [_mount_point_left_empty, _fresh_volume_mounted])
def test_sets_lost_with_a_wiped_volume_stay_once_a_set_is_back(
        workspace: Workspace, s3: Any, hide: Callable[[Path], str],
        put_back: Callable[[Workspace], str]) -> None:
    """An instance store wiped by a stop and start, the ledger kept on the root volume: the
    resume restores the newest set there, or the trainer saves a new one, before any prune
    looked. The sets that went with the old file system were not deleted, and stay in S3;
    a file deleted from a set in sight still mirrors."""
    workspace.write_config(sync={"delete": True})
    for age, name in ((300, "step_1"), (200, "step_2"), (100, "step_3")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    before = keys_in(s3, workspace.bucket)
    hide(workspace.checkpoints)
    in_sight = put_back(workspace)

    for dry_run in (("--dry-run",), ()):
        assert prune_lines(workspace.cli("prune", "-c", "config.yaml", *dry_run))[-1].endswith(
            " 0 objects")
    assert before <= keys_in(s3, workspace.bucket)
    (workspace.checkpoints / in_sight / "optim.pt").unlink()
    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert lines[-1] == "deleted 2 objects"  # the set's manifest, then the file
    assert f"run1/{in_sight}/optim.pt" not in keys_in(s3, workspace.bucket)
    assert before - {f"run1/{in_sight}/optim.pt", f"{MANIFESTS}{in_sight}.json"} <= keys_in(
        s3, workspace.bucket)


def test_a_trainer_keeping_one_checkpoint_has_the_last_one_mirrored_away(
        workspace: Workspace, s3: Any) -> None:
    """The trainer deletes step_1 as it saves step_2, before step_2 is in S3: for a moment
    the directory holds none of the sets recorded from it. That is a deletion all the same,
    mirrored once step_2 is in S3, whether a prune or a start looked in that moment."""
    workspace.write_config(sync={"delete": True})
    save_set(workspace, "step_1", 200)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    shutil.rmtree(workspace.checkpoints / "step_1")
    save_set(workspace, "step_2", 100)
    assert prune_lines(workspace.cli("prune", "-c", "config.yaml"))[-1] == "deleted 0 objects"
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    assert prune_lines(workspace.cli("prune", "-c", "config.yaml"))[-1] == "deleted 3 objects"
    assert not [key for key in keys_in(s3, workspace.bucket) if "step_1" in key]


def test_an_object_another_tool_wrote_over_is_not_mirrored_away(workspace: Workspace,
                                                                s3: Any) -> None:
    """Someone put their own bytes at a key spotwatch had uploaded (`aws s3 cp` of a converted
    model, say): the object is theirs now, and deleting the local file leaves it alone, while
    the set's other files, still as spotwatch uploaded them, go."""
    workspace.write_config(sync={"delete": True})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_1/model.pt", Body=b"theirs")
    shutil.rmtree(workspace.checkpoints / "step_1")

    result = workspace.cli("prune", "-c", "config.yaml")
    assert prune_lines(result)[-1] == "deleted 2 objects"  # the manifest, then optim.pt
    remaining = keys_in(s3, workspace.bucket)
    assert "run1/step_1/optim.pt" not in remaining
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == b"theirs"
    assert "replaced in S3 since spotwatch uploaded it" in result.stderr


# Root passes permission checks: without these capabilities it is held to them too.
WITHOUT_OVERRIDES = (("setpriv", "--bounding-set=-dac_override,-dac_read_search")
                     if os.geteuid() == 0 else ())


def test_a_file_that_cannot_be_looked_at_is_not_taken_for_deleted(workspace: Workspace,
                                                                  s3: Any) -> None:
    workspace.write_config(sync={"delete": True})
    save_set(workspace, "step_1", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    before = keys_in(s3, workspace.bucket)
    locked = workspace.checkpoints / "step_1"
    locked.chmod(0)  # as a permission change or a network file system's error would have it
    try:
        result = subprocess.run(
            [*WITHOUT_OVERRIDES, sys.executable, "-m", "spotwatch.cli", "prune", "-c",
             "config.yaml"], cwd=workspace.root, env=workspace.env(), capture_output=True,
            text=True, timeout=60)
    finally:
        locked.chmod(0o755)
    assert prune_lines(result)[-1] == "deleted 0 objects"
    assert keys_in(s3, workspace.bucket) == before


def test_mirroring_a_file_of_a_sealed_set_takes_its_manifest_first(workspace: Workspace,
                                                                   s3: Any) -> None:
    save_set(workspace, "step_1", 100)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    (workspace.checkpoints / "step_1" / "optim.pt").unlink()
    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml", "--delete"))
    # The set's manifest lists the file: it goes first, so no kept manifest lists a deleted
    # object (the daemon seals the set again with what is left).
    assert lines[:-1] == [
        f"deleted s3://{workspace.bucket}/{MANIFESTS}step_1.json (deleted locally)",
        f"deleted s3://{workspace.bucket}/run1/step_1/optim.pt (deleted locally)",
        f"sealed s3://{workspace.bucket}/run1/step_1 again with the files left of it "
        "(a new manifest)"]
    assert "run1/step_1/model.pt" in keys_in(s3, workspace.bucket)
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_1.json"))
    assert [entry["path"] for entry in manifest["files"]] == ["step_1/model.pt"]


# -- the planner, for generated manifests and ledger contents -------------------------------

PREFIX = "run1/"
# Two series for retention (keys.series_of): s#, and `latest` alone.
SET_NAMES = ("s1", "s2", "s10", "latest", "e=1-step=30", "e=2-step=20", "m-00001-of-00002",
             "m-00002-of-00002")
# Keys a manifest may name: its own, another set's, excluded, manifests, outside the prefix.
KEY_POOL = (*(f"run1/{n}/{f}" for n in SET_NAMES for f in ("x.pt", "y.tmp")), "run1/s1",
            "run1/loose.pt", "run1/.spotwatch/manifests/s1.json", "other-team/secret.bin",
            "run1", "run10/s1/x.pt")


def _not_tmp(relative: str) -> bool:
    return not relative.endswith(".tmp")


@st.composite
def remote_sets(draw: st.DrawFn) -> list[Manifest]:
    names = draw(st.lists(st.sampled_from(SET_NAMES), unique=True))
    return [Manifest(name, PREFIX, tuple(
        ManifestEntry(key, key.removeprefix(PREFIX), 1, 0, "AAAAAA==")
        for key in draw(st.lists(st.sampled_from(KEY_POOL), min_size=1, unique=True))),
        float(index)) for index, name in enumerate(names)]


@given(remote_sets(), st.sets(st.sampled_from(KEY_POOL)), st.integers(0, 3),
       st.sets(st.sampled_from(SET_NAMES)))
def test_planned_deletions_are_spotwatchs_and_never_listed_by_a_kept_set(
        manifests: list[Manifest], gone: set[str], keep_sets: int, complete: set[str]) -> None:
    deletions = plan_deletions(PREFIX, _not_tmp, manifests, gone, keep_sets,
                               lambda m: m.set_name in complete)
    keys = [d.key for d in deletions]
    assert len(keys) == len(set(keys))
    manifest_keys = {manifest_key(PREFIX, m.set_name): m for m in manifests}
    dropped = [manifest_keys[k] for k in keys if k in manifest_keys]
    files = [k for k in keys if k not in manifest_keys]
    assert keys == [manifest_key(PREFIX, m.set_name) for m in dropped] + files  # manifests first
    assert [d.seal for d in deletions] == [True] * len(dropped) + [False] * len(files)
    kept = [m for m in manifests if m not in dropped]
    listed_by_kept = {e.key for m in kept for e in m.files}
    assert not listed_by_kept & set(files)
    own_files_of_dropped = {e.key for m in dropped for e in m.files
                            if belongs_to_set(e.key, object_key(PREFIX, m.set_name))}
    for key in files:
        assert key in gone or key in own_files_of_dropped  # the ledger's, or its set's own
        assert key.startswith(PREFIX) and _not_tmp(key)
        assert not key.startswith(PREFIX + ".spotwatch/")
    if keep_sets:  # in each series, from the newest and from the highest step down to the
        # keep_sets-th complete set, every set stays; no other does
        mirrored = {k for k in gone if k.startswith(PREFIX) and _not_tmp(k)
                    and not k.startswith(PREFIX + ".spotwatch/")}
        droppable = [m for m in manifests if not any(e.key in mirrored for e in m.files)]

        def down_to_the_last_kept(ordered: list[Manifest]) -> set[str]:
            taken: set[str] = set()
            for m in ordered:
                if len(taken & complete) >= keep_sets:
                    break
                taken.add(m.set_name)
            return taken

        for series in {series_of(m.set_name) for m in manifests}:
            in_series = [m for m in droppable if series_of(m.set_name) == series]
            by_step = sorted((m for m in in_series if step_number(m.set_name) is not None),
                             key=lambda m: step_order(m.set_name), reverse=True)
            assert {m.set_name for m in in_series if m in kept} == (
                down_to_the_last_kept(in_series) | down_to_the_last_kept(by_step))
    elif not gone:
        assert deletions == []


def test_a_maintenance_event_days_ahead_does_not_stop_retention(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    """A scheduled event announced days ahead is a notice (the trainer is told, a flush runs),
    but retention goes on until shortly before it is due, not paused until a restart."""
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    save_set(workspace, "step_1", 300)
    daemon.wait_for_event("set_complete")
    imds.schedule_event("system-reboot", in_seconds=3 * 86400)
    daemon.wait_for_event("flush_done")
    save_set(workspace, "step_2", 200)
    daemon.wait_for_event("set_complete", count=2)
    wait_for(lambda: f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket), timeout=30)
    assert daemon.stop() == 0


def test_the_shards_of_a_model_saved_beside_the_steps_are_no_series() -> None:
    """A model saved in shards at the top level (a final save_model beside checkpoint-N/):
    each shard is a set of its own, and retention never takes the older shards for older
    sets of a series."""
    shards = [f"model-0000{n}-of-00004.safetensors" for n in (4, 3, 2, 1)]  # newest first
    manifests = [Manifest(name, PREFIX, (ManifestEntry(PREFIX + name, name, 1, 0, "AAAAAA=="),),
                          float(100 - index)) for index, name in enumerate(shards)]
    assert len({series_of(name) for name in shards}) == 4
    assert all(step_number(name) is None for name in shards)
    assert plan_deletions(PREFIX, _not_tmp, manifests, set(), 2, lambda m: True) == []


def test_the_highest_steps_kept_are_the_named_steps_whatever_else_the_name_holds() -> None:
    """Lightning's epoch=E-step=S and a metric before the step: an evaluation written into an
    old step makes it the newest by date; the highest steps stay, by their step."""
    names = ["val_loss=0.9-step=200.ckpt", "val_loss=2.5-step=400.ckpt",
             "val_loss=1.1-step=300.ckpt"]  # newest first: step=200 was written to last
    manifests = [Manifest(name, PREFIX, (ManifestEntry(PREFIX + name, name, 1, 0, "AAAAAA=="),),
                          float(100 - index)) for index, name in enumerate(names)]
    assert [step_number(name) for name in names] == [200, 400, 300]
    dropped = {d.key for d in plan_deletions(PREFIX, _not_tmp, manifests, set(), 1,
                                             lambda m: True)}
    # Kept: the newest by date (step=200) and the highest step (step=400).
    assert dropped == {manifest_key(PREFIX, names[2]), PREFIX + names[2]}


SHARDS = ("__0_0.distcp", "__1_0.distcp", "__2_0.distcp", ".metadata")


def _emptied_then_saved_into(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()
    save_checkpoint(directory / SHARDS[0], 2_000)


def _rank_dropped(directory: Path) -> None:
    (directory / SHARDS[2]).unlink()
    save_checkpoint(directory / SHARDS[0], 2_000)


def _marker_removed_first(directory: Path) -> None:
    (directory / ".metadata").unlink()
    save_checkpoint(directory / SHARDS[0], 2_000)


@pytest.mark.parametrize("save_begun", [_emptied_then_saved_into, _rank_dropped,
                                        _marker_removed_first])
def test_deletions_in_a_set_being_saved_again_wait_for_its_new_seal(
        workspace: Workspace, s3: Any, save_begun: Callable[[Path], None]) -> None:
    """A trainer saving into a fixed directory (torch.distributed.checkpoint) removes files
    of its last save first, or saves with fewer ranks: until its new marker is there, the
    last manifest (with held copies of the files rewritten) is the set's only whole version in
    S3. Mirroring the deletions then would delete it, so they wait: a restore meanwhile gives
    the last save whole, and once the new save is sealed the files it no longer has go."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": [".metadata"]}], sync={"delete": True})
    directory = workspace.checkpoints / "latest_ckpt"
    last = {name: save_checkpoint(directory / name, 2_000) for name in SHARDS}
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    save_begun(directory)
    workspace.cli("flush", "-c", "config.yaml")  # the set waits for its marker
    before = keys_in(s3, workspace.bucket)

    result = workspace.cli("prune", "-c", "config.yaml")
    assert prune_lines(result)[-1] == "deleted 0 objects", result.stdout
    assert "mirror_deferred" in result.stderr, result.stderr
    assert keys_in(s3, workspace.bucket) == before
    target = workspace.root / "during"
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    for name, data in last.items():
        assert (target / "latest_ckpt" / name).read_bytes() == data, name

    for name in (SHARDS[0], SHARDS[1], ".metadata"):
        save_checkpoint(directory / name, 2_000)
    new = {path.name: path.read_bytes() for path in directory.iterdir()}
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert {key for key in keys_in(s3, workspace.bucket)
            if key.startswith("run1/latest_ckpt/")} == {f"run1/latest_ckpt/{name}" for name in new}
    target = workspace.root / "after"
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert {path.name: path.read_bytes() for path in (target / "latest_ckpt").iterdir()} == new


def test_deletions_wait_while_a_whole_new_save_is_not_sealed_yet(workspace: Workspace,
                                                                 s3: Any) -> None:
    """The new save is all on disk, marker included, but not sealed yet (its uploads under
    way, a prune run from cron meanwhile): the shard it no longer has stays, and so does the
    last manifest, until the new one is written."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": [".metadata"]}], sync={"delete": True})
    directory = workspace.checkpoints / "latest_ckpt"
    last = {name: save_checkpoint(directory / name, 2_000) for name in SHARDS}
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    (directory / SHARDS[2]).unlink()
    for name in (SHARDS[0], SHARDS[1], ".metadata"):
        save_checkpoint(directory / name, 2_000)
    before = keys_in(s3, workspace.bucket)
    assert prune_lines(workspace.cli("prune", "-c", "config.yaml"))[-1] == "deleted 0 objects"
    assert keys_in(s3, workspace.bucket) == before
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}latest_ckpt.json"))
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted(
        f"latest_ckpt/{name}" for name in last)


def test_a_set_directory_emptied_for_good_mirrors_its_deletions(workspace: Workspace,
                                                                s3: Any) -> None:
    """Nothing of the set was written again: its files were deleted, not replaced (a
    directory emptied by hand, a Trainer checkpoint given up), so mirroring goes on."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": [".metadata"]}], sync={"delete": True})
    directory = workspace.checkpoints / "checkpoint-100"
    for name in ("config.json", "model.safetensors", "trainer_state.json", ".metadata"):
        save_checkpoint(directory / name, 2_000)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    for path in directory.iterdir():
        path.unlink()
    lines = prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert lines[-1] == "deleted 5 objects", lines
    assert not [key for key in keys_in(s3, workspace.bucket) if "checkpoint-100" in key]


def test_a_file_touched_is_no_new_save(workspace: Workspace, s3: Any) -> None:
    """A file of the set touched (its mtime changed, its bytes not: the checksum S3 verified
    is the sealed one) is no save begun: the set is sealed again at once, and a deletion in it
    mirrors."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": [".metadata"]}], sync={"delete": True})
    directory = workspace.checkpoints / "latest_ckpt"
    for name in SHARDS:
        save_checkpoint(directory / name, 2_000)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    later = time.time() + 5
    os.utime(directory / SHARDS[0], (later, later))
    (directory / SHARDS[1]).unlink()
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    prune_lines(workspace.cli("prune", "-c", "config.yaml"))
    assert f"run1/latest_ckpt/{SHARDS[1]}" not in keys_in(s3, workspace.bucket)
    manifest = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}latest_ckpt.json"))
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted(
        f"latest_ckpt/{name}" for name in SHARDS if name != SHARDS[1])
