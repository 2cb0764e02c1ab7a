"""A file of a sealed set rewritten, and the daemon killed (-9) after the new version is in S3
but before the set's new manifest: restore brings back the version sealed, from its held copy
(sync.sets.held), and the set's next seal deletes the held copy. Through `spotwatch run`,
moto_server and a fault proxy that refuses manifest writes, so the kill lands in that window
every time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, Workspace, keys_in, object_bytes, wait_for
from tests.faultproxy import FaultProxy, Rule
from tests.test_faults import proxy  # noqa: F401  (the fixture)

HELD = "run1/.spotwatch/held/"


def refuse_manifest_writes(proxy: FaultProxy) -> Rule:  # noqa: F811
    """Every manifest PUT is refused (403, retried by the daemon) from now on."""
    return proxy.add("403", lambda r: r.method == "PUT" and "/.spotwatch/manifests/" in r.path,
                     times=100_000)


def kill(daemon: Daemon) -> None:
    daemon.process.kill()
    daemon.process.wait()


def restore(workspace: Workspace, target: Path, *args: str) -> Any:
    return workspace.cli("restore", "-c", "config.yaml", "--to", str(target), *args)


def test_a_flat_file_rewritten_then_killed_before_its_seal_restores_the_sealed_version(
        workspace: Workspace, s3: Any, proxy: FaultProxy,  # noqa: F811
        transfer_client: str, tmp_path: Path) -> None:
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    model = workspace.checkpoints / "model.pt"
    v1 = os.urandom(200_000)
    model.write_bytes(v1)
    daemon.wait_for_event("set_complete")
    refused = refuse_manifest_writes(proxy)
    v2 = os.urandom(300_000)
    with model.open("r+b") as handle:  # in place, as torch.save(path) writes
        handle.write(v2)
    daemon.wait_for_event("upload_done", 2)
    wait_for(lambda: refused.applied)  # v2 is in S3, its manifest not
    kill(daemon)
    assert object_bytes(s3, workspace.bucket, "run1/model.pt") == v2

    done = restore(workspace, tmp_path / "back")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back" / "model.pt").read_bytes() == v1
    assert keys_in(s3, workspace.bucket) >= {HELD + "model.pt"}

    # The next start seals v2 (the set was left unsettled): the held copy goes.
    again = workspace.start_daemon()
    again.wait_for_event("set_complete")
    wait_for(lambda: not [k for k in keys_in(s3, workspace.bucket) if k.startswith(HELD)])
    done = restore(workspace, tmp_path / "after_seal")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "after_seal" / "model.pt").read_bytes() == v2


def test_an_eval_result_written_into_the_only_kept_step_leaves_that_step_restorable(
        workspace: Workspace, s3: Any, proxy: FaultProxy,  # noqa: F811
        tmp_path: Path) -> None:
    """keep_sets: 1, retention dropped step_10; meta.json of step_20 rewritten in place."""
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    saved: dict[str, bytes] = {}
    for step in (10, 20):
        staged = workspace.checkpoints / f"step_{step}.tmp"
        staged.mkdir()
        saved["model.pt"] = os.urandom(100_000)
        saved["meta.json"] = json.dumps({"step": step}).encode()
        for name, data in saved.items():
            (staged / name).write_bytes(data)
        staged.rename(workspace.checkpoints / f"step_{step}")
        daemon.wait_for_event("set_complete", step // 10)
    wait_for(lambda: not [k for k in keys_in(s3, workspace.bucket) if "step_10" in k])
    uploads = len(daemon.named("upload_done"))
    refused = refuse_manifest_writes(proxy)
    (workspace.checkpoints / "step_20" / "meta.json").write_text(
        json.dumps({"step": 20, "eval_loss": 2.31}))
    daemon.wait_for_event("upload_done", uploads + 1)
    wait_for(lambda: refused.applied)
    kill(daemon)

    done = restore(workspace, tmp_path / "back")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["step_20"]
    for name, data in saved.items():
        assert (tmp_path / "back" / "step_20" / name).read_bytes() == data


def test_a_rewrite_sealed_in_good_order_leaves_no_held_copy(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    daemon = workspace.start_daemon()
    latest = workspace.checkpoints / "latest"
    latest.write_text("global_step10")
    daemon.wait_for_event("set_complete")
    latest.write_text("global_step20")
    daemon.wait_for_event("set_complete", 2)
    assert daemon.named("held_copy_made")
    wait_for(lambda: not [k for k in keys_in(s3, workspace.bucket) if k.startswith(HELD)])
    done = restore(workspace, tmp_path / "back", "--set", "latest")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back" / "latest").read_text() == "global_step20"


def test_a_held_copy_of_the_listed_size_but_other_bytes_is_refused(
        workspace: Workspace, s3: Any, transfer_client: str, tmp_path: Path) -> None:
    """Only a held copy's size is judged before its download: its bytes are verified against
    the manifest's checksum on either client (the CRT's single GET checks the manifest's,
    not the object's own)."""
    daemon = workspace.start_daemon()
    v1 = os.urandom(50_000)
    (workspace.checkpoints / "model.pt").write_bytes(v1)
    daemon.wait_for_event("set_complete")
    daemon.stop()
    s3.put_object(Bucket=workspace.bucket, Key="run1/model.pt", Body=os.urandom(60_000))
    s3.put_object(Bucket=workspace.bucket, Key=HELD + "model.pt", Body=os.urandom(50_000),
                  ChecksumAlgorithm="CRC32")
    done = restore(workspace, tmp_path / "back")
    assert done.returncode == 1
    assert "set_corrupt" in done.stderr and not (tmp_path / "back" / "model.pt").exists()
    s3.put_object(Bucket=workspace.bucket, Key=HELD + "model.pt", Body=v1)
    done = restore(workspace, tmp_path / "back")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back" / "model.pt").read_bytes() == v1
