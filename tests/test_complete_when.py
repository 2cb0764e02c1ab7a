"""watch[].complete_when: a set directory is sealed only once it holds the file its trainer
writes last, so a pause between two shards never seals half a checkpoint."""

from __future__ import annotations

import fnmatch
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.daemon.reporter import STATUS_NAMED_SETS_MAX
from spotwatch.emulator import ImdsEmulator
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.sealer import stale_markers, unmatched

from .conftest import Workspace, keys_in, wait_for
from .test_checkpoint_sets import MANIFESTS, restore, sealed
from .test_daemon_e2e import flush_summary, save_checkpoint


def watch_with(workspace: Workspace, complete_when: list[str]) -> None:
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": complete_when}])


def test_status_names_a_bounded_number_of_waiting_sets_and_counts_them_all(
        workspace: Workspace) -> None:
    """Every top-level file or directory is a set of its own: with tens of thousands waiting,
    status.json would rewrite all their names every second. It names the first
    STATUS_NAMED_SETS_MAX in order, counts every one, and `spotwatch status` gives the count,
    while the daemon runs and once it has stopped."""
    watch_with(workspace, [".metadata"])
    waiting = [f"step_{i:04d}" for i in range(STATUS_NAMED_SETS_MAX + 7)]
    for name in waiting:
        save_checkpoint(workspace.checkpoints / name / "shard-0.distcp", 100)
    daemon = workspace.start_daemon()
    status = wait_for(lambda: (lambda report: report if report.get("unsealed_set_count") == len(
        waiting) and report.get("pending_files") == 0 else None)(workspace.status()))
    assert status["unsealed_sets"] == [f"run1/{name}" for name in waiting[:STATUS_NAMED_SETS_MAX]]
    shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
    assert f"unsealed:     {len(waiting)} sets waiting for their manifest" in shown, shown
    daemon.stop()
    shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
    assert f"{len(waiting)} sets without their manifest: run1/step_0000" in shown, shown


def test_a_set_waits_for_its_marker_however_long_the_trainer_pauses(
        workspace: Workspace, s3: Any) -> None:
    watch_with(workspace, [".metadata"])
    (workspace.checkpoints / "step_1").mkdir()
    daemon = workspace.start_daemon()
    shard = save_checkpoint(workspace.checkpoints / "step_1" / "shard-0.distcp", 100_000)
    # The trainer pauses: the first shard is in S3, nothing of the set is pending or being
    # written, and a top-level file written after it is sealed already.
    wait_for(lambda: "run1/step_1/shard-0.distcp" in keys_in(s3, workspace.bucket))
    wait_for(lambda: daemon.named("set_awaiting_marker"))
    (workspace.checkpoints / "later.pt").write_bytes(b"later")
    wait_for(lambda: sealed(daemon, "run1/later.pt"))
    assert f"{MANIFESTS}step_1.json" not in keys_in(s3, workspace.bucket)
    assert daemon.named("set_awaiting_marker")[0]["waiting_for"] == [".metadata"]
    assert "run1/step_1" in wait_for(lambda: workspace.status().get("unsealed_sets"))
    # Nothing of step_1 is a checkpoint yet: restore brings back only the sealed set.
    assert "restored later.pt" in restore(workspace, "--to", str(workspace.root / "r1")).stdout

    save_checkpoint(workspace.checkpoints / "step_1" / "shard-1.distcp", 100_000)
    save_checkpoint(workspace.checkpoints / "step_1" / ".metadata", 1_000)
    assert wait_for(lambda: sealed(daemon, "run1/step_1"))["files"] == 3
    wait_for(lambda: "run1/step_1" not in workspace.status().get("unsealed_sets", ["run1/step_1"]))
    assert daemon.stop() == 0
    target = workspace.root / "r2"
    result = restore(workspace, "--set", "step_1", "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "step_1" / "shard-0.distcp").read_bytes() == shard


def test_flush_does_not_wait_for_a_marker_and_names_the_set(workspace: Workspace,
                                                            s3: Any) -> None:
    watch_with(workspace, ["trainer_state.json", "*.safetensors"])
    save_checkpoint(workspace.checkpoints / "checkpoint-5" / "model.safetensors", 50_000)
    save_checkpoint(workspace.checkpoints / "single.pt", 10_000)  # a file set: no marker
    result = workspace.cli("flush", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert flush_summary(result)["files"] == 2
    keys = keys_in(s3, workspace.bucket)
    assert f"{MANIFESTS}single.pt.json" in keys
    assert f"{MANIFESTS}checkpoint-5.json" not in keys
    assert "trainer_state.json" in result.stderr  # the set_awaiting_marker line names it

    save_checkpoint(workspace.checkpoints / "checkpoint-5" / "trainer_state.json", 1_000)
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    assert f"{MANIFESTS}checkpoint-5.json" in keys_in(s3, workspace.bucket)


def test_an_absolute_marker_is_refused(workspace: Workspace) -> None:
    watch_with(workspace, ["/data/.metadata"])
    result = workspace.cli("flush", "-c", "config.yaml")
    assert result.returncode == 2
    assert "complete_when" in result.stderr and "Traceback" not in result.stderr


_names = st.text(st.sampled_from("ab./*?"), min_size=1, max_size=6)


@given(st.lists(_names, max_size=4), st.lists(_names, max_size=4), st.booleans())
def test_only_a_directory_holding_a_match_for_every_pattern_is_complete(
        patterns: list[str], paths: list[str], directory: bool) -> None:
    entries = [ManifestEntry(f"p/{path}", f"step/{path}" if directory else "step", 1, 0, "c")
               for path in paths]
    left = unmatched(patterns, "step", entries)
    if not directory or not paths:
        assert left == []
        return
    assert left == [p for p in patterns if not fnmatch.filter(paths, p)]


def test_a_hugging_face_checkpoint_waits_for_trainer_state_without_being_told(
        workspace: Workspace, s3: Any) -> None:
    """The Trainer saves checkpoint-<step>/ in place, file by file, trainer_state.json last:
    with the default config, a pause after the optimizer no longer seals it without its
    state. A checkpoint-<step>/ that is not the Trainer's (no training_args.bin) waits for
    nothing."""
    daemon = workspace.start_daemon()
    for name in ("model.safetensors", "training_args.bin", "optimizer.pt"):
        save_checkpoint(workspace.checkpoints / "checkpoint-10" / name, 1_000)
    save_checkpoint(workspace.checkpoints / "checkpoint-20" / "model.safetensors", 1_000)
    wait_for(lambda: sealed(daemon, "run1/checkpoint-20"))
    wait_for(lambda: daemon.named("set_awaiting_marker"))
    assert daemon.named("set_awaiting_marker")[0]["waiting_for"] == ["trainer_state.json"]
    assert "run1/checkpoint-10/optimizer.pt" in keys_in(s3, workspace.bucket)
    assert f"{MANIFESTS}checkpoint-10.json" not in keys_in(s3, workspace.bucket)
    save_checkpoint(workspace.checkpoints / "checkpoint-10" / "trainer_state.json", 100)
    wait_for(lambda: sealed(daemon, "run1/checkpoint-10"))
    assert daemon.stop() == 0


def test_a_trainers_checkpoint_beside_a_finished_one_waits_before_training_args(
        workspace: Workspace, s3: Any) -> None:
    """The Trainer writes the model's config and weights before training_args.bin: beside a
    checkpoint it finished (or one restored to resume), a pause there seals nothing, and
    retention keeping one set never drops the finished checkpoint for the half one."""
    workspace.write_config(sync={"keep_sets": 1})
    finished = {name: save_checkpoint(workspace.checkpoints / "checkpoint-100" / name, 1_000)
                for name in ("config.json", "model.safetensors", "training_args.bin",
                             "trainer_state.json")}
    daemon = workspace.start_daemon()
    wait_for(lambda: sealed(daemon, "run1/checkpoint-100"))
    save_checkpoint(workspace.checkpoints / "checkpoint-200" / "config.json", 100)
    save_checkpoint(workspace.checkpoints / "checkpoint-200" / "model.safetensors", 1_000)
    wait_for(lambda: "run1/checkpoint-200/model.safetensors" in keys_in(s3, workspace.bucket))
    waiting = wait_for(lambda: [line for line in daemon.named("set_awaiting_marker")
                                if line["set"] == "run1/checkpoint-200"])
    assert waiting[0]["waiting_for"] == ["trainer_state.json"]
    wait_for(lambda: workspace.status().get("pending_files") == 0)
    assert f"{MANIFESTS}checkpoint-200.json" not in keys_in(s3, workspace.bucket)
    assert f"{MANIFESTS}checkpoint-100.json" in keys_in(s3, workspace.bucket)
    assert daemon.stop() == 0  # the instance goes: the finished checkpoint comes back
    target = workspace.root / "r"
    result = restore(workspace, "--to", str(target))
    assert "restored checkpoint-100" in result.stdout, result.stderr
    for name, data in finished.items():
        assert (target / "checkpoint-100" / name).read_bytes() == data


@given(st.one_of(st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True),
                 st.builds("checkpoint-{}".format, st.integers(0, 10**9)),
                 st.sampled_from(["checkpoint-", "checkpoint-1a", "checkpoint_5",
                                  "Checkpoint-5", "checkpoint-5-final"])),
       st.booleans(), st.booleans(),
       st.sampled_from([["config.json"], ["adapter_config.json", "rng_state_0.pth"],
                        ["rng_state_8.pth", "global_step10/zero_pp_rank_8_optim_states.pt"],
                        ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]]))
def test_only_the_trainers_own_checkpoints_imply_a_marker(name: str, with_args: bool,
                                                          beside_finished: bool,
                                                          saved: list[str]) -> None:
    """Another node's part of a Trainer's checkpoint (its ranks' RNG states and optimizer
    shards), or accelerate's save_state, never gets trainer_state.json: beside a finished
    checkpoint (a whole set restored onto every node) it waits for nothing, while process
    zero's part (the model's or an adapter's config) waits for the state."""
    from spotwatch.sync.sets.sealer import implied_markers  # here: others run on older code

    files = [*saved, *(["training_args.bin"] if with_args else [])]
    entries = [ManifestEntry(f"run1/{name}/{file}", f"{name}/{file}", 1, 1, None)
               for file in files]
    process_zeros = with_args or (beside_finished and saved[0].endswith("config.json"))
    is_trainers = process_zeros and fnmatch.fnmatchcase(
        name, "checkpoint-*") and name[len("checkpoint-"):].isdigit()
    assert implied_markers(name, entries, lambda: beside_finished) == (
        ("trainer_state.json",) if is_trainers else ())


@given(st.sets(st.sampled_from(["checkpoint-1", "checkpoint-2", "tmp-checkpoint-3", "step_4",
                                "checkpoint-5a"]), max_size=4),
       st.sampled_from(["checkpoint-2", "checkpoint-9", "step_4"]))
def test_a_finished_checkpoint_of_the_trainers_is_one_beside_the_set_with_its_state(
        tmp_path_factory: Any, finished: set[str], set_name: str) -> None:
    from spotwatch.sync.sets.sealer import holds_trainer_checkpoint

    root = tmp_path_factory.mktemp("watched")
    for name in finished:
        (root / name).mkdir()
        (root / name / "trainer_state.json").write_text("{}")
    (root / "checkpoint-7").mkdir()  # the Trainer's, not finished
    (root / "checkpoint-7" / "config.json").write_text("{}")
    expected = set_name.startswith("checkpoint-") and any(
        name != set_name and name.startswith("checkpoint-") and name[11:].isdigit()
        for name in finished)
    assert holds_trainer_checkpoint(root, set_name) == expected


SHARDS = ("__0_0.distcp", "__1_0.distcp", ".metadata")


def test_a_set_saved_again_in_place_waits_for_its_new_marker(workspace: Workspace,
                                                            s3: Any) -> None:
    """torch.distributed.checkpoint saving into one fixed directory: while the second save
    has written shard 0 and rank 1 still gathers, the last save's `.metadata` is there but
    says nothing of this one. The set keeps its last manifest (shard 0's last version held),
    so a restore then, or after the daemon is killed and started again, gives the whole last
    save, and the new save is sealed once its own `.metadata` is there."""
    watch_with(workspace, [".metadata"])
    directory = workspace.checkpoints / "latest_ckpt"
    first = {name: save_checkpoint(directory / name, 20_000) for name in SHARDS}
    daemon = workspace.start_daemon()
    wait_for(lambda: sealed(daemon, "run1/latest_ckpt"))
    second = {SHARDS[0]: save_checkpoint(directory / SHARDS[0], 20_000)}
    waiting = wait_for(lambda: [line for line in daemon.named("set_awaiting_marker")
                                if line["set"] == "run1/latest_ckpt"])
    assert waiting[0]["waiting_for"] == [".metadata"]
    daemon.process.kill()  # mid-save, as the instance goes
    daemon.process.wait()
    daemon = workspace.start_daemon()  # knows the set only from S3 now
    wait_for(lambda: daemon.named("startup_scan_done"))
    wait_for(lambda: workspace.status().get("pending_files") == 0)
    wait_for(lambda: daemon.named("set_awaiting_marker"))
    assert not sealed(daemon, "run1/latest_ckpt")
    target = workspace.root / "r1"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    for name, data in first.items():
        assert (target / "latest_ckpt" / name).read_bytes() == data, name

    second.update({name: save_checkpoint(directory / name, 20_000) for name in SHARDS[1:]})
    wait_for(lambda: sealed(daemon, "run1/latest_ckpt"))
    assert daemon.stop() == 0
    target = workspace.root / "r2"
    assert restore(workspace, "--to", str(target)).returncode == 0
    for name, data in second.items():
        assert (target / "latest_ckpt" / name).read_bytes() == data, name


def test_a_set_saved_again_in_place_keeps_its_last_save_under_a_notice(
        workspace: Workspace, s3: Any, imds: ImdsEmulator) -> None:
    """While a notice's flush runs, held copies of sets that seal right after their new
    version are skipped to save time; a set that waits for its new marker may keep its last
    manifest for good, so its replaced file is held all the same, and a restore after the
    instance went gives the last save whole."""
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/",
                                   "complete_when": [".metadata"]}],
                           sync={"quiet_seconds": 60})
    directory = workspace.checkpoints / "latest_ckpt"
    directory.mkdir()  # watched from the start: files found by a scan would wait a minute
    daemon = workspace.start_daemon()
    first = {name: save_checkpoint(directory / name, 20_000) for name in SHARDS}
    wait_for(lambda: sealed(daemon, "run1/latest_ckpt"))
    with (workspace.checkpoints / "log.txt").open("wb") as still_written:
        still_written.write(b"the flush waits for this file")  # unclosed: the flush runs on
        still_written.flush()
        imds.fire_spot_interruption(in_seconds=120)
        daemon.wait_for_event("flush_started")
        save_checkpoint(directory / SHARDS[0], 20_000)  # rank 1 still gathering
        held = wait_for(lambda: [line for line in daemon.named("held_copy_made")
                                 if line["key"] == f"run1/latest_ckpt/{SHARDS[0]}"])
        assert held and not daemon.named("held_copy_skipped")
        wait_for(lambda: daemon.named("set_awaiting_marker"))
        daemon.process.kill()  # the instance goes
        daemon.process.wait()
    target = workspace.root / "r"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    for name, data in first.items():
        assert (target / "latest_ckpt" / name).read_bytes() == data, name


# (size, mtime, checksum): a file touched, or copied back, keeps its bytes' checksum.
_versions = st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from(["c", "d"]))


@given(st.dictionaries(st.sampled_from(["a.distcp", "b.distcp", ".metadata", "x/.metadata"]),
                       _versions, min_size=1),
       st.dictionaries(st.sampled_from(["a.distcp", "b.distcp", ".metadata", "x/.metadata"]),
                       _versions),
       st.lists(st.sampled_from([".metadata", "*.distcp", "x/*"]), min_size=1, max_size=2))
def test_a_marker_counts_once_rewritten_whenever_a_file_sealed_before_was(
        now: dict[str, tuple[int, int, str]], before: dict[str, tuple[int, int, str]],
        patterns: list[str]) -> None:
    def entries(files: dict[str, tuple[int, int, str]]) -> list[ManifestEntry]:
        return [ManifestEntry(f"p/step/{path}", f"step/{path}", size, mtime, checksum)
                for path, (size, mtime, checksum) in files.items()]

    def written_again(path: str, version: tuple[int, int, str]) -> bool:
        sealed_as = before.get(path)
        return sealed_as is None or sealed_as[0] != version[0] or (
            sealed_as[1] != version[1] and sealed_as[2] != version[2])

    sealed = Manifest.build("step", "p/", entries(before), [])
    left = stale_markers(patterns, "step", entries(now), sealed)
    changed = [path for path, version in now.items() if written_again(path, version)]
    if not any(path in before for path in changed):
        assert left == []  # first seal or new files only: presence is enough
    else:
        assert left == [pattern for pattern in patterns
                        if not fnmatch.filter(changed, pattern)]
    assert stale_markers(patterns, "step", entries(now), None) == []
    single = [ManifestEntry("p/step", "step", 1, 1, "c")]
    assert stale_markers(patterns, "step", single,
                         Manifest.build("step", "p/", [ManifestEntry("p/step", "step", 0, 0,
                                                                      "c")], [])) == []
