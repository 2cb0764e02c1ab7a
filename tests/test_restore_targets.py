"""Where restore writes a set's files: in its own set's folder below the destination, never
through a symlinked folder that leads out of it or into another set, never through a symlink
at the file's own path, never two listed files into one; the per-folder resolution agrees
with resolving every folder outright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.errors import SpotwatchError
from spotwatch.keys import object_key
from spotwatch.sync.restore.destination import Targets
from spotwatch.sync.restore.set_fetch import restore_newest
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .memory_store import InMemoryObjectStore, crc32_checksum

NAMES = st.sampled_from(["a", "b", "c"])
RELATIVE = st.lists(NAMES, min_size=1, max_size=3).map("/".join)


def reference(destination: Path, relative: str) -> Path | str:
    """Where restore writes: the path's folder resolved outright and the name in it (a symlink
    there is replaced, not followed); else the refusal: where the folder leads out of the
    destination or into a symlink loop, or out of the folder of the path's own set (its first
    component; a top-level file's is the destination)."""
    root = destination.resolve()
    path = destination / relative
    try:
        folder = path.parent.resolve()
    except (RuntimeError, OSError):  # a symlink loop (OSError from Python 3.13)
        return "loop"
    if folder != root and root not in folder.parents:
        return "outside the destination"
    own = root / relative.split("/")[0] if "/" in relative else root
    if folder != own and own not in folder.parents:
        return "outside its set's own folder"
    return folder / path.name


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(RELATIVE, min_size=1, max_size=6, unique=True),
       links=st.lists(st.tuples(RELATIVE, st.booleans(), RELATIVE | st.just(".")), max_size=3),
       destination_is_link=st.booleans())
def test_targets_agree_with_resolving_every_path(
        tmp_path_factory: pytest.TempPathFactory, paths: list[str],
        links: list[tuple[str, bool, str]], destination_is_link: bool) -> None:
    base = tmp_path_factory.mktemp("targets")
    real = base / "real"
    real.mkdir()
    destination = base / "link" if destination_is_link else real
    if destination_is_link:
        destination.symlink_to(real, target_is_directory=True)
    outside = base / "outside"
    outside.mkdir()
    for where, leads_out, to in links:  # symlinks already in the destination
        link = real / where
        if os.path.lexists(link) or not link.parent.is_dir():
            continue
        link.symlink_to((outside if leads_out else real) / to)
    targets = Targets(destination)
    taken: set[Path] = set()
    for relative in paths:
        expected = reference(destination, relative)
        if isinstance(expected, str):
            with pytest.raises(SpotwatchError, match=expected):
                targets.of(relative)
        elif expected in taken:  # a symlink in the destination made two listed files one
            with pytest.raises(SpotwatchError, match="lead to the same file"):
                targets.of(relative)
        else:
            assert targets.of(relative) == expected
            taken.add(expected)


def one_file_set(store: InMemoryObjectStore, path: str, data: bytes) -> Manifest:
    """A set of one file (path below the watched directory) in the store, under run/."""
    key = object_key("run/", path)
    store.put(key, data)
    return Manifest.build(path.split("/")[0], "run/", [
        ManifestEntry(key, path, len(data), 1_000, crc32_checksum(data))])


@pytest.mark.parametrize("leads_out", [True, False])
def test_restore_replaces_a_symlink_at_a_files_path_and_never_writes_through_it(
        tmp_path: Path, store: InMemoryObjectStore, leads_out: bool) -> None:
    """A symlink already where a restored file goes (a kept volume, a restore before) is
    replaced by the file: what it led to, outside the destination or another checkpoint in
    it, keeps its bytes."""
    data = b"the newest checkpoint"
    manifest = one_file_set(store, "last.ckpt", data)
    destination = tmp_path / "restored"
    destination.mkdir()
    led_to = tmp_path / "outside.ckpt" if leads_out else destination / "epoch=0-step=10.ckpt"
    led_to.write_bytes(b"kept")
    (destination / "last.ckpt").symlink_to(led_to)
    report = restore_newest(store, [manifest], destination, "CRC32", None)
    assert report is not None and report.downloaded == 1
    assert not (destination / "last.ckpt").is_symlink()
    assert (destination / "last.ckpt").read_bytes() == data
    assert led_to.read_bytes() == b"kept"


@pytest.mark.parametrize("link", ["step_2 -> step_1", "step_2/opt -> ../step_1/opt"])
def test_restore_never_writes_through_a_symlinked_folder_into_another_set(
        tmp_path: Path, store: InMemoryObjectStore, link: str) -> None:
    """A folder of the set that is a symlink to another set's in the destination is refused
    before any download: written through, the other checkpoint's file would hold this one's
    bytes (and a daemon watching would upload them over its object)."""
    manifest = one_file_set(store, "step_2/opt/state.pt", b"step 2's optimizer state")
    destination = tmp_path / "restored"
    (destination / "step_1/opt").mkdir(parents=True)
    (destination / "step_1/opt/state.pt").write_bytes(b"step 1's optimizer state")
    at, to = link.split(" -> ")
    (destination / at).parent.mkdir(parents=True, exist_ok=True)
    (destination / at).symlink_to(to, target_is_directory=True)
    with pytest.raises(SpotwatchError, match="outside its set's own folder"):
        restore_newest(store, [manifest], destination, "CRC32", None)
    assert (destination / "step_1/opt/state.pt").read_bytes() == b"step 1's optimizer state"
    assert store.calls["download"] == 0
