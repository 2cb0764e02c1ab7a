"""The benchmark's own bookkeeping between rounds (bench/measure.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from measure import set_aside, tree_bytes


def test_a_set_aside_download_frees_its_bytes_and_keeps_its_files(tmp_path: Path) -> None:
    for round_number in range(2):  # the same destination again in the next round
        destination = tmp_path / "restored"
        (destination / "step_1/part_000").mkdir(parents=True)
        for i in range(3):
            (destination / f"step_1/part_000/f_{i}").write_bytes(b"x" * 1000)
        set_aside(destination, tmp_path / "kept")
        assert not destination.exists()
        kept = sorted((tmp_path / "kept").rglob("f_*"))
        assert len(kept) == 3 * (round_number + 1)
        assert tree_bytes(tmp_path / "kept") == (3 * (round_number + 1), 0)
