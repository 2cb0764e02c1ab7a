"""Nodes of one job whose watch lists differ (in order or content) meet on every prefix they
share: notices published on each prefix's channel and learnt once whichever channels carry
them, claims written and checked below each prefix. Channels on moto over HTTP; failures on
the in-memory store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectStore, S3ObjectStore
from spotwatch.config import Config, TransferSettings, load_config
from spotwatch.model import Notice, NoticeKind, PeerWithdrawal
from spotwatch.notices.claims import RankClaims, claims_roots
from spotwatch.notices.peers import (
    PeerChannel,
    PeerPoller,
    PeerPublisher,
    channel_prefixes,
    utc_now,
)

from .conftest import REGION, wait_for
from .memory_store import InMemoryObjectStore

A = "tb/.spotwatch/jobs/llama/notices/"
B = "pj/.spotwatch/jobs/llama/notices/"


def config_watching(tmp_path: Path, rank: int, *prefixes: str) -> Config:
    path = tmp_path / f"config-{rank}.yaml"
    watch = "".join(f"  - {{path: d{i}, prefix: {p}}}\n" for i, p in enumerate(prefixes))
    path.write_text(f"watch:\n{watch}job: {{id: llama, nodes: 3, rank: {rank}}}\n")
    return load_config(path)


def channels_of(store: ObjectStore, config: Config) -> list[PeerChannel]:
    assert config.job.rank is not None
    return [PeerChannel(store, prefix, config.job.rank) for prefix in channel_prefixes(config)]


def poller_of(channels: list[PeerChannel]) -> PeerPoller:
    return PeerPoller(channels, 1.0, lambda notice: None, started_at=utc_now())


@pytest.fixture
def store(s3: Any, bucket: str) -> Iterator[S3ObjectStore]:
    settings = TransferSettings()
    made = S3ObjectStore(make_s3_client(REGION, settings), bucket, settings)
    try:
        yield made
    finally:
        made.close()


def test_every_watched_prefix_has_a_channel_and_a_claims_root(tmp_path: Path) -> None:
    config = config_watching(tmp_path, 0, "tb/", "pj/")
    assert channel_prefixes(config) == [A, B]
    assert claims_roots(config) == [A.replace("notices/", "claims/"),
                                    B.replace("notices/", "claims/")]


def test_a_notice_reaches_every_node_sharing_a_prefix_once(
        tmp_path: Path, store: S3ObjectStore) -> None:
    """Rank 0 watches [tb/, pj/], rank 1 [pj/, tb/], rank 2 [pj/] only."""
    nodes = [channels_of(store, config_watching(tmp_path, rank, *prefixes))
             for rank, prefixes in enumerate([("tb/", "pj/"), ("pj/", "tb/"), ("pj/",)])]
    pollers = [poller_of(channels) for channels in nodes]
    publisher = PeerPublisher(nodes[0])
    publisher.start()
    try:
        notice = Notice.make(NoticeKind.SPOT_INTERRUPTION, utc_now() + timedelta(minutes=2),
                             "terminate")
        publisher.publish(notice)
        wait_for(lambda: not any(channel.unwritten() for channel in nodes[0]))
    finally:
        publisher.stop(timeout=5)
    for poller in pollers[1:]:
        [learnt] = poller.poll_once()  # on both channels of rank 1: one notice
        assert (learnt.peer_rank, learnt.deadline) == (0, notice.deadline)
        assert poller.poll_once() == []

    # Rank 2 publishes on pj/ only: rank 0 hears it there, whatever it lists first.
    nodes[2][0].add(Notice.make(NoticeKind.REBALANCE, None, "now"))
    nodes[2][0].write()
    assert [n.peer_rank for n in pollers[0].poll_once()] == [2]


def test_a_channel_left_behind_by_a_failed_write_never_revives_a_withdrawn_notice(
        tmp_path: Path, store: S3ObjectStore) -> None:
    """Rank 1's withdrawal reached tb/ only (its write on pj/ failed): a node that learnt the
    notice has it withdrawn, and a node reading both channels afresh is never told of it."""
    origin = channels_of(store, config_watching(tmp_path, 1, "tb/", "pj/"))
    early = poller_of(channels_of(store, config_watching(tmp_path, 0, "pj/")))
    notice = Notice.make(NoticeKind.SCHEDULED_EVENT, utc_now() + timedelta(minutes=5), "e-1")
    for channel in origin:
        channel.add(notice)
        channel.write()
    [learnt] = early.poll_once()
    for channel in origin:
        assert channel.withdraw({notice.id: notice.kind.value})
    origin[0].write()  # tb/ only
    assert origin[1].unwritten()
    late = poller_of(channels_of(store, config_watching(tmp_path, 2, "pj/", "tb/")))
    # It reads pj/ (live) first, then tb/ (withdrawn since): the later change speaks.
    assert late.poll_once() == []

    origin[1].write()  # the publisher's retry gets through
    assert early.poll_once() == [PeerWithdrawal(1, frozenset({learnt.id}))]
    assert late.poll_once() == []


def test_one_failing_channel_counts_a_failure_and_hides_no_other_channel() -> None:
    store = InMemoryObjectStore()
    mine = [PeerChannel(store, prefix, 0) for prefix in (A, B)]
    poller = PeerPoller(mine, 1.0, lambda notice: None, started_at=utc_now())
    store.fail("get_bytes", times=None, key=mine[0].bell_key)
    peer = PeerChannel(store, B, 1)
    peer.add(Notice.make(NoticeKind.REBALANCE, None, "now"))
    peer.write()
    assert [n.peer_rank for n in poller.poll_once()] == [1]
    assert (poller.failures, poller.reachability.outage.up) == (1, False)
    store.clear_faults()
    assert poller.poll_once() == []
    assert poller.reachability.outage.up is True


def test_a_failed_publish_is_retried_on_the_failing_channel_only() -> None:
    store = InMemoryObjectStore()
    mine = [PeerChannel(store, prefix, 0) for prefix in (A, B)]
    store.fail("put_bytes", times=2, key=mine[0].node_key(0))
    publisher = PeerPublisher(mine)
    publisher.start()
    try:
        publisher.publish(Notice.make(NoticeKind.REBALANCE, None, "now"))
        written = wait_for(lambda: store.objects.get(mine[1].node_key(0)))
        wait_for(lambda: not mine[0].unwritten())
    finally:
        publisher.stop(timeout=5)
    assert store.objects[mine[1].node_key(0)] is written  # never rewritten by the retries
    assert mine[0].node_key(0) in store.objects


def test_claims_on_one_rank_are_seen_by_nodes_sharing_any_prefix(tmp_path: Path) -> None:
    """Two nodes claim rank 0, one below [tb/, pj/], the other below [pj/]: each sees the
    other live once it rewrote its claim after the other's first."""
    store = InMemoryObjectStore()
    both = RankClaims(store, claims_roots(config_watching(tmp_path, 0, "tb/", "pj/")), 0,
                      "host-a/0123456789abcdef", stale_after_seconds=90)
    one = RankClaims(store, claims_roots(config_watching(tmp_path, 0, "pj/")), 0,
                     "host-b/fedcba9876543210", stale_after_seconds=90)
    assert [key.split("/")[0] for key in both.keys] == ["tb", "pj"]
    both.beat()
    assert both.check() is not None
    one.beat()
    assert one.check() is not None
    later = max(store.objects[key].last_modified for key in (*both.keys, *one.keys))
    for key in (*both.keys, *one.keys):
        store.objects[key].last_modified = later + timedelta(seconds=1)  # rewritten
    check_both, check_one = both.check(), one.check()
    assert check_both is not None and check_both.live == ("host-b/fedcba9876543210",)
    assert check_one is not None and check_one.live == ("host-a/0123456789abcdef",)
    both.withdraw()
    assert not set(both.keys) & set(store.objects)
