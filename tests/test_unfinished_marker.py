"""NeMo marks a checkpoint it is saving with `<name>-unfinished` beside it and deletes, at its
start, every checkpoint that has one: a set is not sealed while its marker is there, the marker
is never uploaded, and one in S3 (uploaded by an older version, or with other filters) is never
restored (daemon and CLI against moto)."""

from __future__ import annotations

from typing import Any

import pytest

from spotwatch.keys import unfinished_marker

from .conftest import Workspace, keys_in, wait_for
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary
from .test_restore_layouts import files_under, write

STEP_100 = "megatron_gpt--val_loss=2.10-step=100-consumed_samples=800.0"
STEP_200 = "megatron_gpt--val_loss=1.90-step=200-consumed_samples=1600.0"
SHARDS = ("weights/__0_0.distcp", "weights/__1_0.distcp", "weights/.metadata")


def save(workspace: Workspace, name: str, age: int) -> None:
    for shard in SHARDS:
        write(workspace, f"{name}/{shard}", f"{name} {shard}".encode(), age)


@pytest.mark.parametrize(("name", "marker"), [
    (STEP_100, f"{STEP_100}-unfinished"),
    ("model--step=5.ckpt", "model--step=5-unfinished"),
    ("model--step=5-EMA.ckpt", "model--step=5-unfinished"),
])
def test_the_marker_is_named_as_nemo_names_it(name: str, marker: str) -> None:
    assert unfinished_marker(name) == marker


def test_a_checkpoint_is_sealed_only_once_its_marker_is_gone(
        workspace: Workspace, s3: Any) -> None:
    save(workspace, STEP_100, 300)
    daemon = workspace.start_daemon()
    daemon.wait_for_event("set_complete")
    marker = workspace.checkpoints / f"{STEP_200}-unfinished"
    marker.touch()  # as NeMo does before it saves
    save(workspace, STEP_200, 0)
    held = daemon.wait_for_event("set_awaiting_marker")
    assert held["set"] == f"run1/{STEP_200}" and held["waiting_for"] == [marker.name]
    assert wait_for(lambda: len(daemon.named("upload_done")) == 2 * len(SHARDS))
    assert [event["set"] for event in daemon.named("set_complete")] == [f"run1/{STEP_100}"]
    target = workspace.root / "while-saving"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {f"{STEP_100}/{shard}" for shard in SHARDS}

    marker.unlink()  # the save is finished
    sealed = daemon.wait_for_event("set_complete", count=2)
    assert sealed["set"] == f"run1/{STEP_200}"
    assert not any(key.endswith("-unfinished") for key in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0
    target = workspace.root / "finished"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {f"{STEP_200}/{shard}" for shard in SHARDS}


def test_a_marker_in_s3_is_never_restored(workspace: Workspace, s3: Any) -> None:
    """Uploaded with filters that let it through, the marker is its own set in S3: with
    checkpoints that are files, the newest. It is no checkpoint (and beside the one it marks,
    NeMo would delete that one): the newest checkpoint is restored instead."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "exclude": []}])
    write(workspace, "megatron_gpt--step=100.ckpt", b"step 100", 300)
    write(workspace, "megatron_gpt--step=200-unfinished", b"", 100)  # its save cut short
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    assert "run1/megatron_gpt--step=200-unfinished" in keys_in(s3, workspace.bucket)
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored megatron_gpt--step=100.ckpt" in result.stdout
    assert files_under(target) == {"megatron_gpt--step=100.ckpt"}


def test_an_ema_checkpoint_and_its_model_share_one_marker_and_both_are_sealed(
        workspace: Workspace, s3: Any) -> None:
    """NeMo's EMA callback saves `x.ckpt` and `x-EMA.ckpt` under one marker (`x-unfinished`,
    -EMA stripped): both sets are held by it, and both are sealed once it is gone."""
    model, ema = "megatron_gpt--step=200.ckpt", "megatron_gpt--step=200-EMA.ckpt"
    daemon = workspace.start_daemon()
    marker = workspace.checkpoints / unfinished_marker(model)
    marker.touch()
    write(workspace, model, b"model weights", 0)
    write(workspace, ema, b"ema weights", 0)
    assert wait_for(lambda: {event["set"] for event in daemon.named("set_awaiting_marker")}
                    == {f"run1/{model}", f"run1/{ema}"})
    marker.unlink()  # the save is finished
    assert wait_for(lambda: {event["set"] for event in daemon.named("set_complete")}
                    == {f"run1/{model}", f"run1/{ema}"})
    assert daemon.stop() == 0
