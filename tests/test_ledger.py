"""The SQLite ledger survives reopening and recognises unchanged files."""

from __future__ import annotations

from pathlib import Path

from spotwatch.ledger import FileVersion, Ledger


def test_record_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ledger.sqlite3"
    ledger = Ledger(db)
    ledger.record("b", "k/model.pt", tmp_path / "model.pt", FileVersion(10, 123), "abc=")
    ledger.close()
    reopened = Ledger(db)
    assert reopened.is_current("b", "k/model.pt", FileVersion(10, 123))
    assert not reopened.is_current("b", "k/model.pt", FileVersion(10, 124))  # same size, newer
    assert not reopened.is_current("other-bucket", "k/model.pt", FileVersion(10, 123))
    summary = reopened.summary("b")
    assert (summary.objects, summary.bytes) == (1, 10)
    assert summary.last_upload is not None
    reopened.forget("b", "k/model.pt")
    assert reopened.summary("b").objects == 0
