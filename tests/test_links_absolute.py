"""Absolute symlinks below a watched directory: Lightning 2.1's save_last="link" made
`last.ckpt -> /abs/ckpts/epoch=0-step=3.ckpt` (mmcv's `latest.pth` too). One that names a path
inside the watched directory is recorded with the equivalent relative text, so that restore
makes a link leading to the restored file in any destination; one leading out stays skipped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from spotwatch.sync.links import recorded_text

from .conftest import Workspace, keys_in, wait_for
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_links import lightning_link, links_in_s3
from .test_links_between_sets import manifest_links

OUTSIDE = "its target is outside the watched directory"


def test_an_absolute_last_ckpt_comes_back_as_a_link_to_the_restored_checkpoint(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    ckpt = workspace.checkpoints
    daemon = workspace.start_daemon()
    saved = {}
    for step in (1, 2, 3):
        name = f"epoch=0-step={step}.ckpt"
        saved[name] = save_checkpoint(ckpt / name, 20_000)
        lightning_link(ckpt, str(ckpt / name))  # absolute, as Lightning 2.1 made it
        wait_for(lambda name=name: links_in_s3(s3, workspace, "last.ckpt")
                 == {"last.ckpt": name})
    flushed = workspace.cli("flush", "-c", "config.yaml")  # asks the daemon to flush
    assert flushed.returncode == 0, flushed.stderr
    assert daemon.stop() == 0
    assert not daemon.named("symlink_skipped")
    assert links_in_s3(s3, workspace, "last.ckpt") == {"last.ckpt": "epoch=0-step=3.ckpt"}

    fresh = tmp_path / "fresh"
    result = restore(workspace, "--to", str(fresh))
    assert result.returncode == 0, result.stderr
    assert "link last.ckpt -> epoch=0-step=3.ckpt" in result.stdout
    assert os.readlink(fresh / "last.ckpt") == "epoch=0-step=3.ckpt"
    assert (fresh / "last.ckpt").read_bytes() == saved["epoch=0-step=3.ckpt"]
    assert sorted(os.listdir(fresh)) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def test_absolute_links_out_of_the_tree_stay_skipped_and_say_why(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    ckpt = workspace.checkpoints
    secret = save_checkpoint(tmp_path / "elsewhere" / "secret.ckpt", 500)
    (ckpt / "absolute.ckpt").symlink_to(tmp_path / "elsewhere" / "secret.ckpt")
    # Below the watched directory as text, then out of it with '..'.
    (ckpt / "back_out.ckpt").symlink_to(f"{ckpt}/../elsewhere/secret.ckpt")
    (ckpt / "itself").symlink_to(str(ckpt), target_is_directory=True)
    (ckpt / "dangling.ckpt").symlink_to(ckpt / "epoch=9-step=90.ckpt")
    save_checkpoint(ckpt / "epoch=0-step=10.ckpt", 1000)
    lightning_link(ckpt, str(ckpt / "epoch=0-step=10.ckpt"))
    daemon = workspace.start_daemon()
    daemon.wait_for_event("symlink_skipped", count=4)
    wait_for(lambda: links_in_s3(s3, workspace, "last.ckpt") is not None)
    assert daemon.stop() == 0
    reasons = {Path(event["path"]).name: event["reason"]
               for event in daemon.named("symlink_skipped")}
    assert reasons == {"absolute.ckpt": OUTSIDE, "back_out.ckpt": OUTSIDE, "itself": OUTSIDE,
                       "dangling.ckpt": "dangling: its target does not exist"}
    assert links_in_s3(s3, workspace, "last.ckpt") == {"last.ckpt": "epoch=0-step=10.ckpt"}
    assert {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key} == {
        "run1/epoch=0-step=10.ckpt"}
    assert secret == (tmp_path / "elsewhere" / "secret.ckpt").read_bytes()


def test_a_restore_into_the_watched_directory_makes_the_relative_link(
        workspace: Workspace, s3: Any) -> None:
    """A daemon watching the destination finds the link made as recorded: nothing to seal
    again, and the manifest keeps the link."""
    ckpt = workspace.checkpoints
    data = save_checkpoint(ckpt / "step_2" / "model.pt", 3000)
    (ckpt / "latest").symlink_to(str(ckpt / "step_2"), target_is_directory=True)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert links_in_s3(s3, workspace, "latest") == {"latest": "step_2"}
    ckpt.rename(workspace.root / "saved")
    ckpt.mkdir()
    daemon = workspace.start_daemon()
    result = restore(workspace, "--to", str(ckpt))
    assert result.returncode == 0, result.stderr
    assert os.readlink(ckpt / "latest") == "step_2"
    assert (ckpt / "latest" / "model.pt").read_bytes() == data
    assert daemon.stop() == 0
    assert not daemon.named("symlink_skipped")
    assert links_in_s3(s3, workspace, "latest") == {"latest": "step_2"}


def test_absolute_links_into_other_sets_make_their_files_part_of_the_set(
        workspace: Workspace, s3: Any) -> None:
    """A dedup step linking by absolute path to a file and a directory of an older set: the
    set records them as relative links with the files they lead to, and comes back whole
    without the older set."""
    ckpt = workspace.checkpoints
    embed = save_checkpoint(ckpt / "step_100" / "embed.pt", 2000)
    vocab = save_checkpoint(ckpt / "step_100" / "tokenizer" / "vocab.json", 300)
    model = save_checkpoint(ckpt / "step_200" / "model.pt", 3000)
    (ckpt / "step_200" / "embed.pt").symlink_to(ckpt / "step_100" / "embed.pt")
    (ckpt / "step_200" / "tokenizer").symlink_to(ckpt / "step_100" / "tokenizer",
                                                 target_is_directory=True)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    links = {link["path"]: link for link in manifest_links(s3, workspace, "step_200")}
    assert {path: link["target"] for path, link in links.items()} == {
        "step_200/embed.pt": "../step_100/embed.pt",
        "step_200/tokenizer": "../step_100/tokenizer"}
    assert links["step_200/embed.pt"]["file"]["key"] == "run1/step_100/embed.pt"
    assert [entry["key"] for entry in links["step_200/tokenizer"]["files"]] == [
        "run1/step_100/tokenizer/vocab.json"]

    fresh = workspace.root / "fresh"
    result = restore(workspace, "--set", "step_200", "--to", str(fresh))
    assert result.returncode == 0, result.stderr
    assert (fresh / "step_200" / "model.pt").read_bytes() == model
    assert (fresh / "step_200" / "embed.pt").read_bytes() == embed
    assert (fresh / "step_200" / "tokenizer" / "vocab.json").read_bytes() == vocab
    assert not (fresh / "step_100").exists()


def test_an_absolute_link_through_the_watched_directorys_own_link_is_recorded(
        workspace: Workspace, s3: Any) -> None:
    """The watch path a symlink (`checkpoints -> runs/7/checkpoints`): a link's absolute text
    may name the directory either way."""
    real = workspace.root / "runs" / "7" / "checkpoints"
    real.mkdir(parents=True)
    configured = workspace.root / "current"
    configured.symlink_to(real, target_is_directory=True)
    workspace.write_config(watch=[{"path": str(configured), "prefix": "run1/"}])
    save_checkpoint(real / "step_1" / "model.pt", 1000)
    (real / "by_config").symlink_to(configured / "step_1", target_is_directory=True)
    (real / "by_real").symlink_to(real / "step_1", target_is_directory=True)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert links_in_s3(s3, workspace, "by_config") == {"by_config": "step_1"}
    assert links_in_s3(s3, workspace, "by_real") == {"by_real": "step_1"}


@pytest.mark.parametrize(("relative", "target", "recorded"), [
    ("last.ckpt", "/w/ckpt/epoch=3.ckpt", "epoch=3.ckpt"),
    ("step_2/embed.pt", "/w/ckpt/step_1/embed.pt", "../step_1/embed.pt"),
    ("step_2/a/b.pt", "/w//ckpt/./step_1/b.pt", "../../step_1/b.pt"),
    ("last.ckpt", "/w/ckpt/step_1/../../out.ckpt", "step_1/../../out.ckpt"),  # '..' kept
    ("last.ckpt", "/w/ckpt", ""),  # the directory itself: no link destination
    ("last.ckpt", "/w/ckpt2/epoch=3.ckpt", "/w/ckpt2/epoch=3.ckpt"),  # a sibling is outside
    ("last.ckpt", "epoch=3.ckpt", "epoch=3.ckpt"),
])
def test_the_recorded_text_of_a_link(relative: str, target: str, recorded: str) -> None:
    assert recorded_text(Path("/w/ckpt"), relative, target) == recorded
