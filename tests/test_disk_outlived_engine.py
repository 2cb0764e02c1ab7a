"""A disk that outlived its state directory, on the engine and the in-memory store: what else
can make a set sealed in S3 dirty at the start (S3 unreachable when a file is judged, a
symlink of the set, a file the set did not list, a job's whole set restored onto one node)
never seals it again with less than it was sealed with (SealedSets.inherit)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.config import WatchDir
from spotwatch.keys import manifest_key, part_key
from spotwatch.model import FileVersion
from spotwatch.sync.engine import SyncEngine
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobNode, Part
from spotwatch.sync.sets.sealed import SealedSets
from spotwatch.sync.tracker import ChangeTracker
from spotwatch.sync.uploader import Uploader

from .memory_store import FakeClock, InMemoryObjectStore
from .test_failure_paths import PREFIX, engine_on, pump_until, quiescent, woken

JOB = "j"
SEALED = ["step_1/a.pt", "step_1/b.pt", "step_1/c.pt"]


def _write(root: Path, relative: str, data: bytes, age_seconds: int = 100) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    dated = time.time_ns() - age_seconds * 10**9
    os.utime(path, ns=(dated, dated))
    return path


def _run(engine: SyncEngine, clock: FakeClock) -> None:
    engine.reconcile(quiet_seconds=0)
    pump_until(engine, lambda: quiescent(engine) and not engine.uploader.in_flight(), clock,
               step=1.0)


def _listed(store: InMemoryObjectStore) -> tuple[list[str], list[str]]:
    manifest = Manifest.from_json(store.data(manifest_key(PREFIX, "step_1")), PREFIX)
    return sorted(e.path for e in manifest.files), sorted(link.path for link in manifest.links)


def _sealed_three(tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock,
                  link: bool = False) -> Path:
    root = tmp_path / "ckpt"
    for name in ("a", "b", "c"):
        _write(root, f"step_1/{name}.pt", name.encode() * 100)
    if link:
        os.symlink("a.pt", root / "step_1" / "latest.pt")
    with engine_on(root, tmp_path / "state-1", store, clock) as engine:
        _run(engine, clock)
    store.reopen()
    return root


def test_s3_unreachable_when_judging_never_shrinks_the_set(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = _sealed_three(tmp_path, store, clock)
    for name in ("b", "c"):
        (root / "step_1" / f"{name}.pt").unlink()
    store.fail("list_objects", times=1)
    with engine_on(root, tmp_path / "state-2", store, clock) as engine:
        _run(engine, clock)
    assert _listed(store)[0] == SEALED


def test_a_symlink_of_the_set_never_shrinks_it(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    root = _sealed_three(tmp_path, store, clock, link=True)
    for name in ("b", "c"):
        (root / "step_1" / f"{name}.pt").unlink()
    with engine_on(root, tmp_path / "state-2", store, clock) as engine:
        _run(engine, clock)
    assert _listed(store) == (SEALED, ["step_1/latest.pt"])


def test_a_file_the_set_did_not_list_joins_it_beside_a_stale_copy(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """a.pt on disk is older than the one sealed, d.pt was never uploaded: d.pt goes up and
    the set is sealed with it and with the a.pt S3 holds, not left incomplete."""
    root = _sealed_three(tmp_path, store, clock)
    sealed_a = store.data("run/step_1/a.pt")
    _write(root, "step_1/a.pt", b"old" * 10, age_seconds=200)
    _write(root, "step_1/d.pt", b"never uploaded")
    with engine_on(root, tmp_path / "state-2", store, clock) as engine:
        _run(engine, clock)
        assert not engine.sealer.incomplete
    assert _listed(store)[0] == [*SEALED, "step_1/d.pt"]
    assert store.data("run/step_1/a.pt") == sealed_a


@contextmanager
def _node(root: Path, state: Path, store: InMemoryObjectStore, clock: FakeClock,
          rank: int) -> Iterator[SyncEngine]:
    tracker = ChangeTracker(WatchDir(root, PREFIX, exclude=()), 1.0, 5.0, clock=clock)
    engine = SyncEngine([tracker], Ledger(state / "ledger.sqlite"),
                        lambda done: Uploader(store, done, clock), wake=woken.set, clock=clock,
                        wall_clock_ns=clock.wall_ns, node=JobNode(JOB, 2, rank))
    try:
        yield engine
    finally:
        engine.close()


def _part(store: InMemoryObjectStore, rank: int) -> list[str]:
    body = store.data(part_key(PREFIX, JOB, "step_1", rank))
    return sorted(e.path for e in Part.from_json(body, PREFIX, JOB).manifest.files)


def test_a_jobs_whole_set_on_one_node_leaves_its_part_as_sealed(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """A restore of the whole set onto rank 0's disk, killed half way: a0.pt of rank 0 and
    x1.pt of rank 1 are there. Rank 0's part keeps a0, b0 and c0, and not x1."""
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    for name in ("a0", "b0", "c0"):
        _write(rank0, f"step_1/{name}.pt", name.encode() * 100)
    x1 = _write(rank1, "step_1/x1.pt", b"x1" * 100)
    for rank, root in enumerate((rank0, rank1)):
        (tmp_path / f"state-{rank}").mkdir()
        with _node(root, tmp_path / f"state-{rank}", store, clock, rank) as engine:
            _run(engine, clock)
        store.reopen()
    for name in ("b0", "c0"):
        (rank0 / "step_1" / f"{name}.pt").unlink()
    copied = _write(rank0, "step_1/x1.pt", x1.read_bytes())
    os.utime(copied, ns=(x1.stat().st_mtime_ns, x1.stat().st_mtime_ns))
    (tmp_path / "state-0-next").mkdir()
    with _node(rank0, tmp_path / "state-0-next", store, clock, 0) as engine:
        _run(engine, clock)
    assert _part(store, 0) == ["step_1/a0.pt", "step_1/b0.pt", "step_1/c0.pt"]


STATES = st.sampled_from(["absent", "durable", "older", "newer", "written-since-start"])


@given(states=st.lists(STATES, min_size=1, max_size=6), touched=st.booleans())
def test_an_unchanged_inherited_set_is_never_sealed_with_less(
        states: list[str], touched: bool) -> None:
    """SealedSets.inherit over every mix of what a sealed file can be on disk: absent, durable
    (in the ledger as sealed), older or newer than sealed (not in the ledger), or written
    since the start."""
    started_ns = 10_000
    sealed = [ManifestEntry(f"run/step_1/f{i}", f"step_1/f{i}", 10, 1_000 + i, "AAAAAA==")
              for i in range(len(states))]
    store = InMemoryObjectStore()
    store.put(manifest_key(PREFIX, "step_1"),
              Manifest.build("step_1", PREFIX, sealed, []).to_json().encode())
    sets = SealedSets(store, None, started_ns)
    sets.judge(PREFIX, "step_1", "run/step_1/f0", FileVersion(1, 1))  # reads it, as at a start
    if touched:
        sets.touched(PREFIX, "step_1")
    mtimes = {"older": lambda e: e.mtime_ns - 1, "newer": lambda e: e.mtime_ns + 1,
              "written-since-start": lambda e: started_ns}
    entries = [e for e, state in zip(sealed, states, strict=True) if state == "durable"]
    missing = {e.path: FileVersion(e.size, mtimes[state](e))
               for e, state in zip(sealed, states, strict=True) if state in mtimes}
    present = {e.path for e, state in zip(sealed, states, strict=True) if state != "absent"}
    inherited = sets.inherit(PREFIX, "step_1", entries, missing, present, [])
    if touched or "written-since-start" in states:
        assert inherited is None  # sealed as it is on disk
        return
    assert inherited is not None
    kept, still_missing, _ = inherited
    newer = [e.path for e, state in zip(sealed, states, strict=True) if state == "newer"]
    assert sorted(still_missing) == sorted(newer)  # new work: uploaded, not replaced
    assert {e.path for e in kept} | set(newer) == {e.path for e in sealed}
