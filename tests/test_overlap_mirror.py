"""A watched symlink pointed at another entry's directory mirrors no deletions: its own files
are where it led before, not gone (README: not watched until it leads elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spotwatch.config import WatchDir, load_config
from spotwatch.sync.overlaps import overlapping, resolved
from spotwatch.sync.pruner import prune_once

from .conftest import Workspace, keys_in, wait_for
from .test_daemon_e2e import save_checkpoint


def test_only_entries_leading_at_in_or_over_another_overlap(tmp_path: Path) -> None:
    for name in ("a", "a/inner", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    paths = [tmp_path / "a", tmp_path / "link", tmp_path / "b", tmp_path / "a" / "inner",
             tmp_path / "missing"]
    watches = [WatchDir(path=path, prefix=f"w{index}/") for index, path in enumerate(paths)]
    found = overlapping(watches, [resolved(path) for path in paths])
    assert set(found) == {0, 1, 3}
    assert "not watched until it leads elsewhere" in found[1]
    assert overlapping(watches[2:3] + watches[4:], [resolved(paths[2]), None]) == {}


def test_a_symlink_pointed_at_another_watched_directory_mirrors_no_deletion(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    other = tmp_path / "other"
    link = tmp_path / "link"
    other.mkdir()
    link.symlink_to(other, target_is_directory=True)
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/"},
                                  {"path": str(link), "prefix": "run2/"}],
                           sync={"delete": True})
    daemon = workspace.start_daemon()
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 3000)
    for step in (1, 2):
        save_checkpoint(other / f"step_{step}" / "model.pt", 3000)
    sealed = {"run1/.spotwatch/manifests/step_1.json", "run2/.spotwatch/manifests/step_1.json",
              "run2/.spotwatch/manifests/step_2.json"}
    wait_for(lambda: sealed <= keys_in(s3, workspace.bucket))
    before = keys_in(s3, workspace.bucket)

    repointed = tmp_path / "link.new"
    repointed.symlink_to(workspace.checkpoints, target_is_directory=True)
    repointed.replace(link)  # other/ and its files untouched
    daemon.wait_for_event("watch_dir_overlaps")
    wait_for(lambda: any(event.get("path") == str(link)
                         for event in daemon.named("mirror_skipped")))
    assert not daemon.named("object_deleted")
    assert keys_in(s3, workspace.bucket) == before
    assert daemon.stop() == 0


def _flushed_then_repointed(workspace: Workspace, tmp_path: Path) -> tuple[Path, Path]:
    """watch[1] is a symlink to other/; both entries' sets uploaded; then the symlink is
    pointed at watch[0]'s directory, other/ untouched. Returns (config file, link)."""
    other = tmp_path / "other"
    link = tmp_path / "link"
    other.mkdir()
    link.symlink_to(other, target_is_directory=True)
    config = workspace.write_config(watch=[{"path": str(workspace.checkpoints),
                                            "prefix": "run1/"},
                                           {"path": str(link), "prefix": "run2/"}])
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 3000)
    for step in (1, 2):  # a set of watch[0]'s name: "holds none of the sets" does not hold
        save_checkpoint(other / f"step_{step}" / "model.pt", 3000)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    return config, link


def _repoint(link: Path, target: Path) -> None:
    link.unlink()
    link.symlink_to(target, target_is_directory=True)


def test_prune_refuses_a_symlink_pointed_at_another_watched_directory(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    _, link = _flushed_then_repointed(workspace, tmp_path)
    before = keys_in(s3, workspace.bucket)
    _repoint(link, workspace.checkpoints)
    result = workspace.cli("prune", "-c", "config.yaml", "--delete")
    assert result.returncode == 2 and "watch the same files" in result.stderr, result.stderr
    assert keys_in(s3, workspace.bucket) == before


def test_prune_mirrors_nothing_of_a_symlink_pointed_elsewhere_after_the_config_was_read(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """The one-shot prune has no tracker: it finds the overlap itself, when it plans."""
    config_file, link = _flushed_then_repointed(workspace, tmp_path)
    config = load_config(config_file)  # checked while the link still led to other/
    before = keys_in(s3, workspace.bucket)
    _repoint(link, workspace.checkpoints)
    report = prune_once(config, workspace.bucket, mirror_deletes=True, keep_sets=0,
                        dry_run=False)
    assert report.planned == [] and report.deleted == []
    assert keys_in(s3, workspace.bucket) == before
