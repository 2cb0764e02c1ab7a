"""What `spotwatch restore` brings back from the layouts trainers write: numbered set
directories with files beside them (DeepSpeed's `latest`, Hugging Face's `runs/` logs), and
checkpoints that are files only (Lightning)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.keys import manifest_key, series_of
from spotwatch.sync.commits import uncommitted
from spotwatch.sync.pointers import named_set, repoint, repointed_text
from spotwatch.sync.restore.candidates import Candidate, checkpoints_first
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .conftest import Workspace, keys_in, object_bytes
from .memory_store import InMemoryObjectStore
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary
from .test_restore_safety import named
from .test_unreadable_dirs import NO_DAC

BASE = 1_700_000_000


def write(workspace: Workspace, relative: str, data: bytes, age: int) -> None:
    path = workspace.checkpoints / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (BASE - age, BASE - age))


def holding_a_step(target: Path, step: str, data: bytes) -> None:
    """A destination that holds a DeepSpeed step already, with `latest` naming it."""
    (target / step).mkdir(parents=True)
    (target / step / "mp_rank_00_model_states.pt").write_bytes(data)
    (target / "latest").write_bytes(step.encode())


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


def test_a_pointer_replaced_beside_the_step_is_named_in_the_summary(
        workspace: Workspace) -> None:
    """The disk holds global_step300, never uploaded, and `latest` naming it: restore brings
    global_step200 and the `latest` of S3 in its place, and says that the local `latest`,
    changed after the set was sealed, was replaced, as it says of a step's own files."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    target = workspace.root / "kept-volume"
    holding_a_step(target, "global_step300", b"three hundred")
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "latest").read_bytes() == b"global_step200"
    assert "with latest beside it" in result.stdout
    assert result.stdout.rstrip().endswith(
        "1 local files that differed replaced, 1 of them changed after the set was sealed: "
        "latest")


# A checkpoint file, larger than any pointer (pointers.POINTER_MAX_BYTES).
TWENTY = b"twenty " * 100


def test_checkpoints_that_are_files_restore_the_newest_file(workspace: Workspace) -> None:
    write(workspace, "epoch=0-step=10.ckpt", b"ten", 300)
    write(workspace, "epoch=1-step=20.ckpt", TWENTY, 200)
    write(workspace, "last.ckpt", TWENTY, 100)  # Lightning's copy of the newest
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {"last.ckpt"} and "beside" not in result.stdout


def candidate(name: str, directory: bool) -> Candidate:
    path = f"{name}/f" if directory else name
    return Candidate.of(Manifest(name, "p/", (ManifestEntry(f"p/{path}", path, 1, 0, "c"),), 0.0))


@given(st.lists(st.tuples(st.sampled_from(["step_1", "step_22", "latest", "runs", "a.ckpt",
                                           "e=3.ckpt", "e=4.ckpt", "config.json", "b7",
                                           "zero_to_fp32.py"]), st.booleans()),
                unique_by=lambda t: t[0]))
def test_restore_tries_numbered_set_directories_first(sets: list[tuple[str, bool]]) -> None:
    """Where the trainer saves numbered set directories, they come first (newest first), then
    the numbered files of a series of two or more; a set without a number, or a file alone in
    its series (zero_to_fp32.py), is never tried for the checkpoint but comes beside it. Where
    it saves none (checkpoints that are files), every set but a pointer is tried, newest
    first."""
    candidates = [candidate(name, directory) for name, directory in sets]
    ordered, companions = checkpoints_first(candidates)
    numbered = [(c, directory) for c, (name, directory) in zip(candidates, sets, strict=True)
                if any(ch.isdigit() for ch in name)]
    steps = [c for c, directory in numbered if directory]
    if not steps:
        # Files only: a pointer (a small `latest` file) is never the checkpoint; unnumbered
        # files make one checkpoint together, each beside the one restored.
        files = [c for c, (name, directory) in zip(candidates, sets, strict=True)
                 if directory or name != "latest"]
        assert ordered == files
        numbered_files = any(any(ch.isdigit() for ch in c.whole.set_name) for c in files)
        assert companions == ([] if not files or numbered_files else candidates)
    else:
        numbered_files = [c for c, directory in numbered if not directory]
        in_a_series = [c for c in numbered_files if sum(
            series_of(other.whole.set_name) == series_of(c.whole.set_name)
            for other in candidates) > 1]
        assert ordered == steps + in_a_series
        assert companions == [c for c, (name, directory) in zip(candidates, sets, strict=True)
                              if not directory and c not in in_a_series]


def test_with_every_step_broken_a_set_without_a_number_is_not_restored_for_one(
        workspace: Workspace, s3: Any) -> None:
    """Every numbered step corrupt or incomplete in S3, a TensorBoard `runs/` complete beside
    them: restore has no checkpoint to give back (exit 1, one line naming why), rather than
    handing back the logs alone with exit 0. --set still restores them."""
    write(workspace, "step_1/model.pt", b"weights one", 400)
    write(workspace, "step_2/model.pt", b"weights two", 300)
    write(workspace, "latest", b"step_2", 200)
    write(workspace, "runs/events.out.tfevents", b"logs", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_1/model.pt", Body=b"weights onX")
    s3.delete_object(Bucket=workspace.bucket, Key="run1/step_2/model.pt")

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 1, result.stdout
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert error.startswith("spotwatch: error: no complete checkpoint set under "), error
    assert "passed over step_2, step_1" in error and "--set runs restores it" in error, error
    assert not target.exists() or files_under(target) == set()

    result = restore(workspace, "--set", "runs", "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {"runs/events.out.tfevents"}


@pytest.mark.parametrize("by_name", [False, True])
def test_a_directory_where_a_companion_goes_is_refused_before_anything_downloads(
        workspace: Workspace, by_name: bool) -> None:
    """A directory stands where DeepSpeed's `latest` goes: refused in one line, as one where a
    file of the set goes is, with nothing placed (not the step restored, then exit 1 without
    saying so)."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    target = workspace.root / "restored"
    (target / "latest").mkdir(parents=True)
    result = restore(workspace, "--to", str(target),
                     *(("--set", "global_step200") if by_name else ()))
    assert result.returncode == 1, result.stdout
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert error == f"spotwatch: error: cannot restore 'latest': {target / 'latest'} is a " \
        "directory", error
    assert sorted(os.listdir(target)) == ["latest"] and not os.listdir(target / "latest")


def restored_with_one_replaced(workspace: Workspace, s3: Any,
                               files: list[tuple[str, bytes, int]], replaced: str
                               ) -> tuple[Any, Path]:
    """The files (path, bytes, age) flushed, then one object replaced in S3 by other bytes of
    its size: restore's result, and where it restored."""
    for relative, data, age in files:
        write(workspace, relative, data, age)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == len(files)
    size = s3.head_object(Bucket=workspace.bucket, Key=f"run1/{replaced}")["ContentLength"]
    s3.put_object(Bucket=workspace.bucket, Key=f"run1/{replaced}", Body=b"X" * size)
    target = workspace.root / "restored"
    return restore(workspace, "--to", str(target)), target


def test_a_corrupt_companion_is_left_out_and_the_summary_says_so(
        workspace: Workspace, s3: Any) -> None:
    result, target = restored_with_one_replaced(
        workspace, s3, [("config.json", b"{}", 300),
                        ("global_step200/mp_rank_00_model_states.pt", b"two hundred", 200),
                        ("latest", b"global_step200", 100)], "latest")
    assert result.returncode == 0, result.stderr
    assert "with config.json beside it; latest not restored beside it (incomplete or corrupt " \
        "in S3)" in result.stdout
    assert files_under(target) == {"global_step200/mp_rank_00_model_states.pt", "config.json"}
    assert [e["set"] for e in named(result.stderr, "companion_skipped")] == ["latest"]


def test_checkpoints_that_are_files_fall_back_to_any_complete_set(
        workspace: Workspace, s3: Any) -> None:
    """Without numbered set directories every set is a checkpoint, as ever: with the newest
    file corrupt, the next older complete one comes back."""
    result, target = restored_with_one_replaced(
        workspace, s3, [("epoch=0-step=10.ckpt", b"ten", 300), ("last.ckpt", TWENTY, 100)],
        "last.ckpt")
    assert result.returncode == 0, result.stderr
    assert "restored epoch=0-step=10.ckpt" in result.stdout and "passed over: last.ckpt" in \
        result.stdout
    assert files_under(target) == {"epoch=0-step=10.ckpt"}


def incomplete_in_s3(s3: Any, workspace: Workspace, set_name: str, key: str) -> None:
    """As an instance that died mid-upload leaves a set: an object missing, no manifest."""
    s3.delete_object(Bucket=workspace.bucket, Key=f"run1/{set_name}/{key}")
    s3.delete_object(Bucket=workspace.bucket, Key=manifest_key("run1/", set_name))


def test_deepspeed_latest_names_the_step_restored_when_the_newest_is_incomplete(
        workspace: Workspace, s3: Any) -> None:
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 300)
    write(workspace, "global_step300/mp_rank_00_model_states.pt", b"three hundred", 200)
    write(workspace, "global_step300/zero_pp_rank_0_optim_states.pt", b"optim", 200)
    write(workspace, "latest", b"global_step300", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    incomplete_in_s3(s3, workspace, "global_step300", "zero_pp_rank_0_optim_states.pt")

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step200" in result.stdout
    assert "latest now names global_step200 (was global_step300)" in result.stdout
    assert files_under(target) == {"global_step200/mp_rank_00_model_states.pt", "latest"}
    # DeepSpeed's load_checkpoint reads the tag from `latest` and loads that directory.
    tag = (target / "latest").read_text().strip()
    assert (target / tag / "mp_rank_00_model_states.pt").read_bytes() == b"two hundred"
    assert [(e["companion"], e["from"], e["to"]) for e in named(result.stderr,
            "companion_repointed")] == [("latest", "global_step300", "global_step200")]


def test_megatron_tracker_names_the_iteration_restored(workspace: Workspace, s3: Any) -> None:
    """Megatron-LM writes str(iteration) into latest_checkpointed_iteration.txt and saves into
    iter_{iteration:07d}/."""
    write(workspace, "iter_0000200/mp_rank_00/model_optim_rng.pt", b"two hundred", 300)
    write(workspace, "iter_0000300/mp_rank_00/model_optim_rng.pt", b"three hundred", 200)
    write(workspace, "latest_checkpointed_iteration.txt", b"300", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    incomplete_in_s3(s3, workspace, "iter_0000300", "mp_rank_00/model_optim_rng.pt")

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored iter_0000200" in result.stdout
    iteration = int((target / "latest_checkpointed_iteration.txt").read_text().strip())
    assert (target / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt").exists()


def test_a_named_step_comes_with_its_pointer_naming_it(workspace: Workspace) -> None:
    write(workspace, "config.json", b"{}", 900)
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 300)
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200\n", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    target = workspace.root / "rolled-back"
    result = restore(workspace, "--set", "global_step100", "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {"global_step100/mp_rank_00_model_states.pt", "latest",
                                   "config.json"}
    assert (target / "latest").read_bytes() == b"global_step100\n"  # its newline kept


def test_a_repointed_pointer_in_the_watched_directory_is_uploaded_as_it_now_is(
        workspace: Workspace, s3: Any) -> None:
    """The ledger holds what is in S3, the old pointer: the daemon uploads the new one, so S3
    agrees with the directory and a later restore finds everything in place."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 300)
    write(workspace, "global_step300/mp_rank_00_model_states.pt", b"three hundred", 200)
    write(workspace, "latest", b"global_step300", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    incomplete_in_s3(s3, workspace, "global_step300", "mp_rank_00_model_states.pt")
    shutil.rmtree(workspace.checkpoints)  # a new instance
    workspace.checkpoints.mkdir()
    shutil.rmtree(workspace.root / "state")

    assert restore(workspace).returncode == 0
    assert (workspace.checkpoints / "latest").read_bytes() == b"global_step200"
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    assert object_bytes(s3, workspace.bucket, "run1/latest") == b"global_step200"
    again = restore(workspace)
    assert again.returncode == 0, again.stderr
    assert "0 files downloaded" in again.stdout and "now names" not in again.stdout
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 0


@pytest.mark.parametrize(("companion", "text", "restored", "known", "expected"), [
    ("latest", "global_step300", "global_step200", (), "global_step200"),
    ("latest", "global_step100\n", "global_step200", (), "global_step200\n"),
    ("latest", "global_step200", "global_step200", (), None),  # names it already
    ("latest", "runs", "global_step200", (), None),  # another series
    ("latest", "global_step300 global_step200", "global_step200", (), None),
    ("config.json", '{"step": 300}', "global_step200", (), None),
    ("latest_checkpointed_iteration.txt", "300", "iter_0000200", (), "200"),
    ("latest_checkpointed_iteration.txt", "release", "iter_0000200", (), None),
    ("latest_checkpointed_iteration.txt", "200\n", "iter_0000200", (), None),
    ("latest_checkpointed_iteration.txt", "300", "iter_2_0000200", (), None),  # which number?
    ("seed.txt", "1234", "step_200", (), None),  # a number, but no set of the series
    ("last_step", "300", "step_200", ("step_300", "step_200"), "200"),
    ("last_step", "0300", "step_0200", ("step_0300",), "0200"),
    # Named as no pointer: an epoch count, the best step, a step counter.
    ("epoch.txt", "3", "step_5", ("step_3", "step_5"), None),
    ("best", "global_step100", "global_step300", (), None),
    ("global_step.txt", "300", "global_step200", ("global_step300",), None),
    ("latest_universal", "global_step300", "global_step200", (), "global_step200"),
])
def test_what_counts_as_a_pointer(companion: str, text: str, restored: str,
                                  known: tuple[str, ...], expected: str | None) -> None:
    change = repointed_text(text, companion, restored, known)
    assert (change and change[0]) == expected


def assert_staging_never_restored(workspace: Workspace, s3: Any, done: str, staging: str,
                                  step: str, items: tuple[str, ...], marker: str,
                                  uploaded: int) -> None:
    """Set `done` and its next save, staged in `staging` (items alike), are saved: only
    `uploaded` files go up, none named with `marker`, and restore brings back `done`. Renamed
    into place (`step`), the staged save is the checkpoint restored."""
    for name in items:
        write(workspace, f"{done}/{name}", f"{done} {name}".encode(), 300)
        write(workspace, f"{staging}/{name}", f"{step} {name}".encode(), 200)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == uploaded
    assert not any(marker in key for key in keys_in(s3, workspace.bucket))
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {f"{done}/{name}" for name in items}

    (workspace.checkpoints / staging).rename(workspace.checkpoints / step)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == len(items)
    result = restore(workspace, "--to", str(workspace.root / "renamed"))
    assert f"restored {step}" in result.stdout, result.stderr


def test_a_hugging_face_staging_directory_is_never_the_checkpoint_restored(
        workspace: Workspace, s3: Any) -> None:
    """Transformers 4.36-4.38 saved into tmp-checkpoint-N/ and renamed it checkpoint-N/ when
    done, on the main rank only: elsewhere the staging directory stayed. get_last_checkpoint
    takes checkpoint-N/ only, so restoring tmp-checkpoint-N/ handed back no checkpoint."""
    write(workspace, "runs/Jan01_host/events.out.tfevents.1.host", b"logs", 50)
    assert_staging_never_restored(
        workspace, s3, "checkpoint-400", "tmp-checkpoint-500", "checkpoint-500",
        ("trainer_state.json", "rng_state.pth", "model.safetensors", "optimizer.pt"),
        "tmp-checkpoint", uploaded=5)


def test_an_orbax_staging_directory_is_never_uploaded_nor_restored(
        workspace: Workspace, s3: Any) -> None:
    """Orbax saves step N into N.orbax-checkpoint-tmp-T/ (its items into
    ITEM.orbax-checkpoint-tmp-T/) and renames it N/ once finished; a save that failed (disk
    full, OOM-killed) leaves the staging directory, which Orbax never loads. Restored as the
    newest set, it would hand back a broken checkpoint."""
    write(workspace, "3000/params.orbax-checkpoint-tmp-1/manifest.ocdbt", b"partial", 100)
    assert_staging_never_restored(
        workspace, s3, "1000", "2000.orbax-checkpoint-tmp-0", "2000",
        ("_CHECKPOINT_METADATA", "params/manifest.ocdbt", "params/d/0a1b"),
        "orbax-checkpoint-tmp", uploaded=3)


@pytest.mark.parametrize(("steps", "pointer", "text"), [
    (("global_step200", "global_step300"), "latest", b"global_step200"),
    (("iter_0000200", "iter_0000300"), "latest_checkpointed_iteration.txt", b"200"),
])
def test_a_step_newer_than_the_trainers_pointer_is_not_restored(
        workspace: Workspace, s3: Any, steps: tuple[str, str], pointer: str,
        text: bytes) -> None:
    """The instance went away while the trainer saved step 300: the files written so far
    were sealed, but the pointer, written once every rank finished, still names step 200.
    The trainer would load step 200 from its own disk; restore brings back that one."""
    older, newer = steps
    write(workspace, f"{older}/mp_rank_00_model_states.pt", b"two hundred", 300)
    write(workspace, f"{older}/zero_pp_rank_0_optim_states.pt", b"optimizer 200", 300)
    write(workspace, pointer, text, 250)
    write(workspace, f"{newer}/mp_rank_00_model_states.pt", b"three hundred", 200)  # half
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert f"restored {older}" in result.stdout
    assert files_under(target) == {f"{older}/mp_rank_00_model_states.pt",
                                   f"{older}/zero_pp_rank_0_optim_states.pt", pointer}
    assert (target / pointer).read_bytes() == text
    [skipped] = named(result.stderr, "set_not_committed")
    assert (skipped["set"], skipped["pointer"], skipped["names"]) == (newer, pointer, older)

    # Once the save finished the pointer names step 300: that one is restored.
    write(workspace, f"{newer}/zero_pp_rank_0_optim_states.pt", b"optimizer 300", 150)
    write(workspace, pointer, text.replace(b"2", b"3"), 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    result = restore(workspace, "--to", str(workspace.root / "finished"))
    assert f"restored {newer}" in result.stdout, result.stderr
    assert not named(result.stderr, "set_not_committed")


@pytest.mark.parametrize(("steps", "pointer", "text"), [
    (("global_step200", "global_step300", "global_step400"), "latest", "global_step300"),
    (("iter_0000200", "iter_0000300", "iter_0000400"), "latest_checkpointed_iteration.txt",
     "300"),
])
def test_a_step_past_a_committed_step_missing_from_s3_is_not_restored(
        workspace: Workspace, s3: Any, steps: tuple[str, str, str], pointer: str,
        text: str) -> None:
    """The notice came while the trainer saved step 400, and step 300, which the pointer
    names, had not all reached S3 (the newest step is flushed first). Step 400 is half a save:
    restore brings back step 200, the newest step the trainer had committed that is whole in
    S3, and the pointer names it."""
    oldest, committed, half = steps
    write(workspace, f"{oldest}/mp_rank_00_model_states.pt", b"two hundred", 400)
    write(workspace, f"{committed}/mp_rank_00_model_states.pt", b"three hundred", 300)
    write(workspace, f"{committed}/zero_pp_rank_0_optim_states.pt", b"optimizer 300", 300)
    write(workspace, pointer, text.encode(), 250)
    write(workspace, f"{half}/mp_rank_00_model_states.pt", b"four hundred", 200)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 5
    incomplete_in_s3(s3, workspace, committed, "zero_pp_rank_0_optim_states.pt")

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert f"restored {oldest}" in result.stdout
    assert files_under(target) == {f"{oldest}/mp_rank_00_model_states.pt", pointer}
    assert (target / pointer).read_text().strip() == text.replace("3", "2")
    [skipped] = named(result.stderr, "set_not_committed")
    assert (skipped["set"], skipped["pointer"], skipped["names"]) == (half, pointer, text)


@pytest.mark.parametrize(("text", "companion", "sets", "passed_over"), [
    ("global_step300", "latest", ("global_step400", "global_step200"), {"global_step400"}),
    ("300", "latest_checkpointed_iteration.txt", ("iter_0000400", "iter_0000200"),
     {"iter_0000400"}),
    # No step of the series at or below the one named: nothing to restore instead.
    ("global_step300", "latest", ("global_step400", "global_step500"), set()),
    # A bare number, two series it could be of.
    ("300", "latest", ("iter_0000400", "global_step400", "global_step200", "iter_0000200"),
     set()),
    ("global_step300", "best", ("global_step400", "global_step200"), set()),  # no pointer
    ("step300", "latest", ("global_step400", "global_step200"), set()),  # another series
    ("epoch=3-step=300", "latest", ("epoch=4-step=400", "epoch=2-step=200", "step=500"),
     {"epoch=4-step=400"}),
    # A bare number outside Megatron's tracker names a step only where one of that number is
    # listed; else it may count anything (here a world size).
    ("2", "last_world_size", ("epoch_4", "epoch_1"), set()),
    ("300", "latest", ("400", "200"), {"400"}),  # tags that are bare numbers: a name
])
def test_which_sets_a_pointer_to_a_step_not_in_s3_passes_over(
        text: str, companion: str, sets: tuple[str, ...], passed_over: set[str]) -> None:
    store = InMemoryObjectStore()
    store.put(f"run1/{companion}", text.encode())
    pointer = _one_file_set(companion, len(text.encode()))
    found = uncommitted(store, [*(_one_file_set(name, 3) for name in sets), pointer])
    assert {f.set_name for f in found} == passed_over
    assert all(f.names == text and f.pointer == companion for f in found)


@given(steps=st.sets(st.integers(0, 10_000), min_size=1, max_size=8),
       pointed=st.integers(0, 10_000), others=st.sets(st.integers(0, 10_000), max_size=3))
def test_a_pointer_never_leaves_its_series_without_a_step_to_restore(
        steps: set[int], pointed: int, others: set[int]) -> None:
    """Whether or not the step the pointer names is in S3: steps past it are passed over,
    steps at or below it never, nor steps of another series; and of its series at least one
    step is left to restore."""
    names = [f"global_step{n}" for n in sorted(steps, reverse=True)]
    store = InMemoryObjectStore()
    text = f"global_step{pointed}"
    store.put("run1/latest", text.encode())
    sets = [*(_one_file_set(name, 3) for name in names),
            *(_one_file_set(f"iter_{n:07d}", 3) for n in others),
            _one_file_set("latest", len(text))]
    passed_over = {f.set_name for f in uncommitted(store, sets)}
    assert passed_over <= {f"global_step{n}" for n in steps if n > pointed}
    assert passed_over < set(names)
    if any(n <= pointed for n in steps):
        assert passed_over == {f"global_step{n}" for n in steps if n > pointed}


def test_a_step_a_pointer_names_is_never_passed_over_for_another_pointer(
        workspace: Workspace, s3: Any) -> None:
    """Megatron-DeepSpeed writes both DeepSpeed's `latest` and Megatron's tracker at each save.
    The notice came after step 400 was saved: step 400 and `latest` naming it reached S3, the
    tracker went up no more (it still names 300), and step 300 not whole. `latest` says step
    400 was committed: it comes back, not step 200."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 500)
    write(workspace, "global_step300/mp_rank_00_model_states.pt", b"three hundred", 400)
    write(workspace, "global_step300/zero_pp_rank_0_optim_states.pt", b"optimizer 300", 400)
    write(workspace, "latest_checkpointed_iteration.txt", b"300", 350)
    write(workspace, "global_step400/mp_rank_00_model_states.pt", b"four hundred", 300)
    write(workspace, "latest", b"global_step400", 250)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 6
    incomplete_in_s3(s3, workspace, "global_step300", "zero_pp_rank_0_optim_states.pt")

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step400" in result.stdout
    assert (target / "latest").read_text() == "global_step400"
    assert not named(result.stderr, "set_not_committed")


def test_a_number_in_a_file_that_is_no_tracker_passes_no_step_over(
        workspace: Workspace, s3: Any) -> None:
    """A small `last_world_size` holding 2 (the world size a script reshards from) is named
    like a pointer, but a bare number names a step only in Megatron's tracker or where a step
    of that number is in S3: epoch_4 is restored, the newest step."""
    write(workspace, "epoch_1/model.pt", b"one", 400)
    write(workspace, "epoch_4/model.pt", b"four", 300)
    write(workspace, "last_world_size", b"2", 200)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3

    result = restore(workspace, "--to", str(workspace.root / "restored"))
    assert result.returncode == 0, result.stderr
    assert "restored epoch_4" in result.stdout
    assert not named(result.stderr, "set_not_committed")


@pytest.mark.parametrize("sets", [
    ("global_step400", "global_step200"),  # step 300 not whole in S3
    ("global_step400", "global_step300", "global_step200"),
])
def test_a_pointer_to_an_older_step_never_passes_over_one_another_pointer_names(
        sets: tuple[str, ...]) -> None:
    """`latest` names step 400, whole in S3; the tracker, not uploaded since, names 300."""
    store = InMemoryObjectStore()
    store.put("run1/latest", b"global_step400")
    store.put("run1/latest_checkpointed_iteration.txt", b"300")
    manifests = [_one_file_set("latest", 14),
                 _one_file_set("latest_checkpointed_iteration.txt", 3),
                 *(_one_file_set(name, 3) for name in sets)]
    assert uncommitted(store, manifests) == []


def _one_file_set(name: str, size: int) -> Manifest:
    entry = ManifestEntry(key=f"run1/{name}", path=name, size=size, mtime_ns=0, checksum=None)
    return Manifest(set_name=name, prefix="run1/", files=(entry,), sealed_at=0.0)


def test_retention_never_drops_the_committed_step_for_a_newer_one(
        workspace: Workspace, s3: Any) -> None:
    """keep_sets 1, and step 300 sealed half saved while `latest` still names step 200: step
    300 does not count among the sets kept, so step 200 stays, and restore brings it back."""
    workspace.write_config(sync={"keep_sets": 1})
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 400)
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 300)
    write(workspace, "latest", b"global_step200", 250)
    write(workspace, "global_step300/mp_rank_00_model_states.pt", b"three hundred", 200)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    pruned = workspace.cli("prune", "-c", "config.yaml")
    assert pruned.returncode == 0, pruned.stderr
    kept = keys_in(s3, workspace.bucket)
    assert "run1/global_step200/mp_rank_00_model_states.pt" in kept
    assert "run1/global_step300/mp_rank_00_model_states.pt" in kept
    assert "run1/global_step100/mp_rank_00_model_states.pt" not in kept  # retention still works
    result = restore(workspace, "--to", str(workspace.root / "restored"))
    assert "restored global_step200" in result.stdout, result.stderr


DEEPSPEED = ("global_step200", "global_step300")
MEGATRON = ("iter_0000200", "iter_0000300")


@pytest.mark.parametrize(("text", "companion", "sets", "expected"), [
    ("global_step200\n", "latest", DEEPSPEED, "global_step200"),
    ("200", "latest_checkpointed_iteration.txt", MEGATRON, "iter_0000200"),
    ("200", "latest", DEEPSPEED + MEGATRON, None),  # two sets of that number
    ("global_step200", "best", DEEPSPEED, None),  # not named as a pointer
    ("global_step100", "latest", DEEPSPEED, None),  # names no set listed
    ("global step200", "latest", DEEPSPEED, None),
    ("", "latest", DEEPSPEED, None),
])
def test_which_set_a_pointer_names(text: str, companion: str, sets: tuple[str, ...],
                                   expected: str | None) -> None:
    assert named_set(text, companion, sets) == expected


def test_a_pointer_to_a_step_on_disk_beside_it_is_left_as_it_is(
        workspace: Workspace, s3: Any) -> None:
    """Restored into a directory that still holds the newer step (the same disk after a
    reboot, a shared file system): S3 lacks part of global_step300, the disk has all of it,
    and DeepSpeed's `latest` names it. The pointer names a step that is there: it stays, and
    the trainer resumes from step 300, not 100 steps back."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 300)
    write(workspace, "global_step300/mp_rank_00_model_states.pt", b"three hundred", 200)
    write(workspace, "latest", b"global_step300", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    incomplete_in_s3(s3, workspace, "global_step300", "mp_rank_00_model_states.pt")

    result = restore(workspace)
    assert result.returncode == 0, result.stderr
    assert "restored global_step200" in result.stdout and "now names" not in result.stdout
    assert (workspace.checkpoints / "latest").read_bytes() == b"global_step300"


@pytest.mark.parametrize("on_disk", ["all of it", "part of it", "a file cut short"])
def test_a_pointer_to_a_higher_step_stays_only_if_that_step_is_whole_beside_it(
        workspace: Workspace, s3: Any, on_disk: str) -> None:
    """S3 has global_step300's manifest, but an object of it is gone: restore brings
    global_step200. Beside it the disk holds global_step300 (a restore killed while placing
    it, a save cut short, or all of it) and `latest` names it. The pointer stays only if every
    file the manifest lists is there with its size: the trainer never loads half a step."""
    files = {"mp_rank_00_model_states.pt": b"three hundred",
             "zero_pp_rank_0_optim_states.pt": b"optimizer states"}
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 300)
    for name, data in files.items():
        write(workspace, f"global_step300/{name}", data, 200)
    write(workspace, "latest", b"global_step300", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    s3.delete_object(Bucket=workspace.bucket, Key="run1/global_step300/" + next(iter(files)))
    step = workspace.checkpoints / "global_step300"
    if on_disk == "part of it":
        (step / "zero_pp_rank_0_optim_states.pt").unlink()
    elif on_disk == "a file cut short":
        os.truncate(step / "zero_pp_rank_0_optim_states.pt", 3)

    result = restore(workspace)
    assert result.returncode == 0, result.stderr
    assert "restored global_step200" in result.stdout
    if on_disk == "all of it":
        assert (workspace.checkpoints / "latest").read_bytes() == b"global_step300"
    else:
        assert "latest now names global_step200 (was global_step300)" in result.stdout
        assert (workspace.checkpoints / "latest").read_bytes() == b"global_step200"


def test_a_named_step_restored_beside_a_higher_one_gets_the_pointer(
        workspace: Workspace) -> None:
    """`restore --set global_step100` into the watched directory, which still holds
    global_step200 (a rollback from a step that diverged): `latest` names the step asked for,
    not the one rolled back from."""
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 300)
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200\n", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    result = restore(workspace, "--set", "global_step100")
    assert result.returncode == 0, result.stderr
    assert "latest now names global_step100 (was global_step200)" in result.stdout
    assert (workspace.checkpoints / "latest").read_bytes() == b"global_step100\n"


def test_a_pointer_on_disk_naming_a_lower_step_names_the_step_restored(
        workspace: Workspace, s3: Any) -> None:
    """The destination holds global_step100 and a `latest` naming it; S3 holds global_step200
    and a `latest` that is not complete there (left out beside it). The trainer must load the
    step restore says it restored, not the lower one still on disk."""
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 300)
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    # Replaced in S3 after it was sealed (a PUT whose manifest never came): corrupt there.
    s3.put_object(Bucket=workspace.bucket, Key="run1/latest", Body=b"\x00\xff")
    target = workspace.root / "restored"
    holding_a_step(target, "global_step100", b"one hundred")
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step200" in result.stdout
    assert "latest not restored beside it" in result.stdout
    assert "latest now names global_step200 (was global_step100)" in result.stdout
    assert (target / "latest").read_bytes() == b"global_step200"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_pointer_on_disk_that_is_no_regular_file_is_never_rewritten(
        tmp_path: Path, kind: str) -> None:
    """What sits at a pointer's path when its copy in S3 is left out may be anything: a link
    is neither read through nor replaced, a FIFO never read (it would block)."""
    path = tmp_path / "latest"
    shared = tmp_path / "elsewhere"
    shared.write_bytes(b"global_step100")
    if kind == "symlink":
        path.symlink_to(shared)
    else:
        os.mkfifo(path)
    assert repoint(path, "latest", "global_step200", {"global_step100", "global_step200"},
                   tmp_path / ".latest.tmp") is None
    assert path.is_symlink() == (kind == "symlink")
    assert shared.read_bytes() == b"global_step100"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping DAC capabilities needs root")
def test_a_companion_whose_folder_may_not_be_written_is_refused_before_anything_downloads(
        workspace: Workspace) -> None:
    """The folder where `latest` goes is read-only, the step's own folder is not: refused in
    one line with nothing placed, not the step restored and its pointer left naming another."""
    write(workspace, "global_step200/mp_rank_00_model_states.pt", b"two hundred", 200)
    write(workspace, "latest", b"global_step200", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    target = workspace.root / "restored"
    (target / "global_step200").mkdir(parents=True)
    (target / "latest").write_bytes(b"global_step100")
    target.chmod(0o555)
    try:
        result = subprocess.run(
            [*NO_DAC, sys.executable, "-m", "spotwatch.cli", "restore", "-c", "config.yaml",
             "--to", str(target)], cwd=workspace.root, env=workspace.env(),
            capture_output=True, text=True, timeout=60)
    finally:
        target.chmod(0o755)
    assert result.returncode == 1, result.stdout
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert error == f"spotwatch: error: cannot restore 'latest': {target} may not be " \
        "written to", error
    assert os.listdir(target / "global_step200") == []
    assert (target / "latest").read_bytes() == b"global_step100"


def test_a_checkpoint_of_unnumbered_files_comes_back_whole(
        workspace: Workspace, s3: Any) -> None:
    """model.pt and optim.pt saved in place every epoch, with no step number (a Hugging Face
    save_model, a hand-written loop): both are the checkpoint, and both come back. With one
    corrupt in S3, the other comes back and the summary names the one left out."""
    files = [("model.pt", b"weights" * 100, 200), ("optim.pt", b"moments" * 100, 100),
             ("config.json", b"{}", 300)]
    for relative, data, age in files:
        write(workspace, relative, data, age)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 3
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert files_under(target) == {"model.pt", "optim.pt", "config.json"}
    assert all((target / relative).read_bytes() == data for relative, data, _ in files)
    # `--set` names one file: that one alone.
    alone = workspace.root / "alone"
    assert restore(workspace, "--set", "model.pt", "--to", str(alone)).returncode == 0
    assert files_under(alone) == {"model.pt"}

    s3.put_object(Bucket=workspace.bucket, Key="run1/model.pt", Body=b"X" * 700)
    again = workspace.root / "again"
    result = restore(workspace, "--to", str(again))
    assert result.returncode == 0, result.stderr
    assert "restored optim.pt" in result.stdout and "model.pt not restored beside it" in \
        result.stdout, result.stdout
    assert files_under(again) == {"optim.pt", "config.json"}


def test_a_pointer_whose_step_was_never_sealed_is_no_checkpoint(
        workspace: Workspace, s3: Any) -> None:
    """The instance went away mid-flush: global_step100's files are in S3 but not its
    manifest, while `latest` naming it was sealed (small files go first). Restore has no
    checkpoint to give back (exit 1), not a pointer alone with exit 0."""
    write(workspace, "global_step100/mp_rank_00_model_states.pt", b"one hundred", 200)
    write(workspace, "latest", b"global_step100", 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    s3.delete_object(Bucket=workspace.bucket, Key=manifest_key("run1/", "global_step100"))
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 1, result.stdout
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert error.startswith("spotwatch: error: no complete checkpoint set under "), error
    assert "--set latest restores it" in error, error
    assert not target.exists() or files_under(target) == set()


RECOVERY_SCRIPT = b"# DeepSpeed's zero_to_fp32.py, copied beside the steps at each save\n" * 50


def test_deepspeeds_recovery_script_comes_beside_the_step_and_is_never_the_checkpoint(
        workspace: Workspace, s3: Any) -> None:
    """DeepSpeed copies zero_to_fp32.py into the save directory at every save: a file with a
    number in its name, alone in its series. It comes back beside the step restored, and with
    every step broken in S3 it is not handed back as the checkpoint (exit 1)."""
    write(workspace, "global_step1/mp_rank_00_model_states.pt", b"one" * 100, 400)
    write(workspace, "global_step2/mp_rank_00_model_states.pt", b"two" * 100, 300)
    write(workspace, "latest", b"global_step2", 200)
    write(workspace, "zero_to_fp32.py", RECOVERY_SCRIPT, 100)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 4
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored global_step2" in result.stdout, result.stdout
    assert (target / "zero_to_fp32.py").read_bytes() == RECOVERY_SCRIPT
    assert (target / "latest").read_bytes() == b"global_step2"

    s3.delete_object(Bucket=workspace.bucket, Key="run1/global_step1/mp_rank_00_model_states.pt")
    s3.delete_object(Bucket=workspace.bucket, Key="run1/global_step2/mp_rank_00_model_states.pt")
    elsewhere = workspace.root / "elsewhere"
    result = restore(workspace, "--to", str(elsewhere))
    assert result.returncode == 1, result.stdout
    assert not (elsewhere / "zero_to_fp32.py").exists()
