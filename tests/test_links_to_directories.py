"""A link to a directory of another set: a dedup step saves step_200 with `tokenizer ->
../step_100/tokenizer` for a folder that did not change. step_200's manifest records every file
below that folder, so that retention never deletes them while step_200 is kept, and restore
gives back step_200 with its tokenizer (verified), as a link where step_100's folder is there
and holds the same bytes, else as files below the link's path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from spotwatch.keys import object_key
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry, ManifestError

from .conftest import Workspace, keys_in, wait_for
from .memory_store import FakeClock, InMemoryObjectStore, crc32_checksum
from .test_checkpoint_sets import restore
from .test_daemon_e2e import save_checkpoint
from .test_failure_paths import PREFIX as FAILING_PREFIX
from .test_failure_paths import write
from .test_links_between_sets import MANIFESTS, step_200_link_once_durable
from .test_manifests import PREFIX

TOKENIZER = ("tokenizer/vocab.json", "tokenizer/merges.txt")


def test_retention_keeps_a_linked_directory_and_restore_brings_it_back(
        workspace: Workspace, s3: Any) -> None:
    ckpt = workspace.checkpoints
    workspace.write_config(sync={"keep_sets": 1})
    daemon = workspace.start_daemon()
    saved = {name: save_checkpoint(ckpt / "step_100" / name, 2_000)
             for name in ("model.pt", *TOKENIZER)}
    wait_for(lambda: f"{MANIFESTS}step_100.json" in keys_in(s3, workspace.bucket))
    # The dedup step: saved beside, with the unchanged folder linked, then renamed into place.
    staging = ckpt / "step_200.tmp"
    model = save_checkpoint(staging / "model.pt", 3_000)
    os.symlink("../step_100/tokenizer", staging / "tokenizer")
    staging.rename(ckpt / "step_200")
    # Retention retires step_100 once step_200 is sealed.
    wait_for(lambda: "run1/step_100/model.pt" not in keys_in(s3, workspace.bucket), timeout=30)
    assert daemon.stop() == 0
    left = keys_in(s3, workspace.bucket)
    assert {f"run1/step_100/{name}" for name in TOKENIZER} <= left
    assert f"{MANIFESTS}step_100.json" not in left

    fresh = workspace.root / "fresh"
    result = restore(workspace, "--to", str(fresh))
    assert result.returncode == 0, result.stderr
    assert "restored step_200" in result.stdout
    assert "step_200/tokenizer restored as a directory of 2 files" in result.stdout
    assert not (fresh / "step_200" / "tokenizer").is_symlink()
    assert (fresh / "step_200" / "model.pt").read_bytes() == model
    for name in TOKENIZER:
        assert (fresh / "step_200" / name).read_bytes() == saved[name]
    assert not (fresh / "step_100").exists()

    # Where step_100's folder is there with the same bytes, the link is made again.
    linked = workspace.root / "linked"
    shutil.copytree(ckpt / "step_100" / "tokenizer", linked / "step_100" / "tokenizer")
    result = restore(workspace, "--to", str(linked))
    assert result.returncode == 0, result.stderr
    assert "link step_200/tokenizer -> ../step_100/tokenizer" in result.stdout
    assert os.readlink(linked / "step_200" / "tokenizer") == "../step_100/tokenizer"

    # Once a file there holds other bytes, step_200 gets those it was sealed with, in a
    # directory in the link's place.
    (linked / "step_100" / "tokenizer" / "merges.txt").write_bytes(os.urandom(2_000))
    result = restore(workspace, "--to", str(linked))
    assert result.returncode == 0, result.stderr
    assert not (linked / "step_200" / "tokenizer").is_symlink()
    for name in TOKENIZER:
        assert (linked / "step_200" / name).read_bytes() == saved[name]

    # That directory is checked file by file again, though step_100's folder matches again.
    shutil.copy2(ckpt / "step_100" / "tokenizer" / "merges.txt",
                 linked / "step_100" / "tokenizer" / "merges.txt")
    (linked / "step_200" / "tokenizer" / "vocab.json").write_bytes(os.urandom(2_000))
    result = restore(workspace, "--to", str(linked))
    assert result.returncode == 0, result.stderr
    for name in TOKENIZER:
        assert (linked / "step_200" / name).read_bytes() == saved[name]


def test_a_set_waits_for_the_files_of_the_directory_its_link_leads_to(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """A file of the linked folder fails to upload at first: the set linking to the folder is
    sealed only once that file is durable, and then lists its files as seen through the link."""
    root = tmp_path / "ckpt"
    write(root, "step_100/tokenizer/vocab.json", b"vocab")
    write(root, "step_100/tokenizer/merges.txt", b"merges")
    write(root, "step_200/model.pt", b"model")
    os.symlink("../step_100/tokenizer", root / "step_200" / "tokenizer")
    link = step_200_link_once_durable(root, tmp_path, store, clock,
                                      "step_100/tokenizer/vocab.json")
    assert link.file is None
    assert [(entry.path, entry.key, entry.checksum) for entry in link.files] == [
        ("step_200/tokenizer/merges.txt", f"{FAILING_PREFIX}step_100/tokenizer/merges.txt",
         crc32_checksum(b"merges")),
        ("step_200/tokenizer/vocab.json", f"{FAILING_PREFIX}step_100/tokenizer/vocab.json",
         crc32_checksum(b"vocab"))]


def _entry(path: str, key_path: str | None = None, **change: Any) -> dict[str, Any]:
    return {"key": PREFIX + (key_path or path), "path": path, "size": 5, "mtime_ns": 1,
            "checksum": "c", **change}


def _linking(**link: Any) -> dict[str, Any]:
    return {"format": 1, "set": "step_2", "prefix": PREFIX, "sealed_at": 1.0,
            "files": [_entry("step_2/model.pt")],
            "links": [{"path": "step_2/tok", "target": "../step_1/tok", **link}]}


def test_a_linked_directory_reads_back_and_a_manifest_without_one_as_before() -> None:
    seen = ManifestEntry(object_key(PREFIX, "step_1/tok/vocab.json"), "step_2/tok/vocab.json",
                         5, 1, "c", None, "CRC32", '"etag"')
    manifest = Manifest.build("step_2", PREFIX, [], [
        LinkEntry("step_2/tok", "../step_1/tok", files=(seen,)),
        LinkEntry("step_2/latest.pt", "model.pt")])
    assert Manifest.from_json(manifest.to_json(), PREFIX) == manifest
    assert json.loads(manifest.to_json())["links"][0] == {"path": "step_2/latest.pt",
                                                          "target": "model.pt"}
    # Retention and completeness see the object as its own set lists it.
    [own] = manifest.linked_files
    assert (own.key, own.path) == (seen.key, "step_1/tok/vocab.json")

    older = Manifest.from_json(json.dumps(_linking()), PREFIX)
    assert older.links == (LinkEntry("step_2/tok", "../step_1/tok"),)
    assert older.linked_files == ()


@pytest.mark.parametrize("link", [
    {"files": [_entry("step_2/tok/a", "step_1/tok/a", key="other/step_1/tok/a")]},
    {"files": [_entry("step_2/tok/a", ".spotwatch/manifests/step_1.json")]},
    {"files": [_entry("step_2/tok/a", "step_1/../x")]},
    {"files": [_entry("step_2/other/a", "step_1/tok/a")]},  # not below the link
    {"files": [_entry("step_2/tok/a", "step_1/tok/a", size=-1)]},
    {"files": [_entry("step_2/tok/a", "step_1/tok/a"), _entry("step_2/tok/a", "step_1/tok/b")]},
    {"files": [_entry("step_2/tok/a", "step_1/tok/a")], "file": _entry("step_1/tok/a")},
    {"files": ["run1/step_1/tok/a"]},
    {"files": {"path": "step_2/tok/a"}},
])
def test_a_malformed_linked_directory_is_refused(link: dict[str, Any]) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(_linking(**link)), PREFIX)


def test_a_link_restore_would_replace_by_a_directory_stays_when_the_set_does_not_land(
        workspace: Workspace, s3: Any) -> None:
    """step_200/tokenizer leads to a folder whose bytes differ: a restore of step_200 would put
    a directory in its place, but step_200 turns out corrupt; the link is as it was."""
    ckpt = workspace.checkpoints
    for name in TOKENIZER:
        save_checkpoint(ckpt / "step_100" / name, 2_000)
    save_checkpoint(ckpt / "step_200" / "model.pt", 3_000)
    os.symlink("../step_100/tokenizer", ckpt / "step_200" / "tokenizer")
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    target = workspace.root / "in_use"
    shutil.copytree(ckpt / "step_100" / "tokenizer", target / "step_100" / "tokenizer")
    (target / "step_100" / "tokenizer" / "merges.txt").write_bytes(os.urandom(2_000))
    (target / "step_200").mkdir()
    os.symlink("../step_100/tokenizer", target / "step_200" / "tokenizer")
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_200/model.pt", Body=os.urandom(3_000))
    result = restore(workspace, "--set", "step_200", "--to", str(target))
    assert result.returncode == 1, result.stdout
    assert os.readlink(target / "step_200" / "tokenizer") == "../step_100/tokenizer"
