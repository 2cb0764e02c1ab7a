"""A disk that outlived its state directory (a kept or reattached volume, a restore killed
half way, an earlier boot's files) is judged against the sets sealed in S3 before anything of
it is sent (sync.sets.sealed): a part of a set on disk never shrinks the set's manifest, and a
stale local copy never replaces the object its set was sealed with."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.model import FileVersion
from spotwatch.sync.sets.manifest import ManifestEntry

from .conftest import Workspace, object_bytes

MANIFEST = "run1/.spotwatch/manifests/step_4.json"
FILES = ("model.pt", "optim.pt", "rng_state.pth")
JOB = "job-7"
PART = f"run1/.spotwatch/jobs/{JOB}/parts/step_4/node-0.json"


def _seal(workspace: Workspace) -> dict[str, bytes]:
    """step_4 of three files, flushed and sealed with the workspace's state directory."""
    written = {}
    for name in FILES:
        path = workspace.checkpoints / "step_4" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        written[name] = os.urandom(3000)
        path.write_bytes(written[name])
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    return written


def _with_fresh_state(workspace: Workspace, **sections: Any) -> None:
    workspace.write_config(state={"dir": str(workspace.root / "state-of-the-next-boot")},
                           **sections)


def _model_rewritten_then_flushed(workspace: Workspace, data: bytes,
                                  seconds_after_seal: int) -> subprocess.CompletedProcess[str]:
    """step_4/model.pt rewritten, dated this long after the sealed one (negative: before),
    then flushed by a daemon with a state directory of its own."""
    model = workspace.checkpoints / "step_4" / "model.pt"
    dated = model.stat().st_mtime_ns + seconds_after_seal * 10**9
    model.write_bytes(data)
    os.utime(model, ns=(dated, dated))
    _with_fresh_state(workspace)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    return flushed


def _events(stderr: str, name: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in stderr.splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == name]


def _restored(workspace: Workspace) -> dict[str, bytes]:
    target = workspace.root / "restored"
    done = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert done.returncode == 0, done.stderr
    return {path.name: path.read_bytes() for path in (target / "step_4").iterdir()}


@pytest.mark.parametrize("job", [False, True], ids=["single-node", "job-part"])
def test_part_of_a_sealed_set_on_disk_leaves_its_manifest_whole(
        workspace: Workspace, s3: Any, job: bool) -> None:
    """A restore killed half way left model.pt of step_4 in place; the next boot's daemon,
    with a state directory of its own, used to seal step_4 again listing model.pt alone, and
    restore then handed back a third of the checkpoint."""
    sections = {"job": {"id": JOB, "nodes": 1, "rank": 0}} if job else {}
    workspace.write_config(**sections)
    written = _seal(workspace)
    sealed_key = PART if job else MANIFEST
    sealed = object_bytes(s3, workspace.bucket, sealed_key)
    for name in FILES[1:]:
        (workspace.checkpoints / "step_4" / name).unlink()
    _with_fresh_state(workspace, **sections)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    assert object_bytes(s3, workspace.bucket, sealed_key) == sealed
    assert not _events(flushed.stderr, "upload_done")  # nothing sent again
    assert [event["key"] for event in _events(flushed.stderr, "upload_skipped")] == [
        "run1/step_4/model.pt"]
    assert _restored(workspace) == written


def test_a_stale_local_copy_never_replaces_the_sealed_object(
        workspace: Workspace, s3: Any) -> None:
    """model.pt on disk holds other bytes, dated an hour before step_4 was sealed (a volume
    that missed the last save): S3 keeps the version the set was sealed with."""
    written = _seal(workspace)
    sealed = object_bytes(s3, workspace.bucket, MANIFEST)
    flushed = _model_rewritten_then_flushed(workspace, os.urandom(5000), -3600)
    assert [event["key"] for event in _events(flushed.stderr, "stale_local_file")] == [
        "run1/step_4/model.pt"]
    assert object_bytes(s3, workspace.bucket, "run1/step_4/model.pt") == written["model.pt"]
    assert object_bytes(s3, workspace.bucket, MANIFEST) == sealed
    assert _restored(workspace) == written
    # Not judged as a new write on the next start either.
    again = workspace.cli("flush", "-c", "config.yaml")
    assert again.returncode == 0, again.stderr
    assert object_bytes(s3, workspace.bucket, "run1/step_4/model.pt") == written["model.pt"]


def test_a_newer_local_write_is_uploaded_and_sealed(workspace: Workspace, s3: Any) -> None:
    """model.pt saved again after step_4 was sealed (a rerun of the step): the new bytes go
    up and the set is sealed with them."""
    written = _seal(workspace)
    written["model.pt"] = os.urandom(4000)
    flushed = _model_rewritten_then_flushed(workspace, written["model.pt"], 10)
    assert [event["key"] for event in _events(flushed.stderr, "upload_done")] == [
        "run1/step_4/model.pt"]
    assert _restored(workspace) == written


VERSIONS = st.builds(FileVersion, st.integers(0, 10), st.integers(0, 10**6))


@given(listed=st.none() | VERSIONS, local=VERSIONS, started_ns=st.integers(0, 2 * 10**6))
def test_the_verdict_on_a_file_unknown_to_the_ledger(
        listed: FileVersion | None, local: FileVersion, started_ns: int) -> None:
    from spotwatch.sync.sets.sealed import Verdict, judge  # here: the others run on older code

    entry = None if listed is None else ManifestEntry("k", "p", listed.size, listed.mtime_ns,
                                                      "AAAAAA==")
    verdict = judge(entry, local, started_ns)
    if listed is None:
        assert verdict is Verdict.UPLOAD  # not in the set: the set grows
    elif local == listed:
        assert verdict is Verdict.ADOPT  # in S3 as it is
    elif local.mtime_ns >= started_ns or local.mtime_ns > listed.mtime_ns:
        assert verdict is Verdict.UPLOAD  # written since this process started, or newer
    else:
        assert verdict is Verdict.STALE


def test_a_kept_state_directory_is_trusted_as_before(workspace: Workspace) -> None:
    """With its own state directory the daemon knows what it uploaded: a file deleted
    locally with sync.delete off stays in S3, and nothing is judged or sent again."""
    _seal(workspace)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    assert not _events(flushed.stderr, "upload_skipped")
    assert not _events(flushed.stderr, "upload_done")
