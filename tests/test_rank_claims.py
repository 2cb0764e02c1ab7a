"""A rank of a job claimed by two nodes: the seal-time check of a node's part (never overwrite a
part another live node sealed, take over one of a node gone) and the claims' verdicts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from spotwatch.bucket import NamedBucket
from spotwatch.commands.status import gather_status, render_status
from spotwatch.config import WatchDir, load_config
from spotwatch.daemon.metrics import Metrics
from spotwatch.daemon.reporter import Reporter
from spotwatch.keys import part_key
from spotwatch.notices.claims import ClaimCheck, RankClaims, claim_name
from spotwatch.state import StateDir
from spotwatch.sync.engine import SyncEngine
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.sets.claim import CLOCK_SKEW_SECONDS, RankClaim
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, Part
from spotwatch.sync.tracker import ChangeTracker
from spotwatch.sync.uploader import Uploader

from .memory_store import FakeClock, InMemoryObjectStore, crc32_checksum
from .test_failure_paths import pump_until, write
from .test_status_truth import a_daemons_report, holding_the_state_lock

PREFIX = "run/"
JOB = "llama"
NODE = JobNode(JOB, 2, 0)
ME = "host-a/0123456789abcdef"
OTHER = "host-b/fedcba9876543210"
KEY = part_key(PREFIX, JOB, "step_1", 0)


@contextmanager
def engine_on(root: Path, state: Path, store: InMemoryObjectStore, clock: FakeClock,
              claim: RankClaim) -> Iterator[SyncEngine]:
    tracker = ChangeTracker(WatchDir(root, PREFIX, exclude=()), 1.0, 5.0, clock=clock)
    engine = SyncEngine([tracker], Ledger(state / "ledger.sqlite"),
                        lambda done: Uploader(store, done, clock), clock=clock,
                        wall_clock_ns=clock.wall_ns, node=NODE, claim=claim)
    try:
        yield engine
    finally:
        engine.close()


def other_part(store: InMemoryObjectStore, identity: str | None, sealed_at: float) -> None:
    """Node `identity`'s part of step_1 at rank 0 (None: one sealed before identities were
    recorded)."""
    data = b"b" * 10
    store.put(f"{PREFIX}step_1/shard-b.pt", data)
    entry = ManifestEntry(f"{PREFIX}step_1/shard-b.pt", "step_1/shard-b.pt", len(data), 1,
                          crc32_checksum(data))
    manifest = Manifest("step_1", PREFIX, (entry,), sealed_at)
    store.put(KEY, Part(NODE, manifest, identity).to_json().encode())


def part_in(store: InMemoryObjectStore) -> Part:
    return Part.from_json(store.data(KEY), PREFIX, JOB)


def test_a_part_another_live_node_sealed_is_not_overwritten(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = tmp_path / "ckpt"
    write(root, "step_1/shard-a.pt", b"a" * 10)
    claim = RankClaim(ME, 0, checked=False, started_at=time.time() - 60)
    other_part(store, OTHER, sealed_at=time.time())  # sealed while this node runs
    with engine_on(root, tmp_path, store, clock, claim) as engine, capture_logs() as logs:
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: f"{PREFIX}step_1" in engine.sealer.incomplete, clock)
        pump_until(engine, lambda: not engine.sealer.unsealed(), clock, step=1.0)
    assert part_in(store).identity == OTHER  # still the other node's part
    assert f"{PREFIX}step_1/shard-a.pt" in store.objects  # the file itself is uploaded
    clashes = [e for e in logs if e["event"] == "rank_claimed_twice"]
    assert [(e["node"], e["other_node"]) for e in clashes] == [(ME, OTHER)]
    assert claim.rival == OTHER and "claims rank 0 too" in (claim.blocked() or "")


@pytest.mark.parametrize("previous", [OTHER, None])
def test_a_part_of_a_node_gone_is_taken_over(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
        previous: str | None) -> None:
    """A spot instance reclaimed and replaced: its part, sealed before this node started (or
    by a spotwatch that recorded no identity), is sealed again by the replacement with the
    replacement's own save of the set, written since its start (one from before it would
    be judged against the part sealed: sync.sets.sealed)."""
    root = tmp_path / "ckpt"
    shard = write(root, "step_1/shard-a.pt", b"a" * 10)
    claim = RankClaim(ME, 0, checked=False)
    other_part(store, previous, sealed_at=claim.started_at - 30)
    with engine_on(root, tmp_path, store, clock, claim) as engine, capture_logs() as logs:
        saved_since_the_start = clock.wall_ns()
        os.utime(shard, ns=(saved_since_the_start, saved_since_the_start))
        engine.reconcile(quiet_seconds=0)
        pump_until(engine, lambda: part_in(store).identity == ME, clock)
    assert [f.path for f in part_in(store).manifest.files] == ["step_1/shard-a.pt"]
    assert not [e for e in logs if e["event"] == "rank_claimed_twice"]
    assert claim.rival is None


def test_a_part_sealed_just_before_the_start_waits_for_its_claim_to_go_stale(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """The peer poller saw the previous node's claim neither live nor stale: sealing waits,
    and goes on once the claim is stale (never blocked for good)."""
    root = tmp_path / "ckpt"
    write(root, "step_1/shard-a.pt", b"a" * 10)
    claim = RankClaim(ME, 0, checked=True)
    other_part(store, OTHER, sealed_at=claim.started_at - 1)
    with engine_on(root, tmp_path, store, clock, claim) as engine:
        engine.reconcile(quiet_seconds=0)
        # The file is in S3 and its upload's result collected: the set waits for its seal.
        pump_until(engine, lambda: f"{PREFIX}step_1/shard-a.pt" in store.objects
                   and engine.sealer.unsealed() == {f"{PREFIX}step_1"}, clock)
        assert claim.blocked() == "checking that no other node claims rank 0"
        reporter = Reporter("bucket", StateDir(tmp_path / "state"), Metrics())
        reporter.watch_claim(claim)
        assert reporter.sealing_held() == claim.blocked()  # status says why sets wait
        claim.checked(live=[], undecided=[OTHER])
        assert OTHER in (claim.blocked() or "")
        assert reporter.sealing_held() == claim.blocked() and reporter.problems() == []
        for _ in range(20):
            pump_until(engine, lambda: True, clock, step=1.0)
        assert part_in(store).identity == OTHER
        assert engine.sealer.unsealed() == {f"{PREFIX}step_1"}
        claim.checked(live=[], undecided=[])
        pump_until(engine, lambda: part_in(store).identity == ME, clock, step=1.0)
        assert reporter.sealing_held() is None
    assert claim.rival is None


def test_status_says_why_no_part_is_sealed_and_a_clash_is_a_problem_instead(
        tmp_path: Path) -> None:
    claim = RankClaim(ME, 0, checked=True)
    reporter = Reporter("bucket", StateDir(tmp_path / "state"), Metrics())
    reporter.watch_claim(claim)
    claim.checked(live=[], undecided=[OTHER])
    state = tmp_path / "state"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"watch": [{"path": str(tmp_path / "ckpt")}],
                                       "state": {"dir": str(state)}}))
    with holding_the_state_lock(state) as pid:
        (state / "status.json").write_text(json.dumps(
            {**a_daemons_report(pid), "sealing_held": reporter.sealing_held()}))
        text = render_status(gather_status(load_config(config_file),
                                           NamedBucket("bucket", "--bucket")))
    assert (f"sealing held: no part is sealed until then: waiting for the claim of {OTHER} on "
            "rank 0 to go stale") in text.splitlines()
    claim.checked(live=[OTHER], undecided=[])  # a live rival: a problem, said once
    assert reporter.sealing_held() is None
    assert reporter.problems() == [f"rank_claimed_twice: {claim.blocked()}"]


def test_a_part_records_its_node_and_one_without_is_still_read() -> None:
    entry = ManifestEntry(f"{PREFIX}step_1/a.pt", "step_1/a.pt", 1, 1, crc32_checksum(b"a"))
    manifest = Manifest("step_1", PREFIX, (entry,), 1.0)
    text = Part(NODE, manifest).to_json()
    assert '"node"' not in text
    assert Part.from_json(text, PREFIX, JOB).identity is None
    assert Part.from_json(Part(NODE, manifest, ME).to_json(), PREFIX, JOB).identity == ME


CLAIMS_ROOT = "run/.spotwatch/jobs/llama/claims/"
CLAIMS = CLAIMS_ROOT + "node-0/"


def claim_at(store: InMemoryObjectStore, identity: str, when: datetime) -> None:
    store.put(CLAIMS + claim_name(identity), b"{}").last_modified = when


def test_claims_are_judged_by_s3_times() -> None:
    store = InMemoryObjectStore()
    claims = RankClaims(store, CLAIMS_ROOT, 0, ME, stale_after_seconds=90)
    assert claims.check() is None  # its own claim not written yet
    claims.beat()
    [key] = claims.keys
    first = store.objects[key].last_modified
    gone, recent = "host-c/1111111111111111", "host-d/2222222222222222"
    claim_at(store, gone, first - timedelta(seconds=91))
    claim_at(store, recent, first - timedelta(seconds=10))
    claim_at(store, OTHER, first - timedelta(seconds=1))
    check = claims.check()
    assert check is not None
    assert (check.live, sorted(check.undecided)) == ((), sorted([recent, OTHER]))
    claim_at(store, OTHER, first + timedelta(seconds=1))  # rewritten: that node is alive
    store.objects[key].last_modified = first + timedelta(seconds=95)
    check = claims.check()
    assert check is not None and check.live == (OTHER,) and check.undecided == ()
    claims.withdraw()
    assert key not in store.objects


def test_a_clash_is_kept_and_logged_once() -> None:
    claim = RankClaim(ME, 3, checked=True, started_at=datetime.now(UTC).timestamp())
    with capture_logs() as logs:
        claim.checked(live=[OTHER], undecided=[])
        claim.checked(live=[], undecided=[])
        claim.clash(OTHER, "again")
    assert [e["event"] for e in logs] == ["rank_claimed_twice"]
    assert claim.rival == OTHER
    assert claim.may_be_live(OTHER, 0.0)
    assert not claim.may_be_live("host-x/3333333333333333", claim.started_at)
    assert claim.may_be_live("host-x/3333333333333333",
                             claim.started_at + CLOCK_SKEW_SECONDS + 1)



def test_live_claims_on_ranks_past_the_node_count_are_found() -> None:
    """Listed with every rank's claims: a claim on a rank this node's job.nodes has no room
    for counts once it is live; a stale one (a node of an older launch, gone) and claims on
    ranks within the count do not."""
    store = InMemoryObjectStore()
    claims = RankClaims(store, CLAIMS_ROOT, 0, ME, stale_after_seconds=90, nodes=2)
    claims.beat()
    [key] = claims.keys
    first = store.objects[key].last_modified
    past, gone, peer = "host-p/1111111111111111", "host-g/2222222222222222", OTHER
    store.put(f"{CLAIMS_ROOT}node-2/{claim_name(past)}", b"{}").last_modified = (
        first + timedelta(seconds=1))
    store.put(f"{CLAIMS_ROOT}node-5/{claim_name(gone)}", b"{}").last_modified = (
        first - timedelta(seconds=200))
    store.put(f"{CLAIMS_ROOT}node-1/{claim_name(peer)}", b"{}").last_modified = (
        first + timedelta(seconds=1))
    check = claims.check()
    assert check is not None
    assert check == ClaimCheck((), (), (f"rank 2 ({past})",))
    assert RankClaims(store, CLAIMS_ROOT, 0, ME, 90, nodes=3).check() is not None


def test_a_node_count_mismatch_holds_sealing_only_while_it_is_seen() -> None:
    claim = RankClaim(ME, 0, checked=True, nodes=2)
    with capture_logs() as logs:
        claim.checked(live=[], undecided=[], beyond=["rank 2 (host-p/1)"])
        claim.checked(live=[], undecided=[], beyond=["rank 2 (host-p/1)"])
    assert [e["event"] for e in logs] == ["job_size_mismatch"]
    blocked = claim.blocked()
    assert blocked is not None and blocked.startswith("rank 2 (host-p/1) claimed while this "
                                                      "node's job.nodes is 2")
    claim.checked(live=[], undecided=[], beyond=[])
    assert claim.blocked() is None and claim.beyond is None
