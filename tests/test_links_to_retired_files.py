"""A link to a file (or directory) of a set that retention pruned: the set linking to it is
sealed all the same, the file uploaded again, alone, and kept; and a set that cannot be sealed
for want of a file it needs fails the flush by name and keeps status from saying ok. End to end
with the daemon and the CLI against the moto server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon, Workspace, keys_in, object_bytes, wait_for
from .test_checkpoint_sets import restore
from .test_daemon_e2e import save_checkpoint
from .test_links_between_sets import EMBED, MANIFESTS
from .test_links_to_directories import TOKENIZER

# What step_300's link leads to in step_100, by kind: the link's name and the files below it.
LINKED = {"file": ("embed.pt", ("embed.pt",)), "directory": ("tokenizer", TOKENIZER)}


def sealed(s3: Any, workspace: Workspace, set_name: str) -> dict[str, Any] | None:
    """The set's manifest in S3, or None (also when retention deletes it meanwhile)."""
    try:
        body = object_bytes(s3, workspace.bucket, f"{MANIFESTS}{set_name}.json")
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)  # type: ignore[no-any-return]


def save_set(workspace: Workspace, name: str, files: tuple[str, ...]) -> dict[str, bytes]:
    return {f"{name}/{file}": save_checkpoint(workspace.checkpoints / name / file, 2_000)
            for file in files}


def save_until_retired(workspace: Workspace, s3: Any, linked: tuple[str, ...]) -> dict[str, bytes]:
    """With keep_sets 1 and a daemon running: step_100 (model.pt and the linked files), then
    step_200, until retention deleted step_100 from S3."""
    saved = save_set(workspace, "step_100", ("model.pt", *linked))
    wait_for(lambda: sealed(s3, workspace, "step_100"))
    saved |= save_set(workspace, "step_200", ("model.pt", *linked))
    wait_for(lambda: not any(key.startswith("run1/step_100/")
                             for key in keys_in(s3, workspace.bucket)), timeout=30)
    return saved


def uploads_of(daemon: Daemon, key: str) -> int:
    return sum(event["key"] == key for event in daemon.named("upload_done"))


def restored_step_300(workspace: Workspace, saved: dict[str, bytes], link: str,
                      linked: tuple[str, ...]) -> None:
    """restore (CLI) gives step_300, each file byte for byte as saved."""
    fresh = workspace.root / "fresh"
    result = restore(workspace, "--to", str(fresh))
    assert result.returncode == 0, result.stderr
    assert "restored step_300" in result.stdout
    assert (fresh / "step_300" / "model.pt").read_bytes() == saved["step_300/model.pt"]
    for file in linked:
        seen = f"{link}{file[len(link):]}"  # the file as seen through the link
        assert (fresh / "step_300" / seen).read_bytes() == saved[f"step_100/{file}"]


@pytest.mark.parametrize("kind", sorted(LINKED))
def test_a_new_set_linking_into_a_pruned_set_gets_the_file_uploaded_again(
        workspace: Workspace, s3: Any, kind: str) -> None:
    link, linked = LINKED[kind]
    ckpt = workspace.checkpoints
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    saved = save_until_retired(workspace, s3, linked)
    # The dedup step: the unchanged file (or folder) linked, then renamed into place.
    staging = ckpt / "step_300.tmp"
    saved["step_300/model.pt"] = save_checkpoint(staging / "model.pt", 3_000)
    os.symlink(f"../step_100/{link}", staging / link)
    staging.rename(ckpt / "step_300")

    manifest = wait_for(lambda: sealed(s3, workspace, "step_300"), timeout=30)
    [entry] = manifest["links"]
    listed = [entry["file"]] if kind == "file" else entry["files"]
    assert sorted(item["key"] for item in listed) == [f"run1/step_100/{f}" for f in sorted(linked)]
    # Retention then drops step_200 and keeps what step_300 lists.
    wait_for(lambda: not sealed(s3, workspace, "step_200"), timeout=30)
    assert {f"run1/step_100/{file}" for file in linked} <= keys_in(s3, workspace.bucket)
    # Only the linked files went again: step_100 itself stays pruned.
    assert uploads_of(daemon, "run1/step_100/model.pt") == 1
    assert "run1/step_100/model.pt" not in keys_in(s3, workspace.bucket)
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    assert daemon.stop() == 0
    restored_step_300(workspace, saved, link, linked)


def test_a_link_repointed_into_a_pruned_set_while_stopped_is_sealed_at_the_restart(
        workspace: Workspace, s3: Any) -> None:
    ckpt = workspace.checkpoints
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    saved = save_until_retired(workspace, s3, ("embed.pt",))
    saved["step_300/model.pt"] = save_checkpoint(ckpt / "step_300" / "model.pt", 3_000)
    os.symlink("../step_200/embed.pt", ckpt / "step_300" / "embed.pt")
    wait_for(lambda: not sealed(s3, workspace, "step_200"), timeout=30)
    assert daemon.stop() == 0

    # Pointed at the file retention deleted from S3 while no daemon runs.
    (ckpt / "step_300" / "embed.pt").unlink()
    os.symlink("../step_100/embed.pt", ckpt / "step_300" / "embed.pt")
    daemon = workspace.start_daemon()

    def relinked() -> bool:
        manifest = sealed(s3, workspace, "step_300")
        return manifest is not None and manifest["links"][0]["file"]["key"] == EMBED

    wait_for(relinked, timeout=30)
    assert object_bytes(s3, workspace.bucket, EMBED) == saved["step_100/embed.pt"]
    assert uploads_of(daemon, "run1/step_100/model.pt") == 0
    assert daemon.stop() == 0
    restored_step_300(workspace, saved, "embed.pt", ("embed.pt",))


def flush_error(result: Any) -> str:
    """The one error line of a flush that exited 1."""
    assert result.returncode == 1, result.stderr
    return next(line for line in result.stderr.splitlines() if not line.startswith("{"))


def link_to_an_excluded_file(workspace: Workspace) -> Path:
    """step_200 links to step_100/embed.pt, which the filters exclude: it never reaches S3.
    Returns the watched directory."""
    ckpt = workspace.checkpoints
    workspace.write_config(watch=[{"path": str(ckpt), "prefix": "run1/",
                                   "exclude": [f"{ckpt}/step_100/embed.pt"]}])
    save_set(workspace, "step_100", ("model.pt", "embed.pt"))
    save_set(workspace, "step_200", ("model.pt",))
    os.symlink("../step_100/embed.pt", ckpt / "step_200" / "embed.pt")
    return ckpt


def test_a_flush_that_leaves_a_set_it_cannot_seal_exits_1_naming_it(workspace: Workspace,
                                                                    s3: Any) -> None:
    """step_200 links to a file the filters exclude, which never reaches S3: every flush (one
    shot, through the daemon, at its stop) says so, and status is not ok meanwhile."""
    link_to_an_excluded_file(workspace)
    error = flush_error(workspace.cli("flush", "-c", "config.yaml"))
    assert error.endswith("1 sets left without a manifest, a file they need not in S3: "
                          "run1/step_200"), error
    assert sealed(s3, workspace, "step_100") and not sealed(s3, workspace, "step_200")

    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("incomplete_sets") == ["run1/step_200"])
    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert "health:       not ok: 1 sets incomplete" in shown.stdout, shown.stdout
    assert workspace.cli("status", "--healthy", "-c", str(workspace.config_file)).returncode == 1
    assert "run1/step_200" in flush_error(workspace.cli("flush", "-c", "config.yaml"))
    assert daemon.stop() == 1
    [incomplete] = daemon.named("flush_incomplete")
    assert incomplete["incomplete_sets"] == ["run1/step_200"]


def test_a_flush_does_not_name_a_set_that_was_incomplete_and_is_gone(workspace: Workspace,
                                                                     s3: Any) -> None:
    """The set the daemon reported incomplete is deleted: the next flush checks it again."""
    ckpt = link_to_an_excluded_file(workspace)
    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("incomplete_sets") == ["run1/step_200"])
    shutil.rmtree(ckpt / "step_200")
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    wait_for(lambda: workspace.status().get("incomplete_sets") == [])
    assert daemon.stop() == 0
