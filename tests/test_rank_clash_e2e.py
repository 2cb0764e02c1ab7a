"""Two `spotwatch run` daemons of one job on this machine, each with its own directories,
sharing one moto bucket: both claiming one rank are caught by both and seal no part; a node
replaced after a crash (its claim left behind) takes its rank over once that claim is stale."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator

from .conftest import Daemon, Workspace, keys_in, wait_for

PARTS = "run1/.spotwatch/jobs/llama/parts/"
CLAIMS = "run1/.spotwatch/jobs/llama/claims/node-0/"
# Claims are rewritten every 30 polls: every 1.5 s here, stale after 4.5 s.
POLL = 0.05


@pytest.fixture
def spaces(tmp_path: Path, bucket: str) -> Iterator[list[Workspace]]:
    """Two nodes' directories, both configured as rank 0 of a job of two (a copied config)."""
    daemons: list[Daemon] = []
    with ExitStack() as stack:
        found = []
        for name in ("a", "b"):
            root = tmp_path / name
            checkpoints = root / "checkpoints"
            checkpoints.mkdir(parents=True)
            imds = stack.enter_context(ImdsEmulator())
            space = Workspace(root, checkpoints, root / "config.yaml", bucket, imds.url)
            space.write_config(job={"id": "llama", "nodes": 2, "rank": 0,
                                    "peer_poll_interval": POLL})
            original = space.start_daemon

            def tracked(*args: str, original: Any = original, **env: str) -> Daemon:
                daemon = original(*args, **env)
                daemons.append(daemon)
                return daemon

            space.start_daemon = tracked  # type: ignore[method-assign]
            found.append(space)
        try:
            yield found
        finally:
            for daemon in daemons:
                if daemon.process.poll() is None:
                    daemon.process.kill()
                    daemon.process.wait()


def identity(space: Workspace) -> str:
    return wait_for(lambda: (space.root / "state" / "node-id").exists()
                    and (space.root / "state" / "node-id").read_text().strip())  # type: ignore[no-any-return]


def parts_in(s3: Any, bucket: str) -> set[str]:
    return {key for key in keys_in(s3, bucket) if key.startswith(PARTS)}


def save_shards(s3: Any, bucket: str, step: str,
                shards: list[tuple[Workspace, str]]) -> None:
    """Each node's trainer saves its shard of the step; returns once all are in S3."""
    for space, shard in shards:
        (space.checkpoints / step).mkdir()
        (space.checkpoints / step / shard).write_bytes(shard.encode() * 1000)
    wait_for(lambda: {f"run1/{step}/{shard}" for _, shard in shards} <= keys_in(s3, bucket))


def test_two_live_nodes_of_one_rank_are_caught_by_both_and_seal_no_part(
        spaces: list[Workspace], s3: Any, bucket: str) -> None:
    a, b = spaces
    first = a.start_daemon()
    second = b.start_daemon()
    clashes = [first.wait_for_event("rank_claimed_twice"),
               second.wait_for_event("rank_claimed_twice")]
    ids = {identity(a), identity(b)}
    assert len(ids) == 2
    for clash in clashes:
        assert clash["rank"] == 0 and clash["level"] == "error"
        assert {clash["node"].split("/")[1], clash["other_node"].split("/")[1]} == ids
    for space in spaces:
        problems = wait_for(lambda space=space: space.status().get("problems"))
        assert len(problems) == 1 and problems[0].startswith("rank_claimed_twice: ")
    shown = a.cli("status", "-c", str(a.config_file)).stdout
    assert "PROBLEM:      rank_claimed_twice: " in shown
    assert "health:       degraded: rank_claimed_twice: " in shown, shown
    for space in spaces:  # what a container's health check asks
        assert space.cli("status", "-c", str(space.config_file), "--healthy").returncode == 1

    # The trainer goes on writing: the files are uploaded, but no part lists them.
    save_shards(s3, bucket, "step_1", [(a, "__0_0.distcp"), (b, "__1_0.distcp")])
    for space in spaces:
        wait_for(lambda space=space: "run1/step_1" in space.status().get("incomplete_sets", []))
    assert parts_in(s3, bucket) == set()


def test_a_replacement_takes_over_the_rank_of_a_node_gone(
        spaces: list[Workspace], s3: Any, bucket: str) -> None:
    a, b = spaces
    old = a.start_daemon()
    (a.checkpoints / "step_1").mkdir()
    (a.checkpoints / "step_1" / "__0_0.distcp").write_bytes(b"a" * 1000)
    wait_for(lambda: f"{PARTS}step_1/node-0.json" in keys_in(s3, bucket))
    old.process.kill()  # reclaimed: its claim stays behind, never withdrawn
    old.process.wait()
    assert any(key.startswith(CLAIMS) for key in keys_in(s3, bucket))

    new = b.start_daemon()
    (b.checkpoints / "step_2").mkdir()
    (b.checkpoints / "step_2" / "__0_0.distcp").write_bytes(b"b" * 1000)
    wait_for(lambda: f"{PARTS}step_2/node-0.json" in keys_in(s3, bucket))
    assert not new.named("rank_claimed_twice")
    assert b.status().get("problems") == []
    new.stop()
    # A clean stop withdraws the node's claim: only the crashed node's is left.
    left = [key for key in keys_in(s3, bucket) if key.startswith(CLAIMS)]
    assert len(left) == 1 and left[0].endswith(f"_{identity(a)}.json")


def test_nodes_launched_with_other_node_counts_seal_nothing_and_say_why(
        spaces: list[Workspace], s3: Any, bucket: str) -> None:
    """Rank 0 of a job of two (a config kept from the last launch) and rank 2 of a job of
    three: sealed with two nodes, step_5 would be complete without rank 2's shards. The node
    that sees a rank past its count seals nothing, says so in status and is degraded."""
    a, b = spaces
    b.write_config(job={"id": "llama", "nodes": 3, "rank": 2, "peer_poll_interval": POLL})
    first = a.start_daemon()
    b.start_daemon()
    mismatch = first.wait_for_event("job_size_mismatch")
    assert mismatch["claimed"][0].startswith("rank 2 (") and mismatch["nodes"] == 2
    problems = wait_for(lambda: a.status().get("problems"))
    assert problems[0].startswith("job_size_mismatch: rank 2 (")
    assert a.cli("status", "-c", str(a.config_file), "--healthy").returncode == 1
    save_shards(s3, bucket, "step_5", [(a, "__0_0.distcp"), (b, "__2_0.distcp")])
    wait_for(lambda: "run1/step_5" in a.status().get("incomplete_sets", []))
    assert f"{PARTS}step_5/node-0.json" not in keys_in(s3, bucket)
