"""A file whose own format says it is cut short (a trainer killed mid-save in place) is never
uploaded over the good version in S3: it counts as still being written until a complete
version is written."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spotwatch.config import WatchDir
from spotwatch.keys import manifest_key
from spotwatch.sync.formats import State, check
from spotwatch.sync.tracker import ChangeTracker

from .conftest import Workspace, keys_in, object_bytes, wait_for
from .memory_store import FakeClock, InMemoryObjectStore
from .test_failure_paths import PREFIX, QUIET_SECONDS, engine_on, pump_until

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

_members = st.lists(st.tuples(st.text("abcdefgh/_.", min_size=1, max_size=12),
                              st.binary(max_size=3000)), min_size=1, max_size=5,
                    unique_by=lambda member: member[0])


def _zip_bytes(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED,
               comment: bytes = b"", force_zip64: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.comment = comment
        for name, data in members:
            with archive.open(name, "w", force_zip64=force_zip64) as member:
                member.write(data)
    return buffer.getvalue()


def _with_zip64_end(archive: bytes) -> bytes:
    """The archive with a ZIP64 end record and its locator before the end record, as
    torch.save (miniz) writes every archive, whether it needs one or not."""
    eocd_at = len(archive) - 22  # no comment
    (_, _, _, _, entries, cd_size, cd_offset, _) = struct.unpack(
        "<4s4H2LH", archive[eocd_at:])
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
                         cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd_at, 1)
    return archive[:eocd_at] + record + locator + archive[eocd_at:]


def _safetensors_bytes(tensors: list[int], metadata: bool, pad: int) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}} if metadata else {}
    offset = 0
    for index, size in enumerate(tensors):
        header[f"t{index}"] = {"dtype": "U8", "shape": [size], "data_offsets": [offset,
                                                                               offset + size]}
        offset += size
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + os.urandom(offset)


def _verdict(tmp_path: Path, data: bytes, name: str = "model.pt") -> State:
    path = tmp_path / name
    path.write_bytes(data)
    return check(path).state


@FAST
@given(members=_members, compressed=st.booleans(), comment=st.binary(max_size=40),
       zip64=st.booleans(), zip64_end=st.booleans(), data=st.data())
def test_a_zip_is_complete_and_every_prefix_of_it_cut_short(
        tmp_path: Path, members: list[tuple[str, bytes]], compressed: bool, comment: bytes,
        zip64: bool, zip64_end: bool, data: st.DataObject) -> None:
    whole = _zip_bytes(members, zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED,
                       b"" if zip64_end else comment, zip64)
    if zip64_end:
        whole = _with_zip64_end(whole)
        assert zipfile.ZipFile(io.BytesIO(whole)).testzip() is None  # readers take it
    assert _verdict(tmp_path, whole) is State.COMPLETE
    # Under 4 bytes, by its name: a .pt file never holds only the first bytes of a zip's magic.
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert _verdict(tmp_path, whole[:cut]) is State.CUT_SHORT
    if cut >= 4:  # from 4 bytes on, the magic says it is a zip, whatever its name
        assert _verdict(tmp_path, whole[:cut], "archive.bin") is State.CUT_SHORT


def test_a_large_comment_and_an_empty_zip_are_complete(tmp_path: Path) -> None:
    whole = _zip_bytes([("a", b"x" * 100)], comment=b"PK\x05\x06" + b"c" * 65_000)
    assert _verdict(tmp_path, whole) is State.COMPLETE
    assert _verdict(tmp_path, whole[:-1]) is State.CUT_SHORT
    assert _verdict(tmp_path, _zip_bytes([])[:22]) is State.COMPLETE


@FAST
@given(tensors=st.lists(st.integers(0, 2000), max_size=6), metadata=st.booleans(),
       pad=st.integers(0, 7), data=st.data())
def test_a_safetensors_file_is_complete_and_every_prefix_of_it_cut_short(
        tmp_path: Path, tensors: list[int], metadata: bool, pad: int,
        data: st.DataObject) -> None:
    whole = _safetensors_bytes(tensors, metadata, pad)
    assert _verdict(tmp_path, whole, "model.safetensors") is State.COMPLETE
    # Up to 8 bytes (the header's length), any bytes may start one: cut short by its name.
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert _verdict(tmp_path, whole[:cut], "model.safetensors") is State.CUT_SHORT


@FAST
@given(blob=st.binary(max_size=4000))
def test_bytes_of_other_formats_are_unknown(tmp_path: Path, blob: bytes) -> None:
    assume(not blob.startswith(b"PK") and blob[8:9] != b"{")
    assert _verdict(tmp_path, blob, "data.bin") is State.UNKNOWN
    if blob and not b"PK\x03\x04".startswith(blob[:4]):  # no prefix of a zip's magic either
        assert _verdict(tmp_path, blob) is State.UNKNOWN


def test_other_formats_and_markers_are_unknown(tmp_path: Path) -> None:
    assert _verdict(tmp_path, b'{"step": 3}\n', "trainer_state.json") is State.UNKNOWN
    assert _verdict(tmp_path, b"\x80\x02}q\x00.", "legacy.pt") is State.UNKNOWN
    assert _verdict(tmp_path, b"", "COMPLETE") is State.UNKNOWN  # a marker: empty by design
    assert _verdict(tmp_path, b"", "errors.txt") is State.UNKNOWN  # emptied on purpose
    # A safetensors-shaped head under another name, or with a header that does not parse,
    # proves nothing.
    shaped = struct.pack("<Q", 5000) + b'{"a": 1'
    assert _verdict(tmp_path, shaped, "data.bin") is State.UNKNOWN
    broken = struct.pack("<Q", 9) + b'{"a": 1e9999}'[:9]
    assert _verdict(tmp_path, broken + b"x" * 10, "model.safetensors") is State.UNKNOWN


def test_a_member_holding_an_end_record_signature_does_not_end_a_cut_short_zip(
        tmp_path: Path) -> None:
    # Cut where a stored member's bytes ("PK\x05\x06" and the next member's header) end as a
    # record with no comment would: only the signature, not an archive's end record.
    whole = _zip_bytes([("_", b"PK\x05\x06"), ("/", b"")])
    assert _verdict(tmp_path, whole) is State.COMPLETE
    assert _verdict(tmp_path, whole[:53]) is State.CUT_SHORT
    # Entry counts past 65,535 are in the ZIP64 record its locator leads to.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(0x10000 + 1):
            archive.writestr(str(index), b"")
    assert _verdict(tmp_path, buffer.getvalue()) is State.COMPLETE


def test_a_zip_with_bytes_after_its_end_record_is_not_called_cut_short(tmp_path: Path) -> None:
    whole = _zip_bytes([("a", b"x" * 100)])
    assert _verdict(tmp_path, whole + b"\0" * 100) is State.UNKNOWN


def test_an_empty_file_is_cut_short_only_where_its_format_is_never_empty(
        tmp_path: Path) -> None:
    assert _verdict(tmp_path, b"", "epoch=0-step=3.ckpt") is State.CUT_SHORT
    assert _verdict(tmp_path, b"", "model.safetensors") is State.CUT_SHORT
    assert _verdict(tmp_path, b"", "data.bin") is State.UNKNOWN


def test_a_pt_file_of_a_few_bytes_is_cut_short_only_where_they_start_a_zip(
        tmp_path: Path) -> None:
    assert _verdict(tmp_path, b"PK\x03", "model.pt") is State.CUT_SHORT
    assert _verdict(tmp_path, b"P", "epoch=0-step=3.ckpt") is State.CUT_SHORT
    assert _verdict(tmp_path, b"PK\x05", "model.pth") is State.CUT_SHORT  # an empty archive's
    assert _verdict(tmp_path, b"PK\x03", "notes.txt") is State.UNKNOWN
    assert _verdict(tmp_path, b"\x80\x04K\x01.", "step.pt") is State.UNKNOWN  # a pickle of 1
    assert _verdict(tmp_path, b"\x10\x00\x00", "model.safetensors") is State.CUT_SHORT


# -- end to end: the daemon as a subprocess --------------------------------------------------

def _model(step: int) -> bytes:
    """torch.save's format is a zip: archive/data.pkl plus one storage per tensor."""
    return _with_zip64_end(_zip_bytes([("archive/data.pkl", b"step %d" % step),
                                       ("archive/data/0", os.urandom(200_000))]))


def _manifest(s3: Any, workspace: Workspace) -> bytes:
    return object_bytes(s3, workspace.bucket, manifest_key("run1/", "model.pt"))


def test_a_torn_in_place_rewrite_never_replaces_the_sealed_file(
        workspace: Workspace, s3: Any) -> None:
    """model.pt sealed, then rewritten in place and cut off half way (the trainer killed; the
    kernel closes the file): S3 keeps the old bytes and manifest, flush reports the file still
    written (exit 1), restore gives the old file; a complete rewrite then goes up."""
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 1.0,
                                 "stop_timeout": 2})
    daemon = workspace.start_daemon()
    model = workspace.checkpoints / "model.pt"
    good = _model(1)
    model.write_bytes(good)
    wait_for(lambda: manifest_key("run1/", "model.pt") in keys_in(s3, workspace.bucket),
             timeout=30)
    sealed = _manifest(s3, workspace)
    assert object_bytes(s3, workspace.bucket, "run1/model.pt") == good

    step_2 = _model(2)
    with model.open("wb") as torn:  # torch.save(path) opens with "wb" and streams
        torn.write(step_2[:len(step_2) // 2])
    # Looked at once its close settled: warned about, or (the defect) uploaded.
    wait_for(lambda: daemon.named("file_cut_short") or daemon.named("upload_done")[1:])
    assert object_bytes(s3, workspace.bucket, "run1/model.pt") == good
    warned = daemon.named("file_cut_short")[0]
    assert warned["format"] == "zip" and warned["path"].endswith("model.pt")
    wait_for(lambda: workspace.status().get("unsettled_files", 0) >= 1)
    flush = workspace.cli("flush", "-c", str(workspace.config_file))
    assert flush.returncode == 1, flush.stderr
    assert object_bytes(s3, workspace.bucket, "run1/model.pt") == good
    assert _manifest(s3, workspace) == sealed
    assert not daemon.named("upload_done")[1:]
    target = workspace.root / "restored"
    restore = workspace.cli("restore", "-c", str(workspace.config_file), "--to", str(target))
    assert restore.returncode == 0, restore.stderr
    assert (target / "model.pt").read_bytes() == good

    model.write_bytes(step_2)  # the next save, complete
    wait_for(lambda: object_bytes(s3, workspace.bucket, "run1/model.pt") == step_2, timeout=30)
    wait_for(lambda: _manifest(s3, workspace) != sealed, timeout=30)
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0
    assert len(daemon.named("file_cut_short")) == 1
    assert daemon.stop() == 0


def test_an_emptied_checkpoint_and_an_empty_one_are_never_sealed(
        workspace: Workspace, s3: Any) -> None:
    """A safetensors file emptied by a writer that then died keeps its object; an empty
    Lightning .ckpt (killed before its first write) is not sealed as the newest set. Another
    file emptied on purpose goes up as it is."""
    workspace.write_config(sync={"settle_seconds": 0.2, "quiet_seconds": 1.0,
                                 "stop_timeout": 2})
    daemon = workspace.start_daemon()
    shard = workspace.checkpoints / "model.safetensors"
    good = _safetensors_bytes([5000], True, 0)
    shard.write_bytes(good)
    wait_for(lambda: manifest_key("run1/", "model.safetensors") in keys_in(s3, workspace.bucket))
    shard.write_bytes(b"")
    (workspace.checkpoints / "epoch=0-step=3.ckpt").write_bytes(b"")
    (workspace.checkpoints / "errors.txt").write_bytes(b"")
    daemon.wait_for_event("file_cut_short", count=2)
    wait_for(lambda: manifest_key("run1/", "errors.txt") in keys_in(s3, workspace.bucket))
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 1
    assert object_bytes(s3, workspace.bucket, "run1/model.safetensors") == good
    assert manifest_key("run1/", "epoch=0-step=3.ckpt") not in keys_in(s3, workspace.bucket)
    assert {event["format"] for event in daemon.named("file_cut_short")} == {"safetensors",
                                                                              "zip"}
    assert daemon.stop() == 1  # its final flush leaves them behind, still being written


def test_a_cut_short_file_made_whole_with_no_event_seen_goes_up(
        tmp_path: Path, store: InMemoryObjectStore, clock: FakeClock) -> None:
    """Held as still being written, a torn model.pt is looked at again each quiet interval:
    made whole where no write event tells (no watcher runs here), it goes up and its set is
    sealed; until then it is neither uploaded nor sealed."""
    root = tmp_path / "ckpt"
    root.mkdir()
    model = root / "model.pt"
    whole = _model(1)
    model.write_bytes(whole[:len(whole) // 2])
    with engine_on(root, tmp_path, store, clock) as engine:
        engine.reconcile(quiet_seconds=0)
        engine.pump(upload=True)
        assert engine.being_written() == [model] and "run/model.pt" not in store.objects
        model.write_bytes(whole)
        pump_until(engine, lambda: "run/.spotwatch/manifests/model.pt.json" in store.objects,
                   clock, step=QUIET_SECONDS)
    assert store.data("run/model.pt") == whole


def test_a_write_seen_after_the_file_settled_decides_over_its_hold(
        tmp_path: Path, clock: FakeClock) -> None:
    """The engine found the file cut short while its writer was finishing it: the close seen
    meanwhile settles it as any close does (settle_seconds), not by the quiet interval."""
    tracker = ChangeTracker(WatchDir(tmp_path, PREFIX, exclude=()), 1.0, QUIET_SECONDS,
                            clock=clock)
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04")
    tracker.mark(path, closed=True)
    tracker.hold_cut_short(path)
    clock.advance(1.0)
    assert tracker.take_settled() == [path]
    tracker.hold_cut_short(path)  # no event since: held until the quiet interval
    clock.advance(1.0)
    assert tracker.take_settled() == []
