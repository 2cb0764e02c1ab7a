"""Deleting an old checkpoint file by file while a large new one is pending or being written
costs no pass over the new one's files per deleted file (see subtree.Folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from watchdog.events import DirDeletedEvent, FileDeletedEvent

from spotwatch.config import WatchDir
from spotwatch.model import Snapshot
from spotwatch.sync import subtree
from spotwatch.sync.planner import PendingFile, Planner, SetRef
from spotwatch.sync.subtree import Folders, files_at_or_below
from spotwatch.sync.tracker import ChangeTracker

FILES = 300


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every pass over a collection of files looking for what lies below a path."""
    seen: list[Path] = []
    original = subtree.prefix_below

    def counting(directory: Path) -> str:
        seen.append(directory)
        return original(directory)

    monkeypatch.setattr(subtree, "prefix_below", counting)
    return seen


def test_planner_drops_deleted_old_files_without_passing_over_pending(
        tmp_path: Path, passes: list[Path]) -> None:
    new, old = tmp_path / "step_2", tmp_path / "step_1"
    planner = Planner()
    set_ref = SetRef("run/", "step_2", tmp_path)
    for i in range(FILES):
        planner.add(PendingFile(new / f"shard_{i}", f"run/step_2/shard_{i}",
                                Snapshot(1, i, i, i), set_ref))
    for i in range(FILES):
        assert planner.remove_under(old / f"shard_{i}") == []
    assert passes == []
    assert planner.remove_under(old) == []
    assert len(planner.remove_under(new)) == FILES  # a deleted folder still drops its files
    assert len(planner) == 0


def test_tracker_forgets_deleted_old_files_without_passing_over_unsettled(
        tmp_path: Path, passes: list[Path]) -> None:
    tracker = ChangeTracker(WatchDir(tmp_path), settle_seconds=60, quiet_seconds=60)
    for i in range(FILES):
        tracker.mark(tmp_path / "step_2" / f"shard_{i}", closed=True)
    for i in range(FILES):
        tracker.on_any_event(FileDeletedEvent(str(tmp_path / "step_1" / f"shard_{i}")))
    assert [p for p in passes if p != tmp_path] == []
    assert tracker.unsettled_count() == FILES
    tracker.on_any_event(DirDeletedEvent(str(tmp_path / "step_2")))
    assert tracker.unsettled_count() == 0


names = st.lists(st.sampled_from(["a", "b", "ab", "a.b", "c"]), min_size=1, max_size=4)


@given(files=st.lists(names, max_size=12), added=st.lists(names, max_size=12), path=names)
def test_folders_find_what_a_full_pass_finds(files: list[list[str]], added: list[list[str]],
                                             path: list[str]) -> None:
    """Whatever ever entered the collection (some since gone), a path finds what lies below
    it exactly as a pass over the whole collection does."""
    root = Path("/r")
    folders = Folders()
    for parts in [*files, *added]:
        folders.add(root.joinpath(*parts))
    present = {root.joinpath(*parts) for parts in files}
    target = root.joinpath(*path)
    assert sorted(folders.at_or_below(target, present)) == sorted(
        files_at_or_below(target, present))
