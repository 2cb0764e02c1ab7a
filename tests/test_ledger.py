"""The SQLite ledger survives reopening and recognises unchanged files."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.model import FileVersion
from spotwatch.sync.ledger import COARSE_MTIME_SECONDS, Ledger, _add_column


def is_current(ledger: Ledger, bucket: str, key: str, version: FileVersion,
               inode: int | None = None) -> bool:
    """Whether the ledger surely holds this version as the object's: recorded, not racy."""
    recorded = ledger.recorded_version(bucket, key, version, inode)
    return recorded is not None and not recorded.racy


def test_record_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ledger.sqlite3"
    ledger = Ledger(db)
    ledger.record("b", "k/model.pt", tmp_path / "model.pt", FileVersion(10, 123), "abc=")
    ledger.close()
    reopened = Ledger(db)
    assert is_current(reopened, "b", "k/model.pt", FileVersion(10, 123))
    assert not is_current(reopened, "b", "k/model.pt", FileVersion(10, 124))  # same size, newer
    assert not is_current(reopened, "other-bucket", "k/model.pt", FileVersion(10, 123))
    summary = reopened.summary("b")
    assert (summary.objects, summary.bytes) == (1, 10)
    assert summary.last_upload is not None
    reopened.forget("b", "k/model.pt")
    assert reopened.summary("b").objects == 0


def test_objects_in_set_are_the_set_key_and_what_lies_below_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    keys = ["p/step_1", "p/step_1/a.pt", "p/step_1/sub/b.pt", "p/step_1.bak/c.pt",
            "p/step_10/d.pt", "p/step_1-old", "q/step_1/e.pt"]
    for key in keys:
        ledger.record("b", key, tmp_path / key, FileVersion(1, 1), None)
    ledger.record("other", "p/step_1/a.pt", tmp_path / "x", FileVersion(1, 1), None)
    ledger.retire("b", "p/step_1/sub/b.pt")
    found = sorted(row[0] for row in ledger.objects_in_set("b", "p/step_1"))
    assert found == ["p/step_1", "p/step_1/a.pt"]


def test_reviving_a_pruned_set_forgets_its_retired_objects_alone(tmp_path: Path) -> None:
    """What retention deleted of a set that changes again is uploaded anew: no longer in the
    ledger, not current. Live objects, and retired ones of other sets, stay as they were."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for key in ("p/step_1/a.pt", "p/step_1/b.pt", "p/step_1/c.pt", "p/step_10/d.pt"):
        ledger.record("b", key, tmp_path / key, FileVersion(1, 1), None)
    for key in ("p/step_1/a.pt", "p/step_1/b.pt", "p/step_10/d.pt"):
        ledger.retire("b", key)
    ledger.record("b", "p/step_1/a.pt", tmp_path / "a", FileVersion(2, 2), None)  # rewritten
    assert ledger.revive_retired("b", "p/step_1") == ["p/step_1/b.pt"]
    assert not is_current(ledger, "b", "p/step_1/b.pt", FileVersion(1, 1))
    assert is_current(ledger, "b", "p/step_1/c.pt", FileVersion(1, 1))
    assert is_current(ledger, "b", "p/step_10/d.pt", FileVersion(1, 1))
    assert ledger.revive_retired("b", "p/step_1") == []


def test_asking_for_retired_objects_does_not_scan_the_sets_live_ones(tmp_path: Path) -> None:
    """Every upload asks for its set's retired objects: the work must not grow with the set's
    size (an upload each of n files would cost n squared), only with what retention retired."""
    def steps_to_ask(live: int) -> int:
        ledger = Ledger(tmp_path / f"ledger-{live}.sqlite3")
        for n in range(live):
            ledger.record("b", f"p/step_1/shard_{n:05}.pt", tmp_path / "x", FileVersion(1, 1),
                          None)
        ledger.retire("b", "p/step_1/shard_00000.pt")
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0  # go on

        ledger._db.set_progress_handler(count, 10)  # called every 10 virtual machine steps
        assert ledger.revive_retired("b", "p/step_1") == ["p/step_1/shard_00000.pt"]
        ledger.close()
        return steps[0]

    assert steps_to_ask(5000) <= steps_to_ask(10) + 5


def test_a_ledger_of_an_older_version_gains_the_checksum_algorithm_and_etag(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(db) as old:  # the first version's table, with one object
        old.execute("CREATE TABLE objects (bucket TEXT NOT NULL, key TEXT NOT NULL, path TEXT"
                    " NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, checksum TEXT,"
                    " uploaded_at REAL NOT NULL, PRIMARY KEY (bucket, key))")
        old.execute("INSERT INTO objects VALUES ('b', 'p/s/old.pt', 'x', 1, 1, 'AAAAAA==', 0)")
    old.close()
    ledger = Ledger(db)
    ledger.record("b", "p/s/new.pt", tmp_path / "y", FileVersion(2, 2), "AAAAAQ==", 5,
                  "CRC32C", '"9b2cf535f27731c974343645a3985328-1"')
    rows = {row[0]: row for row in ledger.objects_in_set("b", "p/s")}
    assert rows["p/s/old.pt"][4:] == ("AAAAAA==", None, None, None)
    assert rows["p/s/new.pt"][4:] == ("AAAAAQ==", 5, "CRC32C",
                                      '"9b2cf535f27731c974343645a3985328-1"')


def test_a_column_another_process_added_meanwhile_is_taken_as_added(tmp_path: Path) -> None:
    """The daemon and a restore may open an older ledger at once: both see the column missing,
    and the second to add it must not fail."""
    db = tmp_path / "ledger.sqlite3"
    Ledger(db).close()  # every column there
    connection = sqlite3.connect(db)
    _add_column(connection, "ALTER TABLE objects ADD COLUMN checksum_algorithm TEXT")
    with pytest.raises(sqlite3.OperationalError):
        _add_column(connection, "ALTER TABLE nowhere ADD COLUMN x TEXT")
    connection.close()


_KEYS = ("run/step_1/a", "run/step_1/b", "run/step_2/a", "run/top.pt", "other/step_1/a")
_SETS = ("run/step_1", "run/step_2", "run/top.pt", "other/step_1")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("record"), st.sampled_from(_KEYS)),
    st.tuples(st.just("retire"), st.sampled_from(_KEYS)),
    st.tuples(st.just("forget"), st.sampled_from(_KEYS)),
    st.tuples(st.sampled_from(["settled", "unsettled"]), st.sampled_from(_SETS)))))
def test_unsettled_sets_are_those_with_objects_and_no_manifest_since(
        operations: list[tuple[str, str]]) -> None:
    """What survives a restart (another Ledger on the file) against a plain model."""
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / "ledger.db"
        ledger = Ledger(path)
        live: set[str] = set()
        settled: set[str] = set()
        for operation, name in operations:
            if operation == "record":
                ledger.record("b", name, Path("/x"), FileVersion(1, 1), "c")
                live.add(name)
            elif operation in ("retire", "forget"):
                getattr(ledger, operation)("b", name)
                live.discard(name)
            else:
                ledger.set_settled("b", name, operation == "settled")
                (settled.add if operation == "settled" else settled.discard)(name)
        ledger.close()
        reopened = Ledger(path)
        sets_of_live = {key.rsplit("/", 1)[0] if key.count("/") == 2 else key for key in live}
        assert reopened.unsettled_sets("b", "run/") == sorted(
            s.removeprefix("run/") for s in sets_of_live - settled if s.startswith("run/"))
        reopened.close()


@given(st.integers(0, (1 << 64) - 1))
def test_any_inode_number_is_recorded_and_compared(inode: int) -> None:
    """Inode numbers are unsigned 64-bit (some file systems use the top bit); SQLite's integers
    are signed: every one is stored, and tells its file from any other."""
    with tempfile.TemporaryDirectory() as scratch:
        ledger = Ledger(Path(scratch) / "ledger.db")
        version = FileVersion(1, 2)
        ledger.record("b", "k", Path("/f"), version, "c", inode=inode)
        assert is_current(ledger, "b", "k", version, inode)
        assert not is_current(ledger, "b", "k", version, inode ^ 1)
        ledger.close()


def test_a_reader_sees_what_a_running_daemon_wrote_and_writes_nothing(tmp_path: Path) -> None:
    """status reads the ledger of a daemon that runs (its writes still in the WAL) without
    opening it for writing: nothing made, migrated or written by the reader."""
    path = tmp_path / "ledger.sqlite3"
    writer = Ledger(path)
    try:
        writer.record("b", "run/a.pt", tmp_path / "a.pt", FileVersion(5, 1), "x")
        before = path.read_bytes()
        reader = Ledger(path, only_reading=True)
        try:
            assert reader.summary("b").objects == 1
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader._db.execute("DELETE FROM objects")
        finally:
            reader.close()
        assert path.read_bytes() == before
    finally:
        writer.close()


@settings(max_examples=200, deadline=None)
@given(mtime_s=st.integers(0, 4_000_000_000), fraction_ns=st.integers(0, 999_999_999),
       upload_delay=st.floats(0, 10).filter(  # clear of the bound, beyond float rounding
           lambda delay: abs(delay - COARSE_MTIME_SECONDS) > 1e-3))
def test_a_version_with_a_whole_second_mtime_uploaded_within_its_second_is_not_current(
        mtime_s: int, fraction_ns: int, upload_delay: float) -> None:
    """On a file system of whole-second mtimes a same-size rewrite right after an upload looks
    like the version uploaded: such a row is racy and the file is uploaded again. A row
    recorded long enough after its mtime, or of a nanosecond mtime, is current."""
    mtime_ns = mtime_s * 1_000_000_000 + fraction_ns
    with tempfile.TemporaryDirectory() as temp:
        ledger = Ledger(Path(temp) / "ledger.sqlite3")
        ledger.record("b", "k", Path(temp) / "f", FileVersion(5, mtime_ns), None, inode=7,
                      uploaded_at=mtime_ns / 1e9 + upload_delay)
        current = is_current(ledger, "b", "k", FileVersion(5, mtime_ns), inode=7)
        ledger.close()
    assert current == (fraction_ns != 0 or upload_delay >= COARSE_MTIME_SECONDS)
