"""What `spotwatch restore` brings back from the layouts trainers write: numbered set
directories with files beside them (DeepSpeed's `latest`, Hugging Face's `runs/` logs), and
checkpoints that are files only (Lightning)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.sync.restore import Candidate, checkpoints_first
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .conftest import Workspace
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary

BASE = 1_700_000_000


def write(workspace: Workspace, relative: str, data: bytes, age: int) -> None:
    path = workspace.checkpoints / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (BASE - age, BASE - age))


def files_under(target: Path) -> set[str]:
    return {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}


def test_a_deepspeed_layout_restores_the_newest_step_with_latest_beside_it(
        workspace: Workspace, s3: Any) -> None:
    write(workspace, "config.json", b"{}", 900)
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 300)
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200", 100)  # rewritten at every save
    write(workspace, "runs/events.out.tfevents", b"logs", 50)  # TensorBoard, newest of all
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 5

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step200" in result.stdout
    assert "with latest, config.json beside it" in result.stdout
    assert files_under(target) == {"global_step200/mp_rank_00_model_states.pt", "latest",
                                   "config.json"}
    assert (target / "latest").read_bytes() == b"global_step200"

    # The newest step corrupt in S3: the one before it, still with the files beside it.
    s3.put_object(Bucket=workspace.bucket, Key="run1/global_step200/mp_rank_00_model_states.pt",
                  Body=b"two hundreX")
    target = workspace.root / "fallback"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step100" in result.stdout and "passed over: global_step200" in \
        result.stdout
    assert files_under(target) == {"global_step100/mp_rank_00_model_states.pt", "latest",
                                   "config.json"}

    # Named, a set comes alone.
    target = workspace.root / "named"
    assert restore(workspace, "--set", "runs", "--to", str(target)).returncode == 0
    assert files_under(target) == {"runs/events.out.tfevents"}


def test_checkpoints_that_are_files_restore_the_newest_file(workspace: Workspace) -> None:
    write(workspace, "epoch=0-step=10.ckpt", b"ten", 300)
    write(workspace, "epoch=1-step=20.ckpt", b"twenty", 200)
    write(workspace, "last.ckpt", b"twenty", 100)  # Lightning's copy of the newest
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {"last.ckpt"} and "beside" not in result.stdout


def candidate(name: str, directory: bool) -> Candidate:
    path = f"{name}/f" if directory else name
    return Candidate.of(Manifest(name, "p/", (ManifestEntry(f"p/{path}", path, 1, 0, "c"),), 0.0))


@given(st.lists(st.tuples(st.sampled_from(["step_1", "step_22", "latest", "runs", "a.ckpt",
                                           "e=3.ckpt", "config.json", "b7"]), st.booleans()),
                unique_by=lambda t: t[0]))
def test_restore_tries_numbered_set_directories_first(sets: list[tuple[str, bool]]) -> None:
    candidates = [candidate(name, directory) for name, directory in sets]
    ordered, companions = checkpoints_first(candidates)
    assert sorted(ordered, key=id) == sorted(candidates, key=id)  # every set, once
    steps = [c for c, (name, directory) in zip(candidates, sets, strict=True)
             if directory and any(ch.isdigit() for ch in name)]
    assert ordered[:len(steps)] == steps  # newest first among them, before any other
    if not steps:
        assert ordered == candidates and companions == []
    else:
        assert companions == [c for c, (name, directory) in zip(candidates, sets, strict=True)
                              if not directory and not any(ch.isdigit() for ch in name)]
