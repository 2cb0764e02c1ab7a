"""A set stays restorable whatever transfer.checksum_algorithm says at restore time.

CRC32 and CRC32C checksums have the same length, so a checksum does not tell which one made it.
Manifests now name the algorithm of each file; a manifest written before that was recorded is
checked against every algorithm of its checksums' length. Before, the configured algorithm
alone decided, and every set uploaded before a change of the setting was refused as corrupt.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spotwatch import checksums
from spotwatch.checksums import ALGORITHMS, Expected, expected, file_matches

from .conftest import Workspace, object_bytes
from .test_verified_download import s3_checksum

MiB = 1 << 20
MANIFEST = "run1/.spotwatch/manifests/step_1.json"
# The two algorithms whose checksums look alike (4 bytes).
CRCS = ("CRC32", "CRC32C")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), made_with=st.sampled_from(CRCS),
       preferred=st.sampled_from(sorted(ALGORITHMS)),
       part_size=st.none() | st.integers(1, 64))
def test_a_crc_checksum_verifies_whichever_algorithm_is_configured(
        data: bytes, made_with: str, preferred: str, part_size: int | None) -> None:
    other = next(name for name in CRCS if name != made_with)
    checksum = s3_checksum(data, made_with, part_size)
    assume(checksum != s3_checksum(data, other, part_size))  # e.g. no bytes: both are 0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f"
        path.write_bytes(data)
        # Not named (a manifest written before the algorithm was recorded): every 4-byte
        # algorithm is tried, and none is trusted to check in-stream on its own.
        assert file_matches(path, checksum, part_size, preferred)
        assert expected(checksum, part_size, preferred) is None
        # Named: that one alone.
        assert file_matches(path, checksum, part_size, preferred, made_with)
        assert not file_matches(path, checksum, part_size, preferred, other)
        check = expected(checksum, part_size, preferred, made_with)
        assert check is not None and check.algorithm == made_with
        # Other bytes of the same size match under neither.
        path.write_bytes(bytes(byte ^ 1 for byte in data))
        if data:
            assert not file_matches(path, checksum, part_size, preferred)


def test_a_named_algorithm_of_another_width_matches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    checksum = s3_checksum(b"data", "CRC32", None)
    assert not file_matches(path, checksum, None, "CRC32", "SHA256")
    assert expected(checksum, None, "CRC32", "SHA256") is None


# -- end to end: flush with one algorithm, restore with the other --------------------------------

def _files(multipart: bool) -> dict[str, bytes]:
    files = {"step_1/optim.pt": os.urandom(200_000), "step_1/sub/rng.pt": os.urandom(10)}
    if multipart:  # over the 5 MiB threshold below: a composite checksum
        files["step_1/model.pt"] = os.urandom(11 * MiB + 3)
    return files


def _write(workspace: Workspace, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = workspace.checkpoints / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _configure(workspace: Workspace, algorithm: str) -> None:
    workspace.write_config(transfer={"checksum_algorithm": algorithm,
                                     "multipart_threshold": 5 * MiB,
                                     "multipart_chunksize": 5 * MiB})


def _restored(workspace: Workspace, name: str) -> tuple[Any, Path]:
    target = workspace.root / name
    return workspace.cli("restore", "-c", "config.yaml", "--to", str(target)), target


@pytest.mark.parametrize(("uploaded_with", "restored_with", "multipart"), [
    ("CRC32", "CRC32C", True),
    # moto reports a CRC32C composite wrongly (see test_manifests): single parts only; the
    # composite CRC32C case runs against SeaweedFS in test_real_object_store.
    ("CRC32C", "CRC32", False),
])
def test_a_set_restores_after_the_configured_algorithm_changed(
        workspace: Workspace, transfer_client: str, s3: Any, uploaded_with: str,
        restored_with: str, multipart: bool) -> None:
    _configure(workspace, uploaded_with)
    files = _files(multipart)
    _write(workspace, files)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    manifest = json.loads(object_bytes(s3, workspace.bucket, MANIFEST))
    assert {entry["checksum_algorithm"] for entry in manifest["files"]} == {uploaded_with}

    _configure(workspace, restored_with)
    result, target = _restored(workspace, "named")
    assert result.returncode == 0, result.stderr
    assert {relative: (target / relative).read_bytes() for relative in files} == files

    # As written before the algorithm was recorded: every 4-byte algorithm is tried.
    for entry in manifest["files"]:
        del entry["checksum_algorithm"]
    s3.put_object(Bucket=workspace.bucket, Key=MANIFEST, Body=json.dumps(manifest).encode())
    result, target = _restored(workspace, "unnamed")
    assert result.returncode == 0, result.stderr
    assert {relative: (target / relative).read_bytes() for relative in files} == files

    # And other bytes of the same size are still refused under both.
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_1/optim.pt",
                  Body=os.urandom(len(files["step_1/optim.pt"])))
    result, target = _restored(workspace, "corrupt")
    assert result.returncode == 1
    assert "set_corrupt" in result.stderr
    assert not target.joinpath("step_1", "optim.pt").exists()


@pytest.fixture(params=["zlib-ng", "zlib"])
def crc32_library(request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """CRC32 digests from zlib-ng (installed with spotwatch), or from zlib as where zlib-ng
    cannot be imported."""
    checksums._crc32_step.cache_clear()
    if request.param == "zlib":
        monkeypatch.setitem(sys.modules, "zlib_ng.zlib_ng", None)  # import raises ImportError
    yield request.param
    checksums._crc32_step.cache_clear()


# The fixture's library stays the same over the examples.
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.binary(max_size=70_000), max_size=6))
def test_crc32_digests_match_zlib_over_any_pieces(crc32_library: str,
                                                   pieces: list[bytes]) -> None:
    digest = Expected("CRC32", b"").new_digest()
    for piece in pieces:
        digest.update(memoryview(piece))
    assert digest.digest() == zlib.crc32(b"".join(pieces)).to_bytes(4, "big")
    uses_zlib = checksums._crc32_step() is zlib.crc32
    assert uses_zlib == (crc32_library == "zlib")
