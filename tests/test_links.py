"""The links of a manifest: untrusted input, read only when they lead inside the tree; a link
has no object, so it never makes its set incomplete."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from spotwatch.keys import RESERVED_SET, object_key
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry, ManifestError
from spotwatch.sync.sets.remote import is_complete, is_intact

from .memory_store import InMemoryObjectStore, crc32_checksum
from .test_manifests import PREFIX, manifests, names


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
