"""Multi-node jobs end to end: three daemons on one machine, each with its own checkpoint
directory, state directory, config (one job id, three nodes, its own rank) and emulated IMDS,
sharing one moto bucket; `spotwatch restore` on a replacement node restores only a set that
every node sealed."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from spotwatch.config import JOB_ENVIRONMENT
from spotwatch.daemon.prune_job import JOB_PRUNE_SECONDS
from spotwatch.emulator import ImdsEmulator
from spotwatch.keys import part_key
from spotwatch.model import Notice, NoticeKind

from .conftest import Daemon, Workspace, keys_in, object_bytes, wait_for
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_peer_notices_e2e import publish_as_peer

JOB = "llama-70b"
NODES = 3
PREFIX = "run1/"


@pytest.fixture(autouse=True)
def _no_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in {v for names in JOB_ENVIRONMENT.values() for v in names}:
        monkeypatch.delenv(variable, raising=False)


def node_workspace(root: Path, bucket: str, imds_url: str, rank: int | None) -> Workspace:
    """A node's own directories and config; rank None: a replacement node that restores."""
    root.mkdir()
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    space = Workspace(root, checkpoints, root / "config.yaml", bucket, imds_url)
    job: dict[str, Any] = {"id": JOB, "nodes": NODES}
    if rank is not None:
        job["rank"] = rank
    space.write_config(job=job)
    return space


@pytest.fixture
def nodes(tmp_path: Path, bucket: str) -> Iterator[list[Workspace]]:
    with ExitStack() as stack:
        emulators = [stack.enter_context(ImdsEmulator()) for _ in range(NODES)]
        yield [node_workspace(tmp_path / f"node{rank}", bucket, emulators[rank].url, rank)
               for rank in range(NODES)]


@pytest.fixture
def replacement(tmp_path: Path, bucket: str) -> Workspace:
    # IMDS is not needed to restore.
    return node_workspace(tmp_path / "replacement", bucket, "http://127.0.0.1:9", None)


@pytest.fixture
def daemons(nodes: list[Workspace]) -> Iterator[list[Daemon]]:
    started = [node.start_daemon() for node in nodes]
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def save_shards(node: Workspace, rank: int, step: str, age_seconds: float = 0) -> dict[str, bytes]:
    """What PyTorch DCP writes on one node: its rank's shard, and on rank 0 the metadata."""
    names = [f"__{rank}_0.distcp"] + ([".metadata"] if rank == 0 else [])
    files = {}
    for name in names:
        path = node.checkpoints / step / name
        files[f"{step}/{name}"] = save_checkpoint(path, 150_000 + 10_000 * rank)
        if age_seconds:
            then = time.time() - age_seconds
            os.utime(path, (then, then))
    return files


def sealed(s3: Any, bucket: str, step: str, ranks: range | list[int]) -> bool:
    wanted = {part_key(PREFIX, JOB, step, rank) for rank in ranks}
    return wanted <= keys_in(s3, bucket)


def write_steps(nodes: list[Workspace], s3: Any, bucket: str,
                step_2_ranks: list[int]) -> dict[str, dict[str, bytes]]:
    """step_1 on every node, then step_2 on the given ranks; waits until their parts are in."""
    steps: dict[str, dict[str, bytes]] = {"step_1": {}, "step_2": {}}
    for rank, node in enumerate(nodes):
        steps["step_1"] |= save_shards(node, rank, "step_1", age_seconds=600)
    wait_for(lambda: sealed(s3, bucket, "step_1", range(NODES)), timeout=60)
    for rank in step_2_ranks:
        steps["step_2"] |= save_shards(nodes[rank], rank, "step_2")
    wait_for(lambda: sealed(s3, bucket, "step_2", step_2_ranks), timeout=60)
    return steps


def restore(node: Workspace, *args: str) -> Any:
    return node.cli("restore", "-c", str(node.config_file), *args)


def files_under(target: Path) -> dict[str, bytes]:
    return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}


def test_a_set_every_node_sealed_restores_whole_or_one_nodes_part(
        nodes: list[Workspace], daemons: list[Daemon], replacement: Workspace, s3: Any,
        bucket: str) -> None:
    steps = write_steps(nodes, s3, bucket, step_2_ranks=[0, 1, 2])
    # The files keep their keys: the bucket holds the checkpoint as the trainer wrote it, and
    # no single-node manifest is written on a job.
    assert {PREFIX + name for name in steps["step_2"]} <= keys_in(s3, bucket)
    assert not [k for k in keys_in(s3, bucket) if k.startswith(PREFIX + ".spotwatch/manifests/")]
    part = json.loads(s3.get_object(Bucket=bucket, Key=part_key(PREFIX, JOB, "step_2", 1))
                      ["Body"].read())
    # The part names the node that sealed it: its host and the id kept in its state dir.
    node_id = (nodes[1].root / "state" / "node-id").read_text().strip()
    assert part["job"] == {"id": JOB, "nodes": NODES, "rank": 1,
                           "node": f"{part['job']['node'].split('/')[0]}/{node_id}"}
    assert [f["path"] for f in part["files"]] == ["step_2/__1_0.distcp"]

    whole = replacement.root / "whole"
    result = restore(replacement, "--to", str(whole))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout and "passed over" not in result.stdout
    assert files_under(whole) == steps["step_2"]

    node_1 = replacement.root / "node_1"
    result = restore(replacement, "--to", str(node_1), "--node-rank", "1")
    assert result.returncode == 0, result.stderr
    assert files_under(node_1) == {"step_2/__1_0.distcp": steps["step_2"]["step_2/__1_0.distcp"]}
    for daemon in daemons:
        assert daemon.stop() == 0

    # The job launched again on two nodes: node 1 of 2 gets all of step_2, which three
    # nodes sealed, for its trainer to reshard.
    replacement.write_config(job={"id": JOB, "nodes": 2})
    resized = replacement.root / "resized"
    result = restore(replacement, "--to", str(resized), "--node-rank", "1")
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout and "passed over" not in result.stdout
    assert files_under(resized) == steps["step_2"]


def test_a_set_missing_a_nodes_part_is_passed_over(
        nodes: list[Workspace], daemons: list[Daemon], replacement: Workspace, s3: Any,
        bucket: str) -> None:
    # Node 2 was reclaimed before it wrote step_2: nodes 0 and 1 sealed their parts of it.
    steps = write_steps(nodes, s3, bucket, step_2_ranks=[0, 1])
    target = replacement.root / "restored"
    result = restore(replacement, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout and "passed over: step_2" in result.stdout
    assert "no part from node 2 of 3" in result.stderr
    assert files_under(target) == steps["step_1"]
    # One node's part of step_2 exists, but the set is not complete for the job.
    result = restore(replacement, "--to", str(replacement.root / "n0"), "--node-rank", "0")
    assert result.returncode == 0, result.stderr
    assert files_under(replacement.root / "n0") == {
        "step_1/__0_0.distcp": steps["step_1"]["step_1/__0_0.distcp"],
        "step_1/.metadata": steps["step_1"]["step_1/.metadata"]}


def test_a_corrupt_object_in_one_nodes_part_makes_restore_fall_back(
        nodes: list[Workspace], daemons: list[Daemon], replacement: Workspace, s3: Any,
        bucket: str) -> None:
    steps = write_steps(nodes, s3, bucket, step_2_ranks=[0, 1, 2])
    shard = "step_2/__2_0.distcp"
    s3.put_object(Bucket=bucket, Key=PREFIX + shard, Body=os.urandom(len(steps["step_2"][shard])))
    target = replacement.root / "restored"
    result = restore(replacement, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout and "passed over: step_2" in result.stdout
    assert f"{PREFIX}{shard}: checksum differs" in result.stderr
    assert files_under(target) == steps["step_1"]


def lists_config(s3: Any, bucket: str, rank: int) -> bool:
    part = json.loads(s3.get_object(Bucket=bucket, Key=part_key(PREFIX, JOB, "step_2", rank))
                      ["Body"].read())
    return "step_2/config.json" in [f["path"] for f in part["files"]]


def test_one_file_every_node_wrote_alike_with_other_checksum_settings_is_restored(
        nodes: list[Workspace], replacement: Workspace, s3: Any, bucket: str) -> None:
    """Every node writes the same step_2/config.json (a launcher's copy of the run's config),
    but node 1 uploads with SHA256 and node 2 in 5 MiB parts: their parts list it with other
    checksums, yet the bytes are the same and step_2 is the newest complete set."""
    for rank, transfer in ((1, {"checksum_algorithm": "SHA256"}),
                           (2, {"multipart_threshold": 5 * 2**20,
                                "multipart_chunksize": 5 * 2**20})):
        nodes[rank].write_config(job={"id": JOB, "nodes": NODES, "rank": rank},
                                 transfer=transfer)
    shared = os.urandom(6 * 2**20)
    daemons = [node.start_daemon() for node in nodes]
    try:
        steps = write_steps(nodes, s3, bucket, step_2_ranks=[0, 1, 2])
        for node in nodes:
            (node.checkpoints / "step_2" / "config.json").write_bytes(shared)
        wait_for(lambda: all(lists_config(s3, bucket, rank) for rank in range(NODES)),
                 timeout=60)
        target = replacement.root / "restored"
        result = restore(replacement, "--to", str(target))
        assert result.returncode == 0, result.stderr
        assert "restored step_2" in result.stdout and "passed over" not in result.stdout
        assert files_under(target) == steps["step_2"] | {"step_2/config.json": shared}
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
    # Retention cannot check those bytes: step_2 does not count as a kept set, step_1 stays.
    planned = prune(nodes[0], "--keep-sets", "1", "--dry-run")
    assert not [line for line in planned if "step_1" in line], planned


@pytest.mark.parametrize(("job", "rank", "message"), [
    (None, "0", "--node-rank needs a multi-node job config"),
    ({"id": JOB, "nodes": NODES}, "3", "--node-rank must be between 0 and 2"),
    ({"id": JOB, "nodes": NODES}, "-1", "--node-rank must be between 0 and 2"),
])
def test_node_rank_without_a_job_or_out_of_range_is_a_usage_error(
        workspace: Workspace, job: dict[str, Any] | None, rank: str, message: str) -> None:
    if job is not None:
        workspace.write_config(job=job)
    result = workspace.cli("restore", "-c", "config.yaml", "--node-rank", rank)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"spotwatch: error: {message}" + (
        " (job.id and job.nodes, or SPOTWATCH_JOB_ID and SPOTWATCH_JOB_NODES)" if job is None
        else f" (job.nodes is {NODES}), got {rank}")]


def flush(node: Workspace) -> None:
    result = node.cli("flush", "-c", str(node.config_file))
    assert result.returncode == 0, result.stderr


def prune(node: Workspace, *args: str) -> list[str]:
    result = node.cli("prune", "-c", str(node.config_file), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_retention_keeps_the_newest_sets_complete_for_the_job(
        nodes: list[Workspace], replacement: Workspace, s3: Any, bucket: str) -> None:
    for age, step in ((900, "step_1"), (600, "step_2"), (300, "step_3")):
        for rank, node in enumerate(nodes[:2] if step == "step_3" else nodes):
            save_shards(node, rank, step, age_seconds=age)
    for node in nodes:
        flush(node)
    assert sealed(s3, bucket, "step_2", range(NODES))
    parts_of = {step: {part_key(PREFIX, JOB, step, rank) for rank in range(NODES)}
                for step in ("step_1", "step_2")}
    before = keys_in(s3, bucket)

    # step_3 lacks node 2's part: it is newer than the kept set, so it stays; step_2 is the
    # newest set complete for the job and stays; step_1 goes. Node 1 deletes only its own.
    lines = prune(nodes[1], "--keep-sets", "1")
    assert lines[-1] == "deleted 2 objects"
    gone = before - keys_in(s3, bucket)
    assert gone == {part_key(PREFIX, JOB, "step_1", 1), f"{PREFIX}step_1/__1_0.distcp"}
    assert lines.index(f"deleted s3://{bucket}/{part_key(PREFIX, JOB, 'step_1', 1)} "
                       "(retention)") == 0  # its part before its files

    # Rank 0 removes what is left of the dropped set, the other nodes' parts and files too.
    prune(nodes[0], "--keep-sets", "1")
    left = keys_in(s3, bucket)
    assert not [key for key in left if "step_1" in key]
    assert parts_of["step_2"] <= left
    assert {f"{PREFIX}step_3/__0_0.distcp", part_key(PREFIX, JOB, "step_3", 0)} <= left

    result = restore(replacement, "--to", str(replacement.root / "r"))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout and "passed over: step_3" in result.stdout


def test_a_file_deleted_on_one_node_takes_that_nodes_part_first(
        nodes: list[Workspace], s3: Any, bucket: str) -> None:
    for rank, node in enumerate(nodes):
        save_shards(node, rank, "step_1")
        flush(node)
    (nodes[2].checkpoints / "step_1" / "__2_0.distcp").unlink()
    lines = prune(nodes[2], "--delete")
    assert lines == [
        f"deleted s3://{bucket}/{part_key(PREFIX, JOB, 'step_1', 2)} (deleted locally)",
        f"deleted s3://{bucket}/{PREFIX}step_1/__2_0.distcp (deleted locally)",
        "deleted 2 objects"]
    assert sealed(s3, bucket, "step_1", [0, 1])


def test_a_file_every_node_wrote_deleted_on_one_node_stays_for_the_others(
        nodes: list[Workspace], replacement: Workspace, s3: Any, bucket: str) -> None:
    """Every rank writes the same config.json beside its shard. One node deleting its copy
    lets go of it in its own part only: the object stays, as the other parts list it, and the
    set still restores whole. Old: the object was deleted, and the job's set was incomplete
    for good (restore: no complete checkpoint set)."""
    config = b'{"model": "llama", "layers": 80}'
    for rank, node in enumerate(nodes):
        save_shards(node, rank, "step_1")
        (node.checkpoints / "step_1" / "config.json").write_bytes(config)
        flush(node)
    (nodes[1].checkpoints / "step_1" / "config.json").unlink()
    lines = prune(nodes[1], "--delete")
    assert lines == [
        f"deleted s3://{bucket}/{part_key(PREFIX, JOB, 'step_1', 1)} (deleted locally)",
        f"sealed s3://{bucket}/{PREFIX}step_1 again with the files left of it (a new part of "
        "its manifest)",
        "deleted 1 objects"]
    assert f"{PREFIX}step_1/config.json" in keys_in(s3, bucket)
    part = json.loads(object_bytes(s3, bucket, part_key(PREFIX, JOB, "step_1", 1)))
    assert [entry["path"] for entry in part["files"]] == ["step_1/__1_0.distcp"]
    # Let go of once: the next prune has nothing more to do.
    assert prune(nodes[1], "--delete") == ["deleted 0 objects"]
    result = restore(replacement, "--to", str(replacement.root / "r"))
    assert result.returncode == 0, result.stderr
    assert files_under(replacement.root / "r")["step_1/config.json"] == config
    # Once every node deleted it, it goes.
    for rank in (0, 2):
        (nodes[rank].checkpoints / "step_1" / "config.json").unlink()
    prune(nodes[0], "--delete")
    assert f"{PREFIX}step_1/config.json" in keys_in(s3, bucket)  # node 2's part lists it
    prune(nodes[2], "--delete")
    assert f"{PREFIX}step_1/config.json" not in keys_in(s3, bucket)
    assert sealed(s3, bucket, "step_1", [0, 1, 2])


def step_1_dropped_for_all(daemon: Daemon, s3: Any, bucket: str, timeout: float) -> None:
    """Rank 0's daemon drops step_1 for every node, keeping step_2, then stops cleanly."""
    wait_for(lambda: not [key for key in keys_in(s3, bucket) if "step_1" in key],
             timeout=timeout)
    assert sealed(s3, bucket, "step_2", range(NODES))
    assert daemon.stop() == 0


def killed(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait()


def test_retention_goes_on_after_a_peers_notice(
        nodes: list[Workspace], s3: Any, bucket: str) -> None:
    nodes[0].write_config(job={"id": JOB, "nodes": NODES, "rank": 0}, sync={"keep_sets": 1})
    daemon = nodes[0].start_daemon()
    try:
        # Node 2 gets a rebalance recommendation: node 0 flushes with it, but it stays.
        publish_as_peer(s3, bucket, PREFIX, JOB, 2, Notice.make(NoticeKind.REBALANCE, None, "now"))
        assert daemon.wait_for_event("notice_detected")["source"] == "peer"
        daemon.wait_for_event("flush_done")
        # Nodes 1 and 2 seal their parts first; node 0's daemon then uploads and seals its own.
        for rank in [*range(1, NODES), 0]:
            save_shards(nodes[rank], rank, "step_1", age_seconds=600)
            save_shards(nodes[rank], rank, "step_2", age_seconds=300)
            if rank > 0:
                flush(nodes[rank])
        wait_for(lambda: sealed(s3, bucket, "step_2", range(NODES)), timeout=60)
        # Rank 0 keeps step_2, the newest set complete for the job, and drops step_1 for all.
        step_1_dropped_for_all(daemon, s3, bucket, timeout=60)
    finally:
        killed(daemon)


def test_rank_0_prunes_for_its_peers_seals_with_nothing_changed_here(
        nodes: list[Workspace], s3: Any, bucket: str) -> None:
    """Rank 0 sealed its part of step_2 and pruned (step_2 not yet complete for the job: step_1
    kept). The other nodes seal theirs later, nothing changing on rank 0: it prunes again all
    the same, and step_1 goes for every node. Old: rank 0 never pruned again until its own
    next change, and step_1 stayed."""
    for rank in range(1, NODES):
        save_shards(nodes[rank], rank, "step_1", age_seconds=600)
        flush(nodes[rank])
    nodes[0].write_config(job={"id": JOB, "nodes": NODES, "rank": 0}, sync={"keep_sets": 1},
                          log={"level": "debug", "format": "json"})
    save_shards(nodes[0], 0, "step_1", age_seconds=600)
    daemon = nodes[0].start_daemon()
    try:
        wait_for(lambda: sealed(s3, bucket, "step_1", range(NODES)), timeout=60)
        save_shards(nodes[0], 0, "step_2", age_seconds=300)
        wait_for(lambda: sealed(s3, bucket, "step_2", [0]), timeout=60)
        pruned = len(daemon.named("prune_done"))
        daemon.wait_for_event("prune_done", count=pruned + 1, timeout=60)  # after its seal
        assert sealed(s3, bucket, "step_1", range(NODES))  # step_2 is not complete yet
        for rank in range(1, NODES):
            save_shards(nodes[rank], rank, "step_2", age_seconds=300)
            flush(nodes[rank])
        step_1_dropped_for_all(daemon, s3, bucket, timeout=JOB_PRUNE_SECONDS + 30)
    finally:
        killed(daemon)


def test_a_rerun_restore_onto_files_already_there_keeps_the_sets_parts(
        nodes: list[Workspace], replacement: Workspace, s3: Any, bucket: str) -> None:
    """Node 0 of the job launched again on two nodes restores step_1, which three nodes
    sealed, into its watched directory; its instance is replaced but the checkpoint volume
    kept (a fresh state directory), and it restores again. The files already there are
    recorded as in S3 like the downloaded ones: the node uploads nothing again and does not
    seal a 2-node part of step_1 over node 0's 3-node part (step_1 would lose its last
    complete node count, and restore would find no checkpoint)."""
    for rank, node in enumerate(nodes):
        save_shards(node, rank, "step_1")
        flush(node)
    replacement.write_config(job={"id": JOB, "nodes": 2, "rank": 0})
    for _ in range(2):
        shutil.rmtree(replacement.root / "state", ignore_errors=True)
        result = restore(replacement, "--node-rank", "0")
        assert result.returncode == 0, result.stderr
    assert flush_summary(replacement.cli("flush", "-c", str(replacement.config_file)))[
        "files"] == 0
    assert json.loads(object_bytes(s3, bucket, part_key(PREFIX, JOB, "step_1", 0)))[
        "job"]["nodes"] == NODES
    result = restore(nodes[1], "--to", str(nodes[1].root / "whole"))
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout


def save_deepspeed_step(nodes: list[Workspace], step: str, ranks: range | list[int]
                        ) -> dict[str, bytes]:
    """What DeepSpeed writes for a step: each rank its states; rank 0 then `latest`."""
    files = {}
    for rank in ranks:
        name = f"{step}/mp_rank_{rank:02d}_model_states.pt"
        files[name] = save_checkpoint(nodes[rank].checkpoints / name, 120_000 + rank)
    (nodes[0].checkpoints / "latest.tmp").write_text(step)
    (nodes[0].checkpoints / "latest.tmp").rename(nodes[0].checkpoints / "latest")
    return files


def pointer_sealed(s3: Any, bucket: str, text: str) -> bool:
    return (part_key(PREFIX, JOB, "latest", 0) in keys_in(s3, bucket)
            and object_bytes(s3, bucket, PREFIX + "latest") == text.encode())


def test_a_pointer_only_rank_0_writes_comes_back_on_every_node_naming_the_step_restored(
        nodes: list[Workspace], daemons: list[Daemon], replacement: Workspace, s3: Any,
        bucket: str) -> None:
    """DeepSpeed's `latest`, written by rank 0 alone, is a set only rank 0 seals a part of.
    Every node needs it (without it DeepSpeed's load starts from scratch): restore brings it
    back beside the step it restores, on each node, naming that step, also when the step it
    named is not complete for the job and an older one is restored."""
    step_100 = save_deepspeed_step(nodes, "global_step100", range(NODES))
    wait_for(lambda: sealed(s3, bucket, "global_step100", range(NODES))
             and pointer_sealed(s3, bucket, "global_step100"), timeout=60)
    for rank in range(NODES):
        target = replacement.root / f"node_{rank}"
        result = restore(replacement, "--to", str(target), "--node-rank", str(rank))
        assert result.returncode == 0, result.stderr
        assert "restored global_step100" in result.stdout
        assert (target / "latest").read_text() == "global_step100"
        name = f"global_step100/mp_rank_{rank:02d}_model_states.pt"
        assert (target / name).read_bytes() == step_100[name]

    # Node 2 is reclaimed before it writes global_step200; rank 0 points `latest` at it.
    save_deepspeed_step(nodes, "global_step200", [0, 1])
    wait_for(lambda: sealed(s3, bucket, "global_step200", [0, 1])
             and pointer_sealed(s3, bucket, "global_step200"), timeout=60)
    target = replacement.root / "after"
    result = restore(replacement, "--to", str(target), "--node-rank", "1")
    assert result.returncode == 0, result.stderr
    assert "restored global_step100" in result.stdout
    assert (target / "latest").read_text() == "global_step100"
    for daemon in daemons:
        assert daemon.stop() == 0


def part_sealed_after(s3: Any, bucket: str, step: str, rank: int, moment: float) -> bool:
    key = part_key(PREFIX, JOB, step, rank)
    if key not in keys_in(s3, bucket):
        return False
    return float(json.loads(object_bytes(s3, bucket, key))["sealed_at"]) > moment


def test_a_pointer_each_node_writes_comes_back_though_one_nodes_is_stale(
        nodes: list[Workspace], daemons: list[Daemon], replacement: Workspace, s3: Any,
        bucket: str) -> None:
    """Node-local storage: each node writes its own `latest`. Node 2 is reclaimed before
    global_step200, its `latest` still naming global_step100: the parts list other bytes for
    one key, which for a pointer is no corrupt set. It comes back as the part sealed last has
    it, made to name the step restored."""
    for step, ranks in (("global_step100", range(NODES)), ("global_step200", range(2))):
        before = time.time()
        for rank in ranks:
            name = f"{step}/mp_rank_{rank:02d}_model_states.pt"
            save_checkpoint(nodes[rank].checkpoints / name, 120_000 + rank)
            (nodes[rank].checkpoints / "latest.tmp").write_text(step)
            (nodes[rank].checkpoints / "latest.tmp").rename(nodes[rank].checkpoints / "latest")
        wait_for(lambda: sealed(s3, bucket, step, ranks) and all(  # noqa: B023
            part_sealed_after(s3, bucket, "latest", rank, before) for rank in ranks),  # noqa: B023
            timeout=60)
    target = replacement.root / "after"
    result = restore(replacement, "--to", str(target), "--node-rank", "1")
    assert result.returncode == 0, result.stderr
    assert "restored global_step100" in result.stdout
    assert "companion_skipped" not in result.stderr
    assert (target / "latest").read_text() == "global_step100"
    for daemon in daemons:
        assert daemon.stop() == 0
