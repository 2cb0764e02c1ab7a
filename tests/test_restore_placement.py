"""A verified set lands whole or not at all: a move into place that fails takes back the files
placed and puts back what was there (ledger rows included), and a stop while the files move
waits until they all are in place."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotwatch.commands.restore import _stopped_as_by_ctrl_c
from spotwatch.errors import SpotwatchError
from spotwatch.keys import (
    RESTORE_TEMP_SUFFIX,
    is_restore_temporary,
    manifest_key,
    restore_temporary_name,
)
from spotwatch.model import FileVersion
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.placement import NotPlaced, place_all
from spotwatch.sync.restore.beside import with_companions
from spotwatch.sync.restore.candidates import Candidate
from spotwatch.sync.restore.set_fetch import restore_newest
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_manifests

from .conftest import Workspace, object_bytes, wait_for
from .memory_store import InMemoryObjectStore, crc32_checksum
from .test_failure_paths import PREFIX, put_set

SHARDS = {f"f{i}.pt": bytes([i]) * 100 for i in range(6)}
MTIME_NS = 1_000_000_000


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger.sqlite")
    yield opened
    opened.close()


def everything_under(root: Path) -> dict[str, bytes]:
    """Every file below root (hidden ones too) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def placing_into(destination: Path, monkeypatch: pytest.MonkeyPatch,
                 on_move: Any) -> list[str]:
    """os.replace, calling on_move(moved so far) before each rename of a temporary onto its
    target in the destination; the targets moved, in order."""
    moved: list[str] = []
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        into_place = (str(target).startswith(str(destination))
                      and is_restore_temporary(str(source)) and not is_restore_temporary(
                          str(target)) and ".kept" not in str(source))
        if into_place:
            on_move(len(moved))
        real_replace(source, target)
        if into_place:
            moved.append(str(target))

    monkeypatch.setattr(os, "replace", replace)
    return moved


def test_a_move_that_fails_midway_takes_the_set_back_and_puts_back_what_was_there(
        tmp_path: Path, store: InMemoryObjectStore, ledger: Ledger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the third rename: the two files placed are taken back, the older file
    in the way is back with its bytes, and the ledger holds what it held (a row left for a
    file taken back would make delete mirroring delete its object from S3)."""
    put_set(store, "step_1", SHARDS, MTIME_NS)
    destination = tmp_path / "ckpt"
    (destination / "step_1").mkdir(parents=True)
    older = destination / "step_1" / "f4.pt"
    older.write_bytes(b"an older save")
    ledger.record(store.bucket, f"{PREFIX}step_1/f4.pt", older, FileVersion(13, 5), "x")
    before = ledger.objects_in_set(store.bucket, f"{PREFIX}step_1")
    assert ledger.unsettled_sets(store.bucket, PREFIX) == ["step_1"]
    settled_at_first_move: list[list[str]] = []

    def full_at_the_third(count: int) -> None:
        if count == 0:  # settled before the first file lands (a kill -9 between two)
            settled_at_first_move.append(ledger.unsettled_sets(store.bucket, PREFIX))
        if count == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    moved = placing_into(destination, monkeypatch, full_at_the_third)
    with pytest.raises(SpotwatchError) as failed:
        restore_newest(store, list_manifests(store, PREFIX), destination, "CRC32", ledger)
    monkeypatch.undo()
    assert len(moved) == 2  # it did get part of the way
    assert settled_at_first_move == [[]]
    assert everything_under(destination) == {"step_1/f4.pt": b"an older save"}
    assert str(failed.value) == ("restore of step_1 failed: cannot move step_1/f2.pt into "
                                 "place: No space left on device; the destination is as it was")
    assert ledger.objects_in_set(store.bucket, f"{PREFIX}step_1") == before
    assert ledger.unsettled_sets(store.bucket, PREFIX) == ["step_1"]


def test_a_stop_while_the_files_move_waits_until_the_whole_set_is_in_place(
        tmp_path: Path, store: InMemoryObjectStore, ledger: Ledger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM between two renames (as the restore command handles it: a KeyboardInterrupt)
    acts once the last file is in place and recorded."""
    put_set(store, "step_1", SHARDS, MTIME_NS)
    destination = tmp_path / "ckpt"

    def stop_at_the_third(count: int) -> None:
        if count == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    moved = placing_into(destination, monkeypatch, stop_at_the_third)
    with _stopped_as_by_ctrl_c(), pytest.raises(KeyboardInterrupt):
        restore_newest(store, list_manifests(store, PREFIX), destination, "CRC32", ledger)
    monkeypatch.undo()
    assert len(moved) == len(SHARDS)
    assert everything_under(destination) == {f"step_1/{name}": data
                                             for name, data in SHARDS.items()}
    assert sorted(row[0] for row in ledger.objects_in_set(store.bucket, f"{PREFIX}step_1")) \
        == sorted(f"{PREFIX}step_1/{name}" for name in SHARDS)
    assert ledger.unsettled_sets(store.bucket, PREFIX) == []


def test_a_file_in_the_way_that_may_not_be_replaced_is_found_before_the_first_move(
        tmp_path: Path, store: InMemoryObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither linked nor renamed aside (another user's file in a sticky folder): refused with
    nothing moved, and the file kept of another one in the way is gone again."""
    put_set(store, "step_1", SHARDS, MTIME_NS)
    destination = tmp_path / "ckpt"
    (destination / "step_1").mkdir(parents=True)
    for name in ("f1.pt", "f3.pt"):
        (destination / "step_1" / name).write_bytes(b"in the way")
    blocked = str(destination / "step_1" / "f3.pt")
    real_link, real_replace = os.link, os.replace

    def refused(*paths: Any) -> None:  # as the kernel refuses it: unlinked nor replaced
        if blocked in map(str, paths):
            raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", lambda s, d, **k: refused(s) or real_link(s, d, **k))
    monkeypatch.setattr(os, "replace", lambda s, d: refused(s, d) or real_replace(s, d))
    moved = placing_into(destination, monkeypatch, lambda count: None)
    with pytest.raises(SpotwatchError) as failed:
        restore_newest(store, list_manifests(store, PREFIX), destination, "CRC32", None)
    monkeypatch.undo()
    assert everything_under(destination) == {"step_1/f1.pt": b"in the way",
                                             "step_1/f3.pt": b"in the way"}
    assert moved == []
    assert str(failed.value) == ("restore of step_1 failed: cannot replace step_1/f3.pt: "
                                 "Operation not permitted; nothing of the set was placed")


# End to end: the CLI against the moto server.

def restore_cli(workspace: Workspace, *args: str, launcher: tuple[str, ...] = ()
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*launcher, sys.executable, "-m", "spotwatch.cli", "restore", "-c", "config.yaml",
         *args], cwd=workspace.root, env=workspace.env(), capture_output=True, text=True,
        timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's file needs root to make")
def test_a_rename_the_destination_refuses_leaves_it_as_it_was(workspace: Workspace) -> None:
    """Another user's file in a sticky folder may not be replaced: restore (as root without
    its capabilities, as an ordinary user) exits 1 in one line, having placed nothing."""
    for index in (1, 2, 3):
        path = workspace.checkpoints / "step_1" / "a" / f"f{index}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{index}\n")
    (workspace.checkpoints / "step_1" / "z").mkdir()
    (workspace.checkpoints / "step_1" / "z" / "blocked").write_text("good\n")
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    target = workspace.root / "dest"
    sticky = target / "step_1" / "z"
    sticky.mkdir(parents=True)
    target.chmod(0o755)
    (target / "step_1").chmod(0o755)
    workspace.root.chmod(0o755)
    shutil.chown(sticky, "nobody")
    sticky.chmod(0o1777)
    (target / "step_1" / "a").mkdir()
    (target / "step_1" / "a" / "f2").write_text("mine, older\n")
    (sticky / "blocked").write_text("stale\n")
    shutil.chown(sticky / "blocked", "nobody")
    before = everything_under(target)
    result = restore_cli(workspace, "--to", str(target),
                         launcher=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and "Operation not permitted" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert everything_under(target) == before


def test_sigterm_while_the_files_move_leaves_the_set_whole_and_its_manifest_intact(
        workspace: Workspace, s3: Any) -> None:
    """Many small files, restored into the watched directory (each recorded in the ledger as it
    moves): SIGTERM as soon as the first is in place ends the restore (exit 130) with every
    file of the set in place, so a flush afterwards seals nothing over the manifest."""
    count = 1500
    source = workspace.root / "source"
    for index in range(count):
        path = source / "step_1" / f"d{index % 30}" / f"f{index}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(20))
    workspace.write_config(watch=[{"path": str(source), "prefix": "run1/"}],
                           state={"dir": str(workspace.root / "state-source")})
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    workspace.write_config()
    restoring = subprocess.Popen(
        [sys.executable, "-m", "spotwatch.cli", "restore", "-c", "config.yaml"],
        cwd=workspace.root, env=workspace.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)

    def placed() -> bool:
        return any(not is_restore_temporary(p.name) and p.is_file()
                   for p in (workspace.checkpoints / "step_1").rglob("f*"))

    wait_for(lambda: (workspace.checkpoints / "step_1").is_dir() and placed(), interval=0.005)
    restoring.send_signal(signal.SIGTERM)
    _, stderr = restoring.communicate(timeout=60)
    assert restoring.returncode == 130, stderr
    assert "Traceback" not in stderr
    files = [p for p in workspace.checkpoints.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(RESTORE_TEMP_SUFFIX)]
    assert len(files) == count
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    manifest = json.loads(object_bytes(s3, workspace.bucket, manifest_key("run1/", "step_1")))
    assert len(manifest["files"]) == count


def test_a_directory_made_in_a_files_place_during_the_downloads_is_never_moved_aside(
        tmp_path: Path) -> None:
    """Restore refuses a directory where a file goes before it downloads; one made since is
    refused when the set moves into place, and stays where it is with what it holds."""
    (tmp_path / "model.pt").mkdir()
    (tmp_path / "model.pt" / "user.txt").write_text("user data")
    temp = tmp_path / restore_temporary_name("model.pt")
    temp.write_bytes(b"set bytes")
    with pytest.raises(NotPlaced, match=r"model\.pt: Is a directory; nothing of the set"):
        place_all([(temp, tmp_path / "model.pt")], None)
    assert everything_under(tmp_path) == {"model.pt/user.txt": b"user data",
                                          restore_temporary_name("model.pt"): b"set bytes"}


class _LedgerOnAFullDisk:
    """A journal whose write before the second file fails, and whose revert does too."""

    def begin(self) -> None:
        pass

    def placing(self, index: int) -> None:
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    def end(self) -> None:
        pass

    def revert(self) -> None:
        raise RuntimeError("database or disk is full")


def test_a_ledger_that_cannot_be_put_back_still_leaves_no_users_file_hidden(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files in the way moved aside (no hard links here), the second file's ledger write and
    then the revert fail: the file not yet replaced is back under its own name, never left
    under a name the next restore removes."""
    moves = []
    for name in ("a", "b"):
        (tmp_path / name).write_text(f"user's own {name}")
        temp = tmp_path / restore_temporary_name(name)
        temp.write_text(f"set {name}")
        moves.append((temp, tmp_path / name))

    def no_hard_links(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(NotPlaced, match=r"b into place.*1 of 2 files"):
        place_all(moves, _LedgerOnAFullDisk())
    monkeypatch.undo()
    left = everything_under(tmp_path)
    assert left["a"] == b"set a" and left["b"] == b"user's own b"
    assert not any(".b.kept" in name for name in left)


def test_a_pointer_that_fails_after_its_step_is_in_place_says_the_step_is_there(
        tmp_path: Path, store: InMemoryObjectStore) -> None:
    """global_step200 is placed, then `latest` beside it cannot be fetched (a full disk, S3
    refusing it): the error names the failure and says the step was restored before it, not
    only "restore of latest failed" with the step silently in place."""
    put_set(store, "global_step200", {"model.pt": b"two hundred"}, MTIME_NS)
    data = b"global_step200"
    store.put(f"{PREFIX}latest", data)
    entry = ManifestEntry(f"{PREFIX}latest", "latest", len(data), MTIME_NS, crc32_checksum(data))
    store.put(manifest_key(PREFIX, "latest"),
              Manifest.build("latest", PREFIX, [entry]).to_json().encode())
    store.fail("download", times=None, key=f"{PREFIX}latest", permanent=True)
    destination = tmp_path / "restored"
    manifests = {m.set_name: m for m in list_manifests(store, PREFIX)}
    report = restore_newest(store, [manifests["global_step200"]], destination, "CRC32", None)
    assert report is not None
    with pytest.raises(SpotwatchError) as failed:
        with_companions(report, [Candidate.of(manifests["latest"])], store, "CRC32", None,
                        set(manifests), asked_for=False)
    assert str(failed.value).startswith("restore of latest failed: ")
    assert str(failed.value).endswith(f" (global_step200 is restored into {destination} "
                                      "already)")
    assert everything_under(destination) == {"global_step200/model.pt": b"two hundred"}
