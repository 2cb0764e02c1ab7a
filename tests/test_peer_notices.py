"""Peer notices on the in-memory store with a fake clock: publish and learn, no loss when nodes
publish at once, stale notices ignored, failures counted, malformed objects harmless; and a
huge object in the channel, on moto over HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import S3ObjectStore
from spotwatch.config import TransferSettings, load_config
from spotwatch.errors import ConfigError
from spotwatch.model import Notice, NoticeKind, PeerWithdrawal
from spotwatch.notices.peers import (
    MAX_NODE_OBJECT_BYTES,
    STARTUP_GRACE,
    PeerChannel,
    PeerPoller,
    PeerPublisher,
    channel_prefix,
    decode_node_object,
    encode_entry,
    utc_now,
)

from .conftest import REGION, wait_for
from .memory_store import FakeClock, InMemoryObjectStore

PREFIX = "run1/.spotwatch/jobs/llama/notices/"
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


def wall_of(clock: FakeClock) -> Callable[[], datetime]:
    return lambda: EPOCH + timedelta(seconds=clock())


def spot(clock: FakeClock, in_seconds: float = 120, tag: str = "") -> Notice:
    deadline = wall_of(clock)() + timedelta(seconds=in_seconds)
    return Notice.make(NoticeKind.SPOT_INTERRUPTION, deadline, "terminate",
                       deadline.isoformat() + tag, detail="terminate")


class Job:
    """A job's nodes on one store: each with its channel and its poller."""

    def __init__(self, nodes: int = 3, clock: FakeClock | None = None,
                 started_at: datetime | None = None) -> None:
        self.store = InMemoryObjectStore()
        self.clock = clock or FakeClock()
        wall = wall_of(self.clock)
        self.channels = [PeerChannel(self.store, PREFIX, rank, wall) for rank in range(nodes)]
        self.failures = [0] * nodes
        self.pollers = [PeerPoller(channel, 1.0, lambda notice: None,
                                   started_at=started_at or wall(), wall=wall,
                                   on_failure=self._counter(channel.rank))
                        for channel in self.channels]

    def _counter(self, rank: int) -> Callable[[], None]:
        def count() -> None:
            self.failures[rank] += 1
        return count

    def publish(self, rank: int, notice: Notice) -> None:
        self.channels[rank].add(notice)
        self.channels[rank].write()


def test_a_notice_published_by_one_node_reaches_every_other_node_once() -> None:
    job = Job()
    notice = spot(job.clock)
    job.publish(1, notice)

    for rank in (0, 2):
        [learnt] = job.pollers[rank].poll_once()
        assert (learnt.kind, learnt.deadline, learnt.peer_rank) == (
            NoticeKind.SPOT_INTERRUPTION, notice.deadline, 1)
        assert learnt.id != notice.id  # acts apart from the node's own IMDS notice
        assert job.pollers[rank].poll_once() == []  # handed on once
    assert job.pollers[1].poll_once() == []  # a node does not learn its own notice


def test_a_steady_poll_is_one_get_of_the_bell() -> None:
    job = Job()
    job.publish(1, spot(job.clock))
    job.pollers[0].poll_once()
    before = dict(job.store.calls)
    for _ in range(5):
        job.pollers[0].poll_once()
    assert {op: job.store.calls[op] - before.get(op, 0) for op in job.store.calls
            if job.store.calls[op] != before.get(op, 0)} == {"get_bytes": 5}


def test_a_nodes_later_notice_is_learnt_too() -> None:
    job = Job()
    job.publish(1, spot(job.clock, tag="first"))
    assert len(job.pollers[0].poll_once()) == 1
    rebalance = Notice.make(NoticeKind.REBALANCE, None, "2030-01-01T00:00:05Z")
    job.publish(1, rebalance)
    [learnt] = job.pollers[0].poll_once()
    assert (learnt.kind, learnt.peer_rank) == (NoticeKind.REBALANCE, 1)


def test_two_nodes_publishing_at_once_are_both_seen() -> None:
    job = Job()
    # Node 1's bell write is held until node 2 wrote its object and its bell.
    gate = job.store.hold("put_bytes", key=job.channels[1].bell_key)
    first = threading.Thread(target=job.publish, args=(1, spot(job.clock, tag="1")))
    first.start()
    assert gate.entered.wait(10)
    job.publish(2, spot(job.clock, tag="2"))
    assert sorted(n.peer_rank or 0 for n in job.pollers[0].poll_once()) == [1, 2]
    gate.release()
    first.join(10)
    assert job.pollers[0].poll_once() == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "ring", "poll"]),
                          st.integers(min_value=1, max_value=3)), max_size=30))
def test_no_interleaving_of_publishers_and_a_poller_loses_a_notice(
        steps: list[tuple[str, int]]) -> None:
    """Each publisher writes its object, then rings; the poller polls whenever. Once every
    publisher has rung after its last write, one more poll has seen every notice."""
    job = Job(nodes=4)
    learnt: set[str] = set()
    published: dict[int, list[str]] = {1: [], 2: [], 3: []}
    for step, rank in steps:
        if step == "write":
            notice = spot(job.clock, tag=f"{rank}-{len(published[rank])}")
            job.channels[rank].add(notice)
            job.channels[rank].write_object()
            published[rank].append(notice.id)
        elif step == "ring":
            job.channels[rank].ring()
        else:
            learnt |= {n.detail + n.id for n in job.pollers[0].poll_once()}
    for rank in published:
        job.channels[rank].ring()
    learnt |= {n.detail + n.id for n in job.pollers[0].poll_once()}
    expected = sum(len(ids) for ids in published.values())
    assert len(learnt) == expected


def test_a_notice_whose_deadline_passed_is_ignored() -> None:
    job = Job()
    job.publish(1, spot(job.clock, in_seconds=120))
    job.clock.advance(121)
    assert job.pollers[0].poll_once() == []


def test_a_replacement_node_ignores_notices_from_before_it_started() -> None:
    clock = FakeClock()
    old = Job(clock=clock)
    rebalance = Notice.make(NoticeKind.REBALANCE, None, "then")  # no deadline
    old.publish(1, rebalance)
    clock.advance(STARTUP_GRACE.total_seconds() + 1)
    wall = wall_of(clock)
    replacement = PeerPoller(PeerChannel(old.store, PREFIX, 2, wall), 1.0, lambda n: None,
                             started_at=wall(), wall=wall)
    assert replacement.poll_once() == []


def test_a_restarted_daemon_joins_a_notice_published_just_before() -> None:
    clock = FakeClock()
    job = Job(clock=clock)
    job.publish(1, Notice.make(NoticeKind.REBALANCE, None, "now"))
    clock.advance(STARTUP_GRACE.total_seconds() - 1)
    wall = wall_of(clock)
    restarted = PeerPoller(PeerChannel(job.store, PREFIX, 0, wall), 1.0, lambda n: None,
                           started_at=wall(), wall=wall)
    assert [n.peer_rank for n in restarted.poll_once()] == [1]


def event(clock: FakeClock, event_id: str = "instance-event-0123") -> Notice:
    deadline = wall_of(clock)() + timedelta(days=3)
    return Notice.make(NoticeKind.SCHEDULED_EVENT, deadline, event_id, detail="system-reboot")


def learnt_then_withdrawn(job: Job) -> tuple[Notice, Notice]:
    """Node 1's event, learnt by node 0, then withdrawn by node 1 and so by node 0: the
    event and node 0's notice of it."""
    notice = event(job.clock)
    job.publish(1, notice)
    [learnt] = job.pollers[0].poll_once()
    assert job.channels[1].withdraw({notice.id: notice.kind.value})
    job.channels[1].write()
    assert job.pollers[0].poll_once() == [PeerWithdrawal(1, frozenset({learnt.id}))]
    return notice, learnt


def test_a_withdrawn_notice_is_withdrawn_on_the_nodes_that_learnt_it_and_never_told_later(
        ) -> None:
    """AWS cancels node 1's maintenance event: the nodes that learnt it are told it is
    withdrawn, once; a node started after it never acts on it."""
    job = Job()
    learnt_then_withdrawn(job)
    assert job.pollers[0].poll_once() == []
    assert job.pollers[2].poll_once() == []  # never learnt it (its first poll came late)
    wall = wall_of(job.clock)
    late = PeerPoller(PeerChannel(job.store, PREFIX, 3, wall), 1.0, lambda n: None,
                      started_at=wall(), wall=wall)
    assert late.poll_once() == []


def test_a_notice_published_again_after_its_withdrawal_is_learnt_again() -> None:
    job = Job()
    notice, learnt = learnt_then_withdrawn(job)
    job.publish(1, notice)  # its newest entry speaks for it
    assert [n.id for n in job.pollers[0].poll_once()] == [learnt.id]


def test_a_rescheduled_event_cancelled_after_is_withdrawn_and_so_is_one_published_twice(
        ) -> None:
    """AWS moves the event earlier under the same EventId (it is published again), then
    cancels it; and an event withdrawn, published again, and withdrawn again: each time the
    peers learn of the withdrawal (one entry per notice in the node's object)."""
    job = Job()
    notice = event(job.clock)
    job.publish(1, notice)
    [learnt] = job.pollers[0].poll_once()
    assert notice.deadline is not None
    earlier = Notice.make(NoticeKind.SCHEDULED_EVENT, notice.deadline - timedelta(days=1),
                          "instance-event-0123", detail="system-reboot")
    assert earlier.id == notice.id
    job.publish(1, earlier)
    assert [n.deadline for n in job.pollers[0].poll_once()] == [earlier.deadline]
    for _ in range(2):
        assert job.channels[1].withdraw({notice.id: notice.kind.value})
        job.channels[1].write()
        assert job.pollers[0].poll_once() == [PeerWithdrawal(1, frozenset({learnt.id}))]
        job.publish(1, earlier)
        assert [n.id for n in job.pollers[0].poll_once()] == [learnt.id]


def test_a_notice_a_restart_removed_from_the_channel_is_withdrawn_all_the_same() -> None:
    """Node 1 published the event, restarted (its object goes) and only then learnt that AWS
    cancelled it: the peers that hold it hear of the withdrawal."""
    job = Job()
    notice = event(job.clock)
    job.publish(1, notice)
    [learnt] = job.pollers[0].poll_once()
    wall = wall_of(job.clock)
    restarted = PeerChannel(job.store, PREFIX, 1, wall)
    restarted.remove_own()
    assert restarted.withdraw({notice.id: notice.kind.value})
    restarted.write()
    assert job.pollers[0].poll_once() == [PeerWithdrawal(1, frozenset({learnt.id}))]
    # Kinds never shared are never written.
    assert not restarted.withdraw({"0" * 16: NoticeKind.SIGTERM.value})


def test_a_starting_node_removes_its_own_earlier_object() -> None:
    job = Job()
    job.publish(1, spot(job.clock))
    job.channels[1].remove_own()
    assert job.channels[1].node_key(1) not in job.store.objects
    assert job.pollers[0].poll_once() == []


@pytest.mark.parametrize("operation", ["get_bytes", "list_objects"])
def test_failed_polls_are_counted_and_the_notice_is_learnt_after(operation: str) -> None:
    job = Job()
    job.publish(1, spot(job.clock))
    key = {"get_bytes": job.channels[0].node_key(1), "list_objects": PREFIX}[operation]
    job.store.fail(operation, times=2, key=key)
    poller = job.pollers[0]
    assert poller.poll_once() == []
    assert poller.poll_once() == []
    assert (poller.failures, job.failures[0], poller.reachability.outage.up) == (2, 2, False)
    [learnt] = poller.poll_once()
    assert learnt.peer_rank == 1
    assert poller.reachability.outage.up is True


def test_no_bell_yet_is_no_failure() -> None:
    job = Job()
    assert job.pollers[0].poll_once() == []
    assert (job.pollers[0].failures, job.pollers[0].reachability.outage.up) == (0, True)


def test_a_starting_node_rings_the_bell_so_no_peer_reads_a_missing_one() -> None:
    """On AWS a GET of a missing key is 403, not 404, for a role whose ListBucket is limited
    to its prefixes (the printed IAM policy): the bell must exist before any notice."""
    job = Job()
    publisher = PeerPublisher(job.channels[1])
    publisher.start()
    try:
        wait_for(lambda: job.channels[1].bell_key in job.store.objects)
    finally:
        publisher.stop(timeout=5)
    assert job.pollers[0].poll_once() == []
    assert job.pollers[0].failures == 0


def valid_entry(kind: NoticeKind = NoticeKind.SPOT_INTERRUPTION) -> dict[str, object]:
    notice = Notice.make(kind, EPOCH + timedelta(minutes=2), "x", detail="terminate")
    return encode_entry(notice, EPOCH)


def node_object(entries: list[object], rank: int = 2) -> bytes:
    return json.dumps({"format": 1, "rank": rank, "notices": entries}).encode()


def test_a_valid_object_decodes() -> None:
    [peer] = decode_node_object(node_object([valid_entry()]), 2)
    assert (peer.rank, peer.kind, peer.published_at) == (2, NoticeKind.SPOT_INTERRUPTION, EPOCH)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_objects_never_crash_and_never_act(body: bytes) -> None:
    assert decode_node_object(body, 2) == []


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["kind", "id", "deadline", "published_at", "detail"]),
       junk=JSON.filter(lambda v: v is not None) | st.sampled_from(
           ["", "manual-flush", "sigterm", "not a time", "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00", "x" * 300]))
def test_an_entry_with_one_field_broken_is_dropped(field: str, junk: object) -> None:
    entry = valid_entry()
    entry[field] = junk
    decoded = decode_node_object(node_object([entry, valid_entry(NoticeKind.REBALANCE)]), 2)
    if field == "detail" and isinstance(junk, str):
        assert len(decoded) == 2  # any text is a detail (cut to its limit)
        return
    assert [p.kind for p in decoded] == [NoticeKind.REBALANCE], (field, junk)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["node-2.json", "node-02.json", "node-x.json", "bell.json", "junk"]))
def test_junk_in_the_channel_is_harmless_to_a_poller(body: bytes, name: str) -> None:
    job = Job()
    job.store.put(PREFIX + name, body)
    job.channels[1].ring()
    assert job.pollers[0].poll_once() == []
    assert job.pollers[0].failures == 0


def test_an_object_of_another_rank_than_its_key_is_ignored() -> None:
    job = Job()
    job.store.put(PREFIX + "node-2.json", node_object([valid_entry()], rank=1))
    job.channels[2].ring()
    assert job.pollers[0].poll_once() == []


def write_config(tmp_path: Path, job: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"watch:\n  - {{path: ckpt, prefix: run1/}}\njob: {job}\n")
    return path


def test_the_channel_is_in_the_jobs_key_space_below_the_first_prefix(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "{id: llama, nodes: 3, rank: 0}"))
    assert channel_prefix(config) == PREFIX
    assert config.job.peer_poll_interval == 1.0


@pytest.mark.parametrize("value", ["0", "-1", "abc", "100000"])
def test_a_bad_peer_poll_interval_is_refused(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, f"{{id: j, nodes: 2, rank: 0, peer_poll_interval: {value}}}")
    with pytest.raises(ConfigError, match=r"job\.peer_poll_interval"):
        load_config(path)


def test_a_huge_bell_is_never_read_whole_and_a_ring_after_it_is_heard(s3: Any,
                                                                      bucket: str) -> None:
    settings = TransferSettings()
    store = S3ObjectStore(make_s3_client(REGION, settings), bucket, settings)
    try:
        channels = [PeerChannel(store, PREFIX, rank) for rank in (0, 1)]
        poller = PeerPoller(channels[0], 1.0, lambda notice: None, started_at=utc_now())
        s3.put_object(Bucket=bucket, Key=channels[0].bell_key, Body=bytes(16 * 2**20))
        read = len(channels[0].read_bell() or b"")
        assert 0 < read <= MAX_NODE_OBJECT_BYTES  # of 16 MiB
        assert poller.poll_once() == [] and poller.failures == 0
        channels[1].add(Notice.make(NoticeKind.REBALANCE, None, "now"))
        channels[1].write()
        assert [notice.peer_rank for notice in poller.poll_once()] == [1]
    finally:
        store.close()
