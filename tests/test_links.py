"""Symlinks below a watched directory: one that leads inside it (Lightning's `last.ckpt`, a
`latest -> step_100`) is recorded in its set's manifest and made again by restore; any other
stays skipped; a manifest's links are untrusted input."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from spotwatch.keys import RESERVED_SET, manifest_key, object_key
from spotwatch.sync.pointers import repointed_link
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry, ManifestError
from spotwatch.sync.sets.remote import is_complete, is_intact

from .conftest import Workspace, keys_in, object_bytes, wait_for
from .memory_store import InMemoryObjectStore, crc32_checksum
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary, save_checkpoint
from .test_manifests import PREFIX, manifests, names
from .test_restore_safety import named


def lightning_link(directory: Path, target: str) -> None:
    """As ModelCheckpoint(save_last="link") points last.ckpt at its newest checkpoint: the old
    link removed, a new one made with the target relative to the link's directory."""
    link = directory / "last.ckpt"
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)


def links_in_s3(s3: Any, workspace: Workspace, set_name: str) -> dict[str, str] | None:
    """path -> target of the links the set's manifest lists (None: no manifest yet)."""
    key = manifest_key("run1/", set_name)
    if key not in keys_in(s3, workspace.bucket):
        return None
    data = json.loads(object_bytes(s3, workspace.bucket, key))
    return {link["path"]: link["target"] for link in data.get("links", [])}


def test_lightning_last_ckpt_comes_back_as_a_link_to_the_newest_checkpoint(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    ckpt = workspace.checkpoints
    daemon = workspace.start_daemon()
    save_checkpoint(ckpt / "epoch=0-step=10.ckpt", 40_000)
    lightning_link(ckpt, "epoch=0-step=10.ckpt")
    wait_for(lambda: links_in_s3(s3, workspace, "last.ckpt")
             == {"last.ckpt": "epoch=0-step=10.ckpt"})
    newest = save_checkpoint(ckpt / "epoch=1-step=20.ckpt", 50_000)
    lightning_link(ckpt, "epoch=1-step=20.ckpt")  # re-pointed at the next save
    wait_for(lambda: links_in_s3(s3, workspace, "last.ckpt")
             == {"last.ckpt": "epoch=1-step=20.ckpt"}
             and links_in_s3(s3, workspace, "epoch=1-step=20.ckpt") == {})
    assert daemon.stop() == 0
    assert not daemon.named("symlink_skipped")
    # The link has no object: its target's bytes are in S3 once.
    assert {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key} == {
        "run1/epoch=0-step=10.ckpt", "run1/epoch=1-step=20.ckpt"}

    fresh = tmp_path / "fresh"
    result = restore(workspace, "--to", str(fresh))
    assert result.returncode == 0, result.stderr
    assert "restored epoch=1-step=20.ckpt" in result.stdout
    assert "link last.ckpt -> epoch=1-step=20.ckpt" in result.stdout
    assert os.readlink(fresh / "last.ckpt") == "epoch=1-step=20.ckpt"
    assert (fresh / "last.ckpt").read_bytes() == newest
    assert sorted(os.listdir(fresh)) == ["epoch=1-step=20.ckpt", "last.ckpt"]  # no temporary


def test_a_link_is_sealed_again_only_when_it_leads_elsewhere(workspace: Workspace,
                                                             s3: Any) -> None:
    """Each flush is a start: the ledger keeps the links as S3's manifests list them, so a
    link re-pointed while no daemon ran is sealed anew, and an unchanged one is not."""
    ckpt = workspace.checkpoints
    save_checkpoint(ckpt / "step_1" / "model.pt", 1000)
    save_checkpoint(ckpt / "step_2" / "model.pt", 1000)
    (ckpt / "latest").symlink_to("step_1", target_is_directory=True)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    key = manifest_key("run1/", "latest")
    sealed = s3.head_object(Bucket=workspace.bucket, Key=key)["ETag"]
    assert links_in_s3(s3, workspace, "latest") == {"latest": "step_1"}

    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert s3.head_object(Bucket=workspace.bucket, Key=key)["ETag"] == sealed  # not rewritten

    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to("step_2", target_is_directory=True)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert links_in_s3(s3, workspace, "latest") == {"latest": "step_2"}


def test_links_out_of_the_tree_or_dangling_stay_skipped_and_say_why(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    ckpt = workspace.checkpoints
    secret = tmp_path / "elsewhere" / "secret.ckpt"
    save_checkpoint(secret, 500)
    (ckpt / "absolute.ckpt").symlink_to(secret)
    (ckpt / "up.ckpt").symlink_to("../elsewhere/secret.ckpt")
    (ckpt / "elsewhere").symlink_to(secret.parent, target_is_directory=True)
    (ckpt / "through.ckpt").symlink_to("elsewhere/secret.ckpt")  # inside as written, not really
    (ckpt / "dangling.ckpt").symlink_to("epoch=9-step=90.ckpt")
    save_checkpoint(ckpt / "epoch=0-step=10.ckpt", 1000)
    lightning_link(ckpt, "epoch=0-step=10.ckpt")
    daemon = workspace.start_daemon()
    daemon.wait_for_event("symlink_skipped", count=5)
    wait_for(lambda: links_in_s3(s3, workspace, "last.ckpt") is not None)
    assert daemon.stop() == 0
    reasons = {Path(event["path"]).name: event["reason"]
               for event in daemon.named("symlink_skipped")}
    outside = "its target is outside the watched directory"
    assert reasons == {"absolute.ckpt": outside, "up.ckpt": outside, "elsewhere": outside,
                       "through.ckpt": outside,
                       "dangling.ckpt": "dangling: its target does not exist"}
    assert {key for key in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in key} == {
        "run1/epoch=0-step=10.ckpt"}
    assert {key.rsplit("/", 1)[1] for key in keys_in(s3, workspace.bucket)
            if "/manifests/" in key} == {"epoch=0-step=10.ckpt.json", "last.ckpt.json"}


def test_a_pointer_link_to_a_checkpoint_not_restored_leads_to_the_one_restored(
        workspace: Workspace, s3: Any) -> None:
    """The newest checkpoint corrupt in S3: the one before it is restored, and last.ckpt, which
    named the newest, leads to the one restored (Lightning's ckpt_path="last" loads it instead
    of starting over). A link not named as a pointer is left out (named), never dangling; a set
    of such links alone, asked for by name, is an error."""
    ckpt = workspace.checkpoints
    save_checkpoint(ckpt / "epoch=0-step=10.ckpt", 1000)
    save_checkpoint(ckpt / "epoch=1-step=20.ckpt", 1000)
    os.utime(ckpt / "epoch=0-step=10.ckpt", (1_700_000_000, 1_700_000_000))
    lightning_link(ckpt, "epoch=1-step=20.ckpt")
    os.symlink("./epoch=1-step=20.ckpt", ckpt / "best.ckpt")
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    s3.put_object(Bucket=workspace.bucket, Key="run1/epoch=1-step=20.ckpt", Body=b"x" * 1000)
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored epoch=0-step=10.ckpt" in result.stdout
    assert "last.ckpt now names epoch=0-step=10.ckpt (was epoch=1-step=20.ckpt)" in result.stdout
    assert sorted(os.listdir(target)) == ["epoch=0-step=10.ckpt", "last.ckpt"]
    assert os.readlink(target / "last.ckpt") == "epoch=0-step=10.ckpt"
    [skipped] = named(result.stderr, "link_not_restored")
    assert skipped["path"] == "best.ckpt" and skipped["target"] == "./epoch=1-step=20.ckpt"
    assert "link best.ckpt -> ./epoch=1-step=20.ckpt not made" in result.stdout
    # Asked for by name, a set of links none of which can be made restores nothing: an error.
    alone = restore(workspace, "--to", str(workspace.root / "alone"), "--set", "best.ckpt")
    assert alone.returncode == 1, alone.stdout
    assert alone.stderr.splitlines()[-1] == (
        "spotwatch: error: nothing of set 'best.ckpt' restored: it holds only links, and none "
        "could be made (best.ckpt -> ./epoch=1-step=20.ckpt: see the warnings)")


@pytest.mark.parametrize(("link", "target", "restored", "expected"), [
    ("last.ckpt", "epoch=1-step=20.ckpt", "epoch=0-step=10.ckpt", "epoch=0-step=10.ckpt"),
    ("latest", "./step_300/", "step_200", "./step_200/"),
    ("latest", "step_300/model.pt", "step_200", "step_200/model.pt"),
    ("last_step", "step_300", "step_200", "step_200"),
    ("latest", "step_200", "step_200", None),  # leads to the set restored already
    ("best.ckpt", "epoch=1-step=20.ckpt", "epoch=0-step=10.ckpt", None),  # not a pointer
    ("latest", "run_300", "step_200", None),  # another series
    ("latest", "../step_300", "step_200", None),
    ("sub/latest", "step_300", "step_200", None),  # not beside the sets
])
def test_only_a_pointer_link_beside_the_sets_is_repointed(
        link: str, target: str, restored: str, expected: str | None) -> None:
    assert repointed_link(link, target, restored) == expected


def test_a_link_has_no_object_and_never_makes_its_set_incomplete(
        store: InMemoryObjectStore) -> None:
    data = b"weights"
    key = object_key(PREFIX, "step_1/model.pt")
    store.put(key, data)
    entry = ManifestEntry(key, "step_1/model.pt", len(data), 1, crc32_checksum(data))
    with_link = Manifest.build("step_1", PREFIX, [entry],
                               [LinkEntry("step_1/latest.pt", "model.pt")])
    links_only = Manifest.build("last.ckpt", PREFIX, [], [LinkEntry("last.ckpt", "step_1")])
    for manifest in (with_link, links_only):
        assert is_complete(store, manifest) and is_intact(store, manifest)


# Link texts: components that step into a folder, stay, or step out, maybe absolute or with
# a NUL; 'ROOT' is never one of them, so a text that steps out cannot come back in by name.
link_texts = st.tuples(
    st.sampled_from(["", "/"]),
    st.lists(st.sampled_from(["a", "b", ".", "..", ""]), max_size=5).map("/".join),
    st.sampled_from(["", "\0"])).map("".join)


def leads_inside(path: str, target: str) -> bool:
    """Reference: a relative text without NUL whose join with the link's folder, normalised,
    is below ROOT."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.join("/ROOT", posixpath.dirname(path), target)
    return posixpath.normpath(joined).startswith("/ROOT/")


@given(names.filter(lambda name: name != RESERVED_SET),
       st.lists(st.sampled_from(["a", "b"]), max_size=2), link_texts)
def test_a_link_is_accepted_exactly_when_it_leads_inside_the_tree(
        set_name: str, folders: list[str], target: str) -> None:
    path = "/".join([set_name, *folders, "link"]) if folders else set_name
    data = {"format": 1, "set": set_name, "prefix": PREFIX, "files": [], "sealed_at": 1.0,
            "links": [{"path": path, "target": target}]}
    if leads_inside(path, target):
        manifest = Manifest.from_json(json.dumps(data), PREFIX)
        assert manifest.links == (LinkEntry(path, target),)
        assert Manifest.from_json(manifest.to_json(), PREFIX) == manifest
    else:
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(data), PREFIX)


@given(manifests(), st.lists(st.sampled_from(["model.pt", "../other", "x/../y"]), max_size=3))
def test_links_read_back_unchanged_and_a_manifest_without_them_is_as_before(
        manifest: Manifest, targets: list[str]) -> None:
    links = [LinkEntry(f"{manifest.set_name}/link{i}", target) for i, target in enumerate(targets)]
    paths = [entry.path for entry in manifest.files]
    # As in a file tree: a link is not also a file, nor in a file, nor a folder of one.
    assume(not links or not any(path == manifest.set_name or path.startswith(f"{link.path}/")
                                or path == link.path for path in paths for link in links))
    linked = Manifest.build(manifest.set_name, PREFIX, list(manifest.files), links)
    assert Manifest.from_json(linked.to_json(), PREFIX) == linked
    assert ("links" in json.loads(linked.to_json())) == bool(links)


def _linked(**change: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": 1, "set": "step_1", "prefix": PREFIX, "sealed_at": 1.0,
        "files": [{"key": "run1/step_1/a.pt", "path": "step_1/a.pt", "size": 1, "mtime_ns": 1,
                   "checksum": "c"}],
        "links": [{"path": "step_1/latest", "target": "a.pt"}]}
    data["links"][0].update(change)
    return data


def test_a_well_formed_link_is_read() -> None:
    assert Manifest.from_json(json.dumps(_linked()), PREFIX).links == (
        LinkEntry("step_1/latest", "a.pt"),)


@pytest.mark.parametrize("data", [
    _linked(target="/etc/passwd"),  # absolute
    _linked(target="../../outside"),  # out of the tree restored
    _linked(target="../step_1/../../x"),  # out, through a folder
    _linked(target="a\0.pt"),
    _linked(target=""),
    _linked(target=7),
    _linked(path="step_2/latest"),  # outside its set
    _linked(path="step_1/a.pt"),  # also a file
    _linked(path="step_1/a.pt/x"),  # below a file
    _linked(path="step_1/../x"),
    {**_linked(), "links": {"path": "step_1/latest"}},  # not a list
    {**_linked(), "links": ["step_1/latest"]},  # an entry that is no object
    _linked(target=".."),  # the watched directory itself
])
def test_a_malformed_link_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(data), PREFIX)


def _links_of(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): os.readlink(path)
            for path in directory.rglob("*") if path.is_symlink()}


def test_a_link_to_another_link_of_its_set_is_made_in_the_same_restore(
        workspace: Workspace, s3: Any, tmp_path: Path) -> None:
    """Chains (a link to a link, a link through a linked directory) come back whole, whatever
    order the manifest lists them in."""
    step = workspace.checkpoints / "step_2"
    weights = save_checkpoint(step / "model.safetensors", 3000)
    x = save_checkpoint(step / "sub" / "x.bin", 2000)
    (step / "weights.pt").symlink_to("model.safetensors")
    (step / "chain.pt").symlink_to("weights.pt")  # listed before its target
    (step / "subl").symlink_to("sub", target_is_directory=True)
    (step / "a.bin").symlink_to("subl/x.bin")  # listed before the directory link it goes through
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert links_in_s3(s3, workspace, "step_2") == {
        "step_2/weights.pt": "model.safetensors", "step_2/chain.pt": "weights.pt",
        "step_2/subl": "sub", "step_2/a.bin": "subl/x.bin"}
    back = tmp_path / "back"
    result = restore(workspace, "--to", str(back))
    assert result.returncode == 0, result.stderr
    assert "not made" not in result.stdout + result.stderr
    assert _links_of(back / "step_2") == {"weights.pt": "model.safetensors",
                                          "chain.pt": "weights.pt", "subl": "sub",
                                          "a.bin": "subl/x.bin"}
    assert (back / "step_2" / "chain.pt").read_bytes() == weights
    assert (back / "step_2" / "a.bin").read_bytes() == x


def test_a_set_restored_beside_a_daemon_keeps_its_links_in_s3_when_it_is_sealed_again(
        workspace: Workspace, s3: Any) -> None:
    """A link to a file of a set not restored comes back as a file, which a daemon watching
    the destination uploads and seals the set again with: the manifest it writes still lists
    the set's links, whichever of its seal and their making comes first."""
    ckpt = workspace.checkpoints
    save_checkpoint(ckpt / "step_1" / "embed.pt", 2000)
    model = save_checkpoint(ckpt / "step_2" / "model.safetensors", 3000)
    (ckpt / "step_2" / "weights.pt").symlink_to("model.safetensors")
    (ckpt / "step_2" / "embed.pt").symlink_to("../step_1/embed.pt")
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert links_in_s3(s3, workspace, "step_2") == {"step_2/weights.pt": "model.safetensors",
                                                    "step_2/embed.pt": "../step_1/embed.pt"}
    ckpt.rename(workspace.root / "saved")
    ckpt.mkdir()
    daemon = workspace.start_daemon()
    result = restore(workspace, "--set", "step_2", "--to", str(ckpt))
    assert result.returncode == 0, result.stderr
    assert (ckpt / "step_2" / "weights.pt").read_bytes() == model
    # Sealed again with embed.pt a file of its own, and weights.pt still a link.
    wait_for(lambda: links_in_s3(s3, workspace, "step_2")
             == {"step_2/weights.pt": "model.safetensors"}
             and "run1/step_2/embed.pt" in keys_in(s3, workspace.bucket), timeout=30)
    assert daemon.stop() == 0
    assert links_in_s3(s3, workspace, "step_2") == {"step_2/weights.pt": "model.safetensors"}


def test_a_restore_into_the_watched_directory_is_no_upload_in_status(
        workspace: Workspace, s3: Any) -> None:
    """On a new instance: status's last upload is the restored set's seal, not the restore."""
    save_checkpoint(workspace.checkpoints / "step_2" / "model.pt", 3000)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    sealed_at = json.loads(object_bytes(s3, workspace.bucket,
                                        manifest_key("run1/", "step_2")))["sealed_at"]
    shutil.rmtree(workspace.root / "state")
    shutil.rmtree(workspace.checkpoints)
    workspace.checkpoints.mkdir()
    restored = restore(workspace, "--to", str(workspace.checkpoints))
    assert restored.returncode == 0, restored.stderr
    report = json.loads(workspace.cli("status", "--json", "-c", "config.yaml").stdout)
    assert report["uploaded_objects"] == 1  # in the ledger: a daemon uploads nothing again
    assert report["last_upload_at"] == sealed_at
