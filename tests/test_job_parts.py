"""When a multi-node job's set is complete, on the in-memory store: every rank's valid part,
no key two nodes wrote differently; restore never picks another (fast unit and property
tests; tests/test_job_sets.py runs three daemons against moto)."""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotwatch.config import JobSettings
from spotwatch.keys import S3_KEY_MAX_BYTES, manifest_key, part_key, storable_key
from spotwatch.sync.pruner import gone_for_job, job_deletions, plan_deletions
from spotwatch.sync.restore.candidates import restore_candidates
from spotwatch.sync.restore.set_fetch import RestoreReport, restore_newest
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, JobSet, Part
from spotwatch.sync.sets.remote import list_job_sets

from .memory_store import InMemoryObjectStore, crc32_checksum

PREFIX = "run/"
JOB = "job-7"
SHARED = "shared.bin"


def entry(set_name: str, name: str, data: bytes, mtime_ns: int) -> ManifestEntry:
    path = f"{set_name}/{name}"
    return ManifestEntry(PREFIX + path, path, len(data), mtime_ns, crc32_checksum(data))


def put_part(store: InMemoryObjectStore, nodes: int, rank: int, set_name: str,
             files: dict[str, bytes], mtime_ns: int, job_id: str = JOB,
             written_as: JobNode | None = None) -> None:
    """Upload a node's files and seal its part; written_as: the job fields the part records
    (another job, node count or rank than the key it is stored at)."""
    for name, data in files.items():
        store.put(f"{PREFIX}{set_name}/{name}", data)
    manifest = Manifest.build(set_name, PREFIX, [entry(set_name, name, data, mtime_ns)
                                                 for name, data in files.items()])
    node = written_as or JobNode(job_id, nodes, rank)
    store.put(part_key(PREFIX, JOB, set_name, rank), Part(node, manifest).to_json().encode())


def restore_job(store: InMemoryObjectStore, destination: Path, nodes: int,
                node_rank: int | None = None) -> RestoreReport | None:
    candidates = restore_candidates(store, PREFIX, JobSettings(id=JOB, nodes=nodes), node_rank)
    return restore_newest(store, candidates, destination, "CRC32", None)


def shard(rank: int, step: int) -> dict[str, bytes]:
    return {f"__{rank}_0.distcp": f"rank {rank} step {step}".encode() * 50}


def files_under(target: Path) -> set[str]:
    return {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}


def test_a_set_missing_a_ranks_part_is_passed_over(tmp_path: Path) -> None:
    store = InMemoryObjectStore()
    for rank in range(3):
        put_part(store, 3, rank, "step_1", shard(rank, 1), 1_000)
    for rank in (0, 2):
        put_part(store, 3, rank, "step_2", shard(rank, 2), 2_000)
    with capture_logs() as logs:
        report = restore_job(store, tmp_path / "r", 3)
    assert report is not None
    assert (report.set_name, report.passed_over, report.downloaded) == ("step_1", ("step_2",), 3)
    [warning] = [e for e in logs if e["event"] == "set_incomplete"]
    assert (warning["set"], warning["reason"]) == ("step_2", "no part from node 1 of 3")


@pytest.mark.parametrize("malformed", ["garbage", "other job", "rank past its node count",
                                       "other rank", "other set"])
def test_a_malformed_part_counts_as_missing(tmp_path: Path, malformed: str) -> None:
    store = InMemoryObjectStore()
    for rank in range(2):
        put_part(store, 2, rank, "step_1", shard(rank, 1), 1_000)
    put_part(store, 2, 0, "step_2", shard(0, 2), 2_000)
    key = part_key(PREFIX, JOB, "step_2", 1)
    if malformed == "garbage":
        store.put(key, b"{not json")
    elif malformed == "other set":  # step_1's part copied to step_2's key
        store.put(key, store.data(part_key(PREFIX, JOB, "step_1", 1)))
    else:
        node = {"other job": JobNode("job-8", 2, 1),
                "rank past its node count": JobNode(JOB, 1, 1),
                "other rank": JobNode(JOB, 2, 0)}[malformed]
        put_part(store, 2, 1, "step_2", shard(1, 2), 2_000, written_as=node)
    with capture_logs() as logs:
        report = restore_job(store, tmp_path / "r", 2)
    assert report is not None and (report.set_name, report.passed_over) == ("step_1",
                                                                            ("step_2",))
    assert [e["key"] for e in logs if e["event"] == "part_skipped"] == [key]


def test_two_nodes_writing_one_name_differently_is_not_complete(tmp_path: Path) -> None:
    store = InMemoryObjectStore()
    for rank in range(3):
        put_part(store, 3, rank, "step_1", shard(rank, 1), 1_000)
    for rank in range(3):  # nodes 0 and 2 both wrote step_2/shared.bin, differently
        extra = {SHARED: f"written by {rank}".encode()} if rank in (0, 2) else {}
        put_part(store, 3, rank, "step_2", shard(rank, 2) | extra, 2_000)
    with capture_logs() as logs:
        report = restore_job(store, tmp_path / "r", 3)
    assert report is not None and (report.set_name, report.passed_over) == ("step_1",
                                                                            ("step_2",))
    [warning] = [e for e in logs if e["event"] == "set_incomplete"]
    assert warning["reason"].startswith(f"nodes 0 and 2 both wrote {PREFIX}step_2/{SHARED} "
                                        "with different contents")


def test_one_name_written_alike_by_two_nodes_is_restored_once(tmp_path: Path) -> None:
    store = InMemoryObjectStore()
    for rank in range(2):
        put_part(store, 2, rank, "step_1", shard(rank, 1) | {SHARED: b"same"}, 1_000)
    report = restore_job(store, tmp_path / "r", 2)
    assert report is not None and (report.set_name, report.downloaded) == ("step_1", 3)
    assert files_under(tmp_path / "r") == {"step_1/__0_0.distcp", "step_1/__1_0.distcp",
                                           f"step_1/{SHARED}"}


def test_a_file_of_one_node_and_a_directory_of_another_is_not_complete(tmp_path: Path) -> None:
    store = InMemoryObjectStore()
    put_part(store, 2, 0, "step_1", {"x": b"file"}, 1_000)
    put_part(store, 2, 1, "step_1", {"x/y": b"in a directory"}, 1_000)
    with capture_logs() as logs:
        assert restore_job(store, tmp_path / "r", 2) is None
    [warning] = [e for e in logs if e["event"] == "set_incomplete"]
    assert "the nodes' parts clash" in warning["reason"]


def test_the_part_key_must_fit_in_s3_on_a_job() -> None:
    prefix = "p" * 800 + "/"
    name = "s" * (S3_KEY_MAX_BYTES - len(manifest_key(prefix, "")))
    assert len(manifest_key(prefix, name)) == S3_KEY_MAX_BYTES
    assert storable_key(prefix, name) == prefix + name  # a single node: its manifest fits
    with pytest.raises(ValueError, match="set manifest key would be"):
        storable_key(prefix, name, (JOB, 0))  # on a job the part key is the longer one


# -- whatever the parts, restore never picks a set missing a rank or with a conflict ---------

PART_STATES = ("valid", "missing", "garbage", "other job", "other node count")


@st.composite
def job_sets(draw: st.DrawFn) -> tuple[int, list[tuple[list[str], str]]]:
    """(nodes, per set oldest first: each rank's part state, and whether the valid parts all
    list SHARED alike, differently, or not at all)."""
    nodes = draw(st.integers(1, 4))
    sets = draw(st.lists(st.tuples(st.lists(st.sampled_from(PART_STATES), min_size=nodes,
                                            max_size=nodes),
                                   st.sampled_from(["none", "alike", "different"])),
                         min_size=1, max_size=3))
    return nodes, sets


def put_drawn_set(store: InMemoryObjectStore, nodes: int, step: int, states: list[str],
                  shared: str) -> dict[int, dict[str, bytes]]:
    """The parts as drawn; returns the files of each rank whose part is valid."""
    valid: dict[int, dict[str, bytes]] = {}
    for rank, state in enumerate(states):
        files = shard(rank, step)
        if shared != "none":
            files[SHARED] = b"alike" if shared == "alike" else f"rank {rank}".encode()
        set_name = f"step_{step}"
        if state == "garbage":
            store.put(part_key(PREFIX, JOB, set_name, rank), b"\xff")
        elif state != "missing":
            writer = {"valid": JobNode(JOB, nodes, rank), "other job": JobNode("x", nodes, rank),
                      "other node count": JobNode(JOB, nodes + 1, rank)}[state]
            put_part(store, nodes, rank, set_name, files, step * 1_000, written_as=writer)
        if state == "valid":
            valid[rank] = files
    return valid


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=job_sets(), pick_rank=st.booleans())
def test_restore_never_picks_a_set_missing_a_rank_or_with_a_conflict(
        drawn: tuple[int, list[tuple[list[str], str]]], pick_rank: bool) -> None:
    nodes, sets = drawn
    store = InMemoryObjectStore()
    expected: tuple[str, dict[int, dict[str, bytes]]] | None = None
    for step, (states, shared) in enumerate(sets, start=1):
        valid = put_drawn_set(store, nodes, step, states, shared)
        conflict = shared == "different" and len(valid) > 1
        if len(valid) == nodes and not conflict:
            expected = (f"step_{step}", valid)  # sets come oldest first: the newest wins
    node_rank = nodes - 1 if pick_rank else None
    with tempfile.TemporaryDirectory() as temp:
        report = restore_job(store, Path(temp), nodes, node_rank)
        if expected is None:
            assert report is None
            return
        set_name, files = expected
        assert report is not None and report.set_name == set_name
        ranks = [node_rank] if node_rank is not None else list(files)
        assert files_under(Path(temp)) == {f"{set_name}/{name}" for rank in ranks
                                           for name in files[rank]}


# -- a job launched again with another node count ---------------------------------------------

def test_a_job_launched_again_with_other_node_counts_restores_its_older_sets(
        tmp_path: Path) -> None:
    """Four nodes sealed step_1; the job came back on two (step_2: only rank 0 so far), then
    on three. Each set counts for the node count it was sealed with, and a node restoring its
    rank gets the whole older set: which old shards it reads is the trainer's business."""
    store = InMemoryObjectStore()
    for rank in range(4):
        put_part(store, 4, rank, "step_1", shard(rank, 1), 1_000)
    put_part(store, 2, 0, "step_2", shard(0, 2), 2_000)
    for nodes, node_rank in ((2, None), (2, 1), (3, 2), (4, 3)):
        target = tmp_path / f"r{nodes}-{node_rank}"
        with capture_logs() as logs:
            report = restore_job(store, target, nodes, node_rank)
        assert report is not None and (report.set_name, report.passed_over) == (
            "step_1", ("step_2",))
        ranks = [node_rank] if nodes == 4 and node_rank is not None else range(4)
        assert files_under(target) == {f"step_1/{name}" for rank in ranks
                                       for name in shard(rank, 1)}
        resized = [e for e in logs if e["event"] == "set_of_other_job_size"]
        assert bool(resized) == (node_rank is not None and nodes != 4)


@given(st.dictionaries(st.integers(1, 3), st.sets(st.integers(0, 2)), min_size=1),
       st.integers(1, 3))
def test_a_set_is_complete_when_every_rank_of_one_node_count_sealed_it(
        ranks_by_nodes: dict[int, set[int]], nodes_now: int) -> None:
    store = InMemoryObjectStore()
    last_sealed_by: dict[int, int] = {}  # rank -> node count: a part's key has no node count
    for nodes, ranks in ranks_by_nodes.items():
        for rank in ranks:
            if rank < nodes:
                put_part(store, nodes, rank, "step_1", shard(rank, nodes), nodes * 1_000)
                last_sealed_by[rank] = nodes
    sealed: dict[int, set[int]] = {}
    for rank, nodes in last_sealed_by.items():
        sealed.setdefault(nodes, set()).add(rank)
    [job_set] = list_job_sets(store, PREFIX, JOB, nodes_now) if sealed else [None]
    if job_set is None:
        return
    complete = {nodes for nodes, ranks in sealed.items() if ranks == set(range(nodes))}
    assert (job_set.problem() is None) == bool(complete)
    if complete:  # rank 0's part is every node count's: one of them at most is complete
        assert [job_set.nodes] == sorted(complete)
        assert set(job_set.parts) == set(range(job_set.nodes))


# -- retention and mirrored deletions on a job -----------------------------------------------

FILE_POOL = [f"{name}" for name in ("a", "b", "c", "d")]


@st.composite
def remote_job_sets(draw: st.DrawFn) -> tuple[int, list[JobSet]]:
    """(nodes, the job's sets newest first), each rank's part listing some of the pool."""
    nodes = draw(st.integers(1, 3))
    job_sets = []
    for index, set_name in enumerate(draw(st.lists(st.sampled_from(["s1", "s2", "s3", "s4"]),
                                                   unique=True))):
        parts = {}
        for rank in draw(st.sets(st.integers(0, nodes - 1), min_size=1)):
            names = draw(st.lists(st.sampled_from(FILE_POOL), min_size=1, unique=True))
            parts[rank] = Manifest(set_name, PREFIX, tuple(
                entry(set_name, name, b"x", 0) for name in sorted(names)), float(-index))
        job_sets.append(JobSet(set_name, nodes, parts))
    return nodes, job_sets


@given(remote_job_sets(), st.integers(0, 2), st.integers(0, 2), st.data())
def test_a_node_deletes_only_its_own_and_never_what_a_kept_set_lists(
        drawn: tuple[int, list[JobSet]], rank_drawn: int, keep_sets: int,
        data: st.DataObject) -> None:
    nodes, job_sets = drawn
    rank = rank_drawn % nodes
    own_keys = sorted({e.key for s in job_sets if rank in s.parts for e in s.parts[rank].files})
    # Gone locally: any key this node uploaded, also one its part let go of already.
    every_key = sorted({PREFIX + f"{s}/{name}" for s in ("s1", "s2", "s3", "s4")
                        for name in FILE_POOL})
    gone = data.draw(st.sets(st.sampled_from(every_key)))
    complete = {s.set_name for s in job_sets if s.problem() is None}
    mirrored = gone_for_job(sorted(gone), job_sets, rank)
    planned = plan_deletions(PREFIX, lambda relative: True, [s.whole for s in job_sets],
                             mirrored, keep_sets, lambda whole: whole.set_name in complete)
    deletions = job_deletions(planned, PREFIX, job_sets, JobNode(JOB, nodes, rank))
    keys = [d.key for d in deletions]
    part_keys = {part_key(PREFIX, JOB, s.set_name, r): (s, r) for s in job_sets for r in s.parts}
    parts = [k for k in keys if k in part_keys]
    assert keys[:len(parts)] == parts  # every part before any file
    dropped = {part_keys[k][0].set_name for k in parts}
    listed_by_kept = {e.key for s in job_sets if s.set_name not in dropped
                      for e in s.whole.files}
    assert not listed_by_kept & set(keys[len(parts):])
    if rank != 0:
        assert all(part_keys[k][1] == rank for k in parts)  # only its own parts
        # only files its own parts list, or that it uploaded and no part lists any more
        assert set(keys[len(parts):]) <= set(own_keys) | gone
    # A local deletion never takes an object another node's part lists.
    peers = {e.key for s in job_sets for r, p in s.parts.items() if r != rank for e in p.files}
    assert not {d.key for d in deletions[len(parts):] if not d.retires} & peers
    # One no part lists any more goes once this node deleted it: never left behind for good.
    listed = {e.key for s in job_sets for p in s.parts.values() for e in p.files}
    assert {key for key in gone if key not in listed} <= set(keys)


def test_a_shared_file_two_nodes_let_go_of_at_once_is_deleted_after_all() -> None:
    """Ranks 0 and 1 both delete their config.json and prune at the same moment: each plan
    sees the other's part listing it, so each only lets its own part go (the object stays).
    Their parts sealed again without it, the next prune of either deletes the object, which
    no part lists any more: never left behind for good."""
    config = PREFIX + "step_1/config.json"

    def part(rank: int, with_config: bool) -> Manifest:
        names = [f"__{rank}_0.distcp", *(["config.json"] if with_config else [])]
        return Manifest("step_1", PREFIX, tuple(entry("step_1", name, b"x", 0)
                                                for name in names), 0.0)

    def plan(job_set: JobSet, rank: int) -> list[str]:
        gone = gone_for_job([config], [job_set], rank)
        planned = plan_deletions(PREFIX, lambda relative: True, [job_set.whole], gone, 0,
                                 lambda whole: True)
        return [d.key for d in job_deletions(planned, PREFIX, [job_set], JobNode(JOB, 2, rank))]

    before = JobSet("step_1", 2, {0: part(0, True), 1: part(1, True)})
    for rank in (0, 1):  # planned at once: each sees the other's part listing it
        assert plan(before, rank) == [part_key(PREFIX, JOB, "step_1", rank)]
    after = JobSet("step_1", 2, {0: part(0, False), 1: part(1, False)})
    for rank in (0, 1):
        assert plan(after, rank) == [config]
    # One node alone let go: the other's part still lists it, and it waits.
    half = JobSet("step_1", 2, {0: part(0, False), 1: part(1, True)})
    assert plan(half, 0) == []


# -- one name written by two nodes configured differently -------------------------------------

# How a node's transfer settings make the checksum of what it uploads: the algorithm
# (transfer.checksum_algorithm) and, for a multipart upload, the part size
# (transfer.multipart_chunksize; None: one part, a full-object checksum).
UploadSettings = tuple[str, int | None]


def digest(data: bytes, algorithm: str) -> bytes:
    if algorithm == "CRC32":
        return zlib.crc32(data).to_bytes(4, "big")
    return hashlib.sha256(data).digest()


def s3_checksum(data: bytes, settings: UploadSettings) -> str:
    """The checksum S3 records for data uploaded with these settings."""
    algorithm, part_size = settings
    if part_size is None:
        return base64.b64encode(digest(data, algorithm)).decode()
    parts = [data[start:start + part_size] for start in range(0, len(data), part_size)]
    of_parts = b"".join(digest(part, algorithm) for part in parts)
    return f"{base64.b64encode(digest(of_parts, algorithm)).decode()}-{len(parts)}"


def put_part_uploaded_with(store: InMemoryObjectStore, nodes: int, rank: int, set_name: str,
                           files: dict[str, bytes], settings: UploadSettings) -> None:
    """Upload a node's files and seal its part as a node with these transfer settings does."""
    entries = []
    for name, data in files.items():
        path = f"{set_name}/{name}"
        store.put(PREFIX + path, data)
        entries.append(ManifestEntry(PREFIX + path, path, len(data), 2_000,
                                     s3_checksum(data, settings), settings[1], settings[0]))
    part = Part(JobNode(JOB, nodes, rank), Manifest.build(set_name, PREFIX, entries))
    store.put(part_key(PREFIX, JOB, set_name, rank), part.to_json().encode())


upload_settings = st.tuples(st.sampled_from(["CRC32", "SHA256"]), st.sampled_from([None, 4]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=upload_settings, second=upload_settings, same_bytes=st.booleans(),
       last_writer=st.sampled_from([0, 1]))
def test_one_name_written_by_nodes_with_other_transfer_settings(
        first: UploadSettings, second: UploadSettings, same_bytes: bool,
        last_writer: int) -> None:
    """Both nodes wrote step_2/.metadata: with identical bytes the set is complete whatever
    checksum algorithm or part size each node uploaded with (refusing it would restore the
    older step_1 and lose a checkpoint); with other bytes (the same size) it never is,
    whichever node's upload S3 kept (last_writer)."""
    store = InMemoryObjectStore()
    for rank in range(2):
        put_part(store, 2, rank, "step_1", shard(rank, 1), 1_000)
    written = {0: b"metadata of step 2", 1: b"metadata of step 2" if same_bytes
               else b"metadata of step 3"}
    settings_of = {0: first, 1: second}
    for rank in sorted(settings_of, key=lambda rank: rank == last_writer):
        put_part_uploaded_with(store, 2, rank, "step_2",
                               shard(rank, 2) | {".metadata": written[rank]}, settings_of[rank])
    with tempfile.TemporaryDirectory() as temp:
        report = restore_job(store, Path(temp), 2)
        assert report is not None
        assert report.set_name == ("step_2" if same_bytes else "step_1")
        if same_bytes:
            assert (Path(temp) / "step_2/.metadata").read_bytes() == written[0]


def seal_part_as(store: InMemoryObjectStore, set_name: str, rank: int, node: str | None) -> None:
    """Node `rank`'s part of a set, sealed by the node named `node` (None: one sealed by a
    spotwatch that recorded no node)."""
    data = f"{set_name} {rank}".encode()
    name = f"{set_name}/__{rank}_0.distcp"
    store.put(PREFIX + name, data)
    manifest = Manifest.build(set_name, PREFIX, [entry(set_name, f"__{rank}_0.distcp", data, 1)])
    part = json.loads(Part(JobNode(JOB, 2, rank), manifest).to_json())
    if node is not None:
        part["job"]["node"] = node
    store.put(part_key(PREFIX, JOB, set_name, rank), json.dumps(part).encode())


def test_restore_passes_over_a_set_one_node_sealed_two_ranks_of(tmp_path: Path) -> None:
    """A node that took rank 0 by mistake, then was given rank 1 and sealed its part again:
    the rank 0 part it overwrote listed the other node's files, so step_2 is not complete."""
    one, other = "host-a/0123456789abcdef", "host-b/fedcba9876543210"
    store = InMemoryObjectStore()
    seal_part_as(store, "step_1", 0, other)
    seal_part_as(store, "step_1", 1, one)
    seal_part_as(store, "step_2", 0, one)
    seal_part_as(store, "step_2", 1, one)
    candidates = restore_candidates(store, PREFIX, JobSettings(id=JOB, nodes=2), None)
    problems = {candidate.whole.set_name: candidate.problem for candidate in candidates}
    assert problems == {"step_2": f"node {one} sealed the parts of ranks 0, 1: a rank was "
                                  "claimed by two nodes", "step_1": None}
    report = restore_job(store, tmp_path / "restored", 2)
    assert report is not None and report.set_name == "step_1"
    # Parts of an older spotwatch name no node: judged as before.
    old = InMemoryObjectStore()
    seal_part_as(old, "step_2", 0, None)
    seal_part_as(old, "step_2", 1, None)
    [job_set] = list_job_sets(old, PREFIX, JOB, 2)
    assert job_set.problem() is None
