"""UploadedThisRun against a plain model: any adds and deletions of files and folders."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.model import Snapshot
from spotwatch.sync.uploaded import UploadedThisRun

ROOT = Path("/ckpt")
# Files at two depths, so that a deletion may name a file or a folder holding several.
NAMES = st.sampled_from(["a", "b", "a/x", "a/y", "b/x", "b/a/z"]).map(lambda name: ROOT / name)
INODES = st.integers(min_value=1, max_value=4)  # few, so that names share inodes
STEPS = st.lists(st.one_of(st.tuples(st.just("add"), NAMES, INODES),
                           st.tuples(st.just("forget"), NAMES, st.just(0)),
                           st.tuples(st.just("forget"), st.just(ROOT), st.just(0))),
                 max_size=40)


def below(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


@settings(max_examples=300)
@given(STEPS)
def test_uploaded_this_run_answers_as_a_plain_map_would(steps: list[tuple[str, Path, int]]
                                                          ) -> None:
    uploaded = UploadedThisRun()
    model: dict[Path, Snapshot] = {}
    for action, path, inode in steps:
        if action == "add":
            snapshot = Snapshot(1, 1, 1, inode)
            uploaded.add(path, snapshot)
            model[path] = snapshot
        else:
            uploaded.forget_at_or_below(path)
            model = {name: snap for name, snap in model.items() if not below(path, name)}
        for name in {name for _, name, _ in steps}:
            assert uploaded.get(name) == model.get(name)
            for inode_asked in range(1, 5):
                assert sorted(uploaded.other_names(name, inode_asked)) == sorted(
                    other for other, snap in model.items()
                    if snap.inode == inode_asked and other != name)
