"""Three `spotwatch run` daemons of one job on this machine, each with its own directories,
notice file and IMDS emulator, sharing one moto bucket: a notice to one node reaches the
others' notice files within the bound, flushes their pending files, and does not echo."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator
from spotwatch.keys import job_key_space
from spotwatch.model import Notice
from spotwatch.notices.peers import BELL, FORMAT, NOTICES_DIR, encode_entry

from .conftest import Daemon, Workspace, keys_in, wait_for
from .faultproxy import FaultProxy, Request
from .test_metrics import degraded_text, metrics_url, scrape

NODES = 3
# The bound: every other node learns a node's notice within 3 s.
PEER_BOUND_SECONDS = 3.0
CHANNEL = "run1/.spotwatch/jobs/llama/notices/"


class Node:
    def __init__(self, space: Workspace, imds: ImdsEmulator, rank: int) -> None:
        self.space = space
        self.imds = imds
        self.rank = rank
        self.daemon: Daemon | None = None

    @property
    def notice_file(self) -> Path:
        return self.space.root / "run" / "notice.json"

    @property
    def hook_output(self) -> Path:
        return self.space.root / "hook.txt"

    def notice(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.notice_file.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def notice_from(self, source: str, rank: int | None = None) -> dict[str, Any] | None:
        notice = self.notice()
        if notice is None or notice.get("source") != source:
            return None
        return notice if rank is None or notice.get("peer_rank") == rank else None


@pytest.fixture
def job(tmp_path: Path, bucket: str) -> Iterator[list[Node]]:
    with ExitStack() as stack:
        nodes = []
        for rank in range(NODES):
            root = tmp_path / f"node{rank}"
            checkpoints = root / "checkpoints"
            checkpoints.mkdir(parents=True)
            imds = stack.enter_context(ImdsEmulator())
            space = Workspace(root, checkpoints, root / "config.yaml", bucket, imds.url)
            node = Node(space, imds, rank)
            space.write_config(
                job={"id": "llama", "nodes": NODES, "rank": rank},  # default poll interval
                sync={"mode": "on-notice"},  # files wait for a notice: its flush uploads them
                hooks={"command": 'echo "$SPOTWATCH_NOTICE_SOURCE $SPOTWATCH_NOTICE_PEER_RANK"'
                                  f' >> {node.hook_output}'})
            nodes.append(node)
        try:
            yield nodes
        finally:
            for node in nodes:
                if node.daemon is not None and node.daemon.process.poll() is None:
                    node.daemon.process.kill()
                    node.daemon.process.wait()


def detected_at(notice: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(notice["detected_at"])


def node_notices(s3: Any, bucket: str, rank: int) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=f"{CHANNEL}node-{rank}.json")["Body"].read()
    return json.loads(body)["notices"]  # type: ignore[no-any-return]


def publish_as_peer(s3: Any, bucket: str, prefix: str, job_id: str, rank: int,
                    notice: Notice) -> None:
    """What node `rank`'s daemon writes on a notice from its IMDS: its object, then the bell."""
    channel = job_key_space(prefix, job_id) + NOTICES_DIR
    body = {"format": FORMAT, "rank": rank,
            "notices": [encode_entry(notice, datetime.now(UTC))]}
    s3.put_object(Bucket=bucket, Key=f"{channel}node-{rank}.json", Body=json.dumps(body))
    s3.put_object(Bucket=bucket, Key=channel + BELL, Body=uuid.uuid4().hex)

def test_a_notice_to_one_node_reaches_the_others_and_flushes_them(
        job: list[Node], s3: Any, bucket: str) -> None:
    for node in job:
        (node.space.checkpoints / "step_5").mkdir()
        (node.space.checkpoints / "step_5" / f"shard-{node.rank}.pt").write_bytes(
            bytes([node.rank]) * 50_000)
        node.daemon = node.space.start_daemon()
    shards = {f"run1/step_5/shard-{rank}.pt" for rank in range(NODES)}
    assert not shards & keys_in(s3, bucket)  # on-notice: nothing uploaded yet

    origin, peers = job[1], [job[0], job[2]]
    origin.imds.fire_spot_interruption(in_seconds=120)
    own = wait_for(lambda: origin.notice_from("imds"))
    for peer in peers:
        learnt = wait_for(lambda peer=peer: peer.notice_from("peer", 1))
        assert (learnt["kind"], learnt["deadline"]) == (own["kind"], own["deadline"])
        assert (detected_at(learnt) - detected_at(own)).total_seconds() <= PEER_BOUND_SECONDS
        assert peer.daemon is not None
        peer.daemon.wait_for_event("flush_done")
    wait_for(lambda: shards <= keys_in(s3, bucket))
    wait_for(lambda: "last notice:  spot-interruption from node 1 at " in job[2].space.cli(
        "status", "-c", str(job[2].space.config_file)).stdout)
    for peer in peers:
        assert wait_for(lambda peer=peer: peer.hook_output.exists()
                        and peer.hook_output.read_text()) == "peer 1\n"

    # A node's own later notice is published (and learnt by the others, rank 0 included);
    # the peer notice it learnt before was not published again.
    job[0].imds.fire_spot_interruption(in_seconds=110)
    for node in (job[1], job[2]):
        wait_for(lambda node=node: node.notice_from("peer", 0))
    wait_for(lambda: "peer 0\n" in job[1].hook_output.read_text())
    assert [n["id"] for n in node_notices(s3, bucket, 0)] == [
        wait_for(lambda: job[0].notice_from("imds"))["id"]]
    assert [n["id"] for n in node_notices(s3, bucket, 1)] == [own["id"]]
    assert f"{CHANNEL}node-2.json" not in keys_in(s3, bucket)

    for node in job:
        assert node.daemon is not None
        assert node.daemon.stop() == 0


def test_failing_peer_polls_are_visible_and_never_hold_up_imds(
        workspace: Workspace, imds: ImdsEmulator, s3: Any) -> None:
    def bell_reads(request: Request) -> bool:
        return request.method == "GET" and request.path.endswith("/notices/bell")

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("500", bell_reads, times=10**6)
        workspace.write_config(job={"id": "llama", "nodes": 2, "rank": 0},
                               transfer={"max_attempts": 2})
        daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
        url = metrics_url(daemon)
        daemon.wait_for_event("peer_channel_unreachable")
        wait_for(lambda: workspace.status().get("peer_poll_failures", 0) >= 2)
        assert workspace.status()["peers_up"] is False
        wait_for(lambda: scrape(url).get(("spotwatch_peers_up", ())) == 0)
        assert scrape(url)[("spotwatch_peer_poll_errors_total", ())] >= 1
        wait_for(lambda: "peer notices unreachable for " in (degraded_text(url) or ""),
                 timeout=30)

        imds.fire_spot_interruption()  # polled on threads of its own: seen all the same
        assert daemon.wait_for_event("notice_detected")["source"] == "imds"
        wait_for(lambda: f"{CHANNEL}node-0.json" in keys_in(s3, workspace.bucket))

        proxy.rules.clear()
        daemon.wait_for_event("peer_channel_reachable")  # its first poll failed already
        wait_for(lambda: workspace.status().get("peers_up") is True)
        assert daemon.stop() == 0



def test_an_event_aws_cancels_is_withdrawn_on_every_node_and_never_told_to_a_later_one(
        job: list[Node], s3: Any, bucket: str) -> None:
    """Node 1's maintenance event reaches node 0; AWS cancels it: node 0's notice file no
    longer says the instance is going away, and node 2, started after, is never told."""
    origin, peer, late = job[1], job[0], job[2]
    origin.daemon = origin.space.start_daemon()
    peer.daemon = peer.space.start_daemon()
    origin.imds.schedule_event(in_seconds=300)
    wait_for(lambda: origin.notice_from("imds"))
    learnt = wait_for(lambda: peer.notice_from("peer", 1))
    assert learnt["kind"] == "scheduled-event"
    origin.imds.cancel_event()
    cancelled = peer.daemon.wait_for_event("notice_cancelled")
    assert (cancelled["id"], cancelled["reason"]) == (
        learnt["id"], "withdrawn by the node of rank 1, whose notice it was")
    wait_for(lambda: peer.notice() is None and origin.notice() is None)
    [entry] = node_notices(s3, bucket, 1)
    assert entry["withdrawn_at"] is not None

    late.daemon = late.space.start_daemon()
    late.daemon.wait_for_event("daemon_started")
    # Its peer poller has read the channel (its bell answered) once its status says so.
    wait_for(lambda: late.space.status().get("peers_up") is True)
    assert not late.daemon.named("notice_detected") and late.notice() is None
    for node in job:
        assert node.daemon is not None
        assert node.daemon.stop() == 0
