"""Checkpoint sets: a manifest is written only once the whole set is durable, and `restore`
downloads only complete sets, newest first, idempotently."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import pytest

from spotwatch.sync.sets.manifest import Manifest

from .conftest import Daemon, Workspace, keys_in, object_bytes, wait_for
from .test_daemon_e2e import flush_summary, save_checkpoint

MANIFESTS = "run1/.spotwatch/manifests/"


def test_manifest_waits_for_the_whole_set(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"quiet_seconds": 30})  # c.pt stays open: no quiet fallback
    step = workspace.checkpoints / "step_1"
    step.mkdir()  # watched from the start: no race with the directory's creation
    daemon = workspace.start_daemon()
    save_checkpoint(step / "a.pt", 100_000)
    save_checkpoint(step / "b.pt", 200_000)
    with (step / "c.pt").open("wb") as slow:
        slow.write(os.urandom(50_000))
        slow.flush()
        wait_for(lambda: {"run1/step_1/a.pt", "run1/step_1/b.pt"} <= keys_in(s3, workspace.bucket))
        # A file written in place after c.pt's last write, closed, settled and sealed: c.pt
        # would have settled, and its set been sealed, by now if an open file could settle.
        (workspace.checkpoints / "later.pt").write_bytes(b"later")
        wait_for(lambda: sealed(daemon, "run1/later.pt"))
        assert f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket)
        slow.write(os.urandom(50_000))
    wait_for(lambda: f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket))
    manifest = Manifest.from_json(object_bytes(s3, workspace.bucket,
                                               f"{MANIFESTS}step_1.json"), "run1/")
    assert {(f.path, f.size) for f in manifest.files} == {
        ("step_1/a.pt", 100_000), ("step_1/b.pt", 200_000), ("step_1/c.pt", 100_000)}
    assert all(f.checksum for f in manifest.files)
    assert wait_for(lambda: sealed(daemon, "run1/step_1"))["files"] == 3
    assert daemon.stop() == 0


def sealed(daemon: Daemon, set_key: str) -> dict[str, Any] | None:
    """The set_complete event of this set, once logged."""
    return next((e for e in daemon.named("set_complete") if e["set"] == set_key), None)


def make_sets(workspace: Workspace) -> dict[str, dict[str, bytes]]:
    sets: dict[str, dict[str, bytes]] = {}
    for age, name in ((300, "step_1"), (200, "step_2")):
        files = {}
        for file_name, size in (("model.pt", 300_000), ("optim.pt", 100_000)):
            path = workspace.checkpoints / name / file_name
            files[file_name] = save_checkpoint(path, size)
            os.utime(path, (time.time() - age, time.time() - age))
        sets[name] = files
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    return sets


def restore(workspace: Workspace, *args: str) -> Any:
    return workspace.cli("restore", "-c", "config.yaml", *args)


def test_restore_newest_complete_set(workspace: Workspace, s3: Any) -> None:
    sets = make_sets(workspace)
    # An object without a manifest (an interrupted upload) must never be chosen.
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_9/model.pt", Body=b"partial")
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert "2 files downloaded" in result.stdout
    for name, data in sets["step_2"].items():
        assert (target / "step_2" / name).read_bytes() == data
    assert not (target / "step_1").exists()
    original = workspace.checkpoints / "step_2" / "model.pt"
    assert (target / "step_2" / "model.pt").stat().st_mtime_ns == original.stat().st_mtime_ns

    again = restore(workspace, "--to", str(target))  # idempotent
    assert again.returncode == 0, again.stderr
    assert "0 files downloaded" in again.stdout and "2 already present" in again.stdout

    s3.delete_object(Bucket=workspace.bucket, Key="run1/step_2/optim.pt")  # now incomplete
    fallback = workspace.root / "fallback"
    result = restore(workspace, "--to", str(fallback))
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout
    assert (fallback / "step_1" / "optim.pt").read_bytes() == sets["step_1"]["optim.pt"]
    assert not any(p.name.endswith(".spotwatch-restore") for p in fallback.rglob("*"))


def test_restore_named_set_and_no_set(workspace: Workspace) -> None:
    result = restore(workspace)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("spotwatch: error: no complete checkpoint set")
    make_sets(workspace)
    target = workspace.root / "named"
    result = restore(workspace, "--to", str(target), "--set", "step_1")
    assert result.returncode == 0, result.stderr
    assert (target / "step_1" / "model.pt").exists()


def test_restored_files_are_not_uploaded_again(workspace: Workspace) -> None:
    sets = make_sets(workspace)
    # A new instance: empty checkpoint directory, empty state.
    shutil.rmtree(workspace.checkpoints)
    workspace.checkpoints.mkdir()
    shutil.rmtree(workspace.root / "state")
    result = restore(workspace)
    assert result.returncode == 0, result.stderr
    assert (workspace.checkpoints / "step_2" / "model.pt").read_bytes() == sets["step_2"][
        "model.pt"]
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flush_summary(flushed)["files"] == 0
    assert "set_complete" not in flushed.stderr  # its manifest is the one restored from


def test_a_restore_into_the_watched_directory_by_another_path_is_not_uploaded_again(
        workspace: Workspace) -> None:
    """The watched path is a symlink (/opt/ml/checkpoints -> an instance store) and the
    restore names the directory it leads to, or spells the path with '..': the files land in
    the watched directory all the same, and the daemon must not upload them again."""
    make_sets(workspace)
    real = workspace.root / "nvme"
    real.mkdir()
    link = workspace.root / "linked"
    link.symlink_to(real)
    workspace.write_config(watch=[{"path": str(link), "prefix": "run1/"}])
    for destination in (real, link.parent / ".." / link.parent.name / "linked"):
        shutil.rmtree(workspace.root / "state")
        result = restore(workspace, "--to", str(destination))
        assert result.returncode == 0, result.stderr
        assert (real / "step_2" / "model.pt").exists()
        flushed = workspace.cli("flush", "-c", "config.yaml")
        assert flush_summary(flushed)["files"] == 0
        shutil.rmtree(real / "step_2")


def test_manifest_json_shape(workspace: Workspace, s3: Any) -> None:
    make_sets(workspace)
    body = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_2.json"))
    assert body["format"] == 1
    assert body["set"] == "step_2"
    assert body["bytes"] == 400_000
    assert {f["key"] for f in body["files"]} == {"run1/step_2/model.pt", "run1/step_2/optim.pt"}


def test_restore_shows_progress_on_a_terminal(workspace: Workspace) -> None:
    make_sets(workspace)
    code, text = workspace.cli_on_terminal("restore", "-c", "config.yaml", "--to",
                                           str(workspace.root / "tty"))
    assert code == 0, text
    assert "\rrestoring step_2: [########################]" in text
    assert "(100.0%)" in text


def test_restore_set_says_why_a_named_set_cannot_be_restored(workspace: Workspace,
                                                             s3: Any) -> None:
    """--set NAME of a set that is not there, of one never sealed (files, no manifest) and of
    one whose objects no longer match its manifest: three different lines, exit 1 each."""
    make_sets(workspace)
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_9/model.pt", Body=b"partial")
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_2/optim.pt", Body=b"replaced")
    target = str(workspace.root / "restored")
    lines = {}
    for name in ("step_7", "step_9", "step_2"):
        result = restore(workspace, "--set", name, "--to", target)
        assert result.returncode == 1, result.stderr
        lines[name] = result.stderr.strip().splitlines()[-1]
    assert lines["step_7"] == ("spotwatch: error: no set 'step_7' under "
                               f"s3://{workspace.bucket}/run1/")
    assert "'step_9'" in lines["step_9"] and "never sealed complete" in lines["step_9"]
    assert "'step_2'" in lines["step_2"] and "is not complete or does not match" in lines[
        "step_2"]


def test_restore_set_of_a_set_whose_manifest_is_unreadable_says_so(workspace: Workspace,
                                                                  s3: Any) -> None:
    """Its manifest is there but garbage: not "never sealed", which would send the user
    looking for a manifest that exists."""
    make_sets(workspace)
    s3.put_object(Bucket=workspace.bucket, Key="run1/.spotwatch/manifests/step_2.json",
                  Body=b"\x00not json")
    result = restore(workspace, "--set", "step_2", "--to", str(workspace.root / "restored"))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "'step_2'" in last and "manifest that cannot be read" in last, last
    assert "never sealed" not in last


@pytest.mark.parametrize("manifest", [b"\x00not json", b'{"set": "step_1"}', "step_1's"])
def test_restore_past_a_set_whose_manifest_is_unreadable_names_it(
        workspace: Workspace, s3: Any, manifest: bytes | str) -> None:
    """The newest set's manifest is garbage, incomplete JSON, or another set's: restore falls
    back to step_1, and its summary says step_2 was not tried and why. With step_1's made
    unreadable too, the error names both."""
    sets = make_sets(workspace)
    keys = {name: f"run1/.spotwatch/manifests/{name}.json" for name in ("step_1", "step_2")}
    body = (object_bytes(s3, workspace.bucket, keys["step_1"]) if isinstance(manifest, str)
            else manifest)
    s3.put_object(Bucket=workspace.bucket, Key=keys["step_2"], Body=body)
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("restored step_1 into"), result.stdout
    assert "not tried, their manifest cannot be read: step_2" in result.stdout, result.stdout
    assert (target / "step_1" / "model.pt").read_bytes() == sets["step_1"]["model.pt"]
    s3.put_object(Bucket=workspace.bucket, Key=keys["step_1"], Body=b"[]")
    result = restore(workspace, "--to", str(workspace.root / "none"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "the manifest of step_2, step_1 cannot be read" in last, last


def test_restore_set_with_a_name_that_is_not_utf8_is_a_usage_error(workspace: Workspace,
                                                                  s3: Any) -> None:
    """Such names are never uploaded, so no set has one: one line, exit 2, no traceback
    (botocore refused to list it)."""
    make_sets(workspace)
    name = os.fsdecode(b"caf\xe9")
    result = restore(workspace, "--set", name, "--to", str(workspace.root / "restored"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "spotwatch: error: --set caf\\xe9: the name is not valid UTF-8, and such names are "
        "never uploaded, so no set has it"]


def test_files_in_the_set_directory_that_the_set_does_not_list_are_named(
        workspace: Workspace) -> None:
    """A shard of another save (another world size, a crashed boot's) in the directory the
    set is restored into is left as it was, and named: a loader that globs the directory
    would meet it."""
    sets = make_sets(workspace)
    target = workspace.root / "restored"
    (target / "step_2" / "old").mkdir(parents=True)
    (target / "step_2" / "shard_7.pt").write_bytes(b"another save")
    (target / "step_2" / "old" / "x.pt").write_bytes(b"x")
    (target / "notes.txt").write_bytes(b"beside the set, not in it")
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(
        "; 2 files in its directory that it does not list, left as they were: "
        "step_2/old/x.pt, step_2/shard_7.pt")
    assert (target / "step_2" / "shard_7.pt").read_bytes() == b"another save"
    for name, data in sets["step_2"].items():
        assert (target / "step_2" / name).read_bytes() == data


def test_a_staging_set_sealed_before_is_restored_only_when_named(workspace: Workspace,
                                                                 s3: Any) -> None:
    """A manifest of step_3.tmp/ (half a save, sealed by a version that uploaded staging
    names under configured filters) is newer than step_2: restore passes it by for step_2,
    and gives it only to --set."""
    from spotwatch.sync.sets.manifest import ManifestEntry

    from .memory_store import crc32_checksum

    sets = make_sets(workspace)
    data = os.urandom(1_000)
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_3.tmp/model.pt", Body=data)
    manifest = Manifest.build("step_3.tmp", "run1/", [ManifestEntry(
        "run1/step_3.tmp/model.pt", "step_3.tmp/model.pt", len(data), time.time_ns(),
        crc32_checksum(data))])
    s3.put_object(Bucket=workspace.bucket, Key=f"{MANIFESTS}step_3.tmp.json",
                  Body=manifest.to_json().encode())
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert (target / "step_2" / "model.pt").read_bytes() == sets["step_2"]["model.pt"]
    assert not (target / "step_3.tmp").exists()
    named = restore(workspace, "--to", str(workspace.root / "named"), "--set", "step_3.tmp")
    assert named.returncode == 0, named.stderr
    assert (workspace.root / "named" / "step_3.tmp" / "model.pt").read_bytes() == data
