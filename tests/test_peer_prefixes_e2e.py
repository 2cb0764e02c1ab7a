"""Two `spotwatch run` daemons of one job whose watch lists differ: rank 0 watches [tb/, pj/]
(TensorBoard logs, checkpoints), rank 1 [pj/] only. They share pj/, so a spot notice on
either reaches the other's trainer and flushes it, and two of them claiming one rank are
caught by both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator

from .conftest import Daemon, Workspace, keys_in, wait_for

WATCHES = [["tb/", "pj/"], ["pj/"]]
NOTICES = "{}.spotwatch/jobs/llama/notices/node-{}.json"


class Node:
    def __init__(self, space: Workspace, imds: ImdsEmulator) -> None:
        self.space = space
        self.imds = imds
        self.daemon: Daemon | None = None

    def notice(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.space.root / "run" / "notice.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def notice_from(self, source: str) -> dict[str, Any] | None:
        notice = self.notice()
        return notice if notice is not None and notice.get("source") == source else None

    def start(self) -> Daemon:
        self.daemon = self.space.start_daemon()
        return self.daemon


def job_nodes(tmp_path: Path, bucket: str, stack: ExitStack,
              ranks: list[int], **job: Any) -> list[Node]:
    nodes = []
    for index, (rank, prefixes) in enumerate(zip(ranks, WATCHES, strict=True)):
        root = tmp_path / f"node{index}"
        watch = []
        for prefix in prefixes:
            (root / prefix).mkdir(parents=True)
            watch.append({"path": str(root / prefix), "prefix": prefix})
        imds = stack.enter_context(ImdsEmulator())
        # The checkpoints (pj/) are where the trainer's shards go.
        space = Workspace(root, root / "pj/", root / "config.yaml", bucket, imds.url)
        space.write_config(watch=watch, job={"id": "llama", "nodes": 2, "rank": rank, **job},
                           sync={"mode": "on-notice"})
        nodes.append(Node(space, imds))
    return nodes


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as opened:
        yield opened


@pytest.fixture
def running(stack: ExitStack) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        if node.daemon is not None and node.daemon.process.poll() is None:
            node.daemon.process.kill()
            node.daemon.process.wait()


def test_a_spot_notice_on_either_node_reaches_the_other_through_the_prefix_they_share(
        tmp_path: Path, bucket: str, s3: Any, stack: ExitStack, running: list[Node]) -> None:
    running += job_nodes(tmp_path, bucket, stack, [0, 1])
    first, second = running
    for rank, node in enumerate(running):
        (node.space.checkpoints / "step_1").mkdir()
        (node.space.checkpoints / "step_1" / f"shard-{rank}.pt").write_bytes(b"x" * 10_000)
        node.start()

    first.imds.fire_spot_interruption(in_seconds=120)
    own = wait_for(lambda: first.notice_from("imds"))
    learnt = wait_for(lambda: second.notice_from("peer"))
    assert (learnt["peer_rank"], learnt["deadline"]) == (0, own["deadline"])
    assert second.daemon is not None
    second.daemon.wait_for_event("flush_done")
    wait_for(lambda: "pj/step_1/shard-1.pt" in keys_in(s3, bucket))
    # Published on each of rank 0's prefixes.
    assert {NOTICES.format(prefix, 0) for prefix in WATCHES[0]} <= keys_in(s3, bucket)

    second.imds.fire_spot_interruption(in_seconds=110)
    wait_for(lambda: second.notice_from("imds"))
    learnt = wait_for(lambda: (first.notice() or {}).get("peer_rank") == 1 and first.notice())
    assert learnt["source"] == "peer"
    body = s3.get_object(Bucket=bucket, Key=NOTICES.format("pj/", 1))["Body"].read()
    assert [n["id"] for n in json.loads(body)["notices"]] == [
        wait_for(lambda: second.notice_from("imds"))["id"]]  # rank 0's not echoed
    for node in running:
        assert node.daemon is not None
        assert node.daemon.stop() == 0


def test_two_nodes_claiming_one_rank_are_caught_whatever_else_they_watch(
        tmp_path: Path, bucket: str, stack: ExitStack, running: list[Node]) -> None:
    running += job_nodes(tmp_path, bucket, stack, [0, 0], peer_poll_interval=0.05)
    daemons = [node.start() for node in running]
    for daemon in daemons:
        clash = daemon.wait_for_event("rank_claimed_twice")
        assert clash["rank"] == 0
