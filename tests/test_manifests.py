"""Manifests read back from S3 are untrusted: strict parsing against the configured prefix
(property-based), and local checksums that agree with the ones S3 reports."""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.checksums import ALGORITHMS, ChecksumUnavailable, file_matches
from spotwatch.keys import RESERVED_SET, object_key
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry, ManifestError

PREFIX = "run1/"
MiB = 1 << 20

# Names as a filesystem may hold them: any text without '/' and NUL, not '.' or '..'.
names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))


def _one_file_each(below: list[list[str]]) -> bool:
    """As in a file tree: no path is also the directory of another."""
    return not any(a != b and b[:len(a)] == a for a in below for b in below)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    set_name = draw(names.filter(lambda name: name != RESERVED_SET))
    below = draw(st.lists(st.lists(names, min_size=1, max_size=3), max_size=4,
                          unique_by=tuple).filter(_one_file_each))
    paths = [set_name] if not below else ["/".join([set_name, *parts]) for parts in below]
    entries = [ManifestEntry(object_key(PREFIX, path), path,
                             draw(st.integers(0, 2**40)), draw(st.integers(-2**62, 2**62)),
                             draw(st.none() | st.text(max_size=12)),
                             draw(st.none() | st.integers(1, 2**33)),
                             draw(st.none() | st.sampled_from(sorted(ALGORITHMS))),
                             draw(st.none() | st.text(max_size=40)))
               for path in paths]
    return Manifest.build(set_name, PREFIX, entries)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


@given(manifests())
def test_a_valid_manifest_reads_back_unchanged(manifest: Manifest) -> None:
    assert Manifest.from_json(manifest.to_json(), PREFIX) == manifest
    assert Manifest.from_json(manifest.to_json().encode(), PREFIX) == manifest


def _mutations(data: dict[str, Any], index: int, value: Any) -> list[tuple[str, Any]]:
    """Ways to break one manifest: (what, the broken JSON object)."""
    entry = data["files"][index % len(data["files"])]
    path = entry["path"]
    broken: list[tuple[str, Any]] = []

    def variant(what: str, change: Any) -> None:
        copy = json.loads(json.dumps(data))
        change(copy, copy["files"][index % len(copy["files"])])
        broken.append((what, copy))

    for field in ("key", "path", "size", "mtime_ns"):
        if not isinstance(value, type(entry[field])) or isinstance(value, bool):
            variant(f"{field} of another type", lambda d, e, f=field: e.__setitem__(f, value))
        variant(f"{field} missing", lambda d, e, f=field: e.pop(f))
    for field in ("set", "prefix", "files", "format"):
        if not isinstance(value, type(data[field])) or isinstance(value, bool):
            variant(f"{field} of another type", lambda d, e, f=field: d.__setitem__(f, value))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        variant("sealed_at not a number", lambda d, e: d.__setitem__("sealed_at", value))
    variant("format 1.0", lambda d, e: d.__setitem__("format", 1.0))
    if not (value is None or isinstance(value, str)):
        variant("checksum of another type", lambda d, e: e.__setitem__("checksum", value))
        variant("checksum_algorithm of another type",
                lambda d, e: e.__setitem__("checksum_algorithm", value))
        variant("etag of another type", lambda d, e: e.__setitem__("etag", value))
    for unknown in ("MD5", "crc32", ""):
        variant(f"checksum_algorithm {unknown!r}",
                lambda d, e, u=unknown: e.__setitem__("checksum_algorithm", u))
    for bad_path in (path + "\0", "\0" + path, "/" + path, path + "/..", f"{path}/../../x",
                     f"{path}//x", f"{path}/./x", "other-set/x"):
        def use(d: Any, e: Any, p: str = bad_path) -> None:
            e["path"] = p
            e["key"] = PREFIX + p
        variant(f"path {bad_path!r}", use)
    variant("empty prefix in the manifest", lambda d, e: d.__setitem__("prefix", ""))
    variant("key outside the prefix",
            lambda d, e: e.__setitem__("key", "other-team/" + e["path"]))
    variant("no files", lambda d, e: d.__setitem__("files", []))
    variant("listed twice", lambda d, e: d["files"].append(dict(e)))
    variant("negative size", lambda d, e: e.__setitem__("size", -1))
    for field, number in (("mtime_ns", 2**63), ("mtime_ns", -(2**63) - 1), ("mtime_ns", 10**30),
                          ("size", 2**63), ("part_size", 2**64)):
        variant(f"{field} {number} beyond 64 bits",
                lambda d, e, f=field, n=number: e.__setitem__(f, n))
    for below in ("x", "x/y"):
        variant(f"a path that is also the directory of {below!r}", lambda d, e, b=below:
                d["files"].append({**e, "path": f"{e['path']}/{b}", "key": f"{e['key']}/{b}"}))
    variant("spotwatch's own key space as a set", lambda d, e: d.update(
        set=RESERVED_SET, files=[{**e, "path": f"{RESERVED_SET}/manifests/x.json",
                                  "key": f"{PREFIX}{RESERVED_SET}/manifests/x.json"}]))
    variant("not finite", lambda d, e: d.__setitem__("sealed_at", float("nan")))
    variant("sealed_at beyond a float", lambda d, e: d.__setitem__("sealed_at", 10**400))
    for lone in ("\ud800", "\udfff", "\ude00\ud83d"):  # no file name or key can hold one
        def surrogate(d: Any, e: Any, s: str = lone) -> None:
            e["path"] = e["path"] + s
            e["key"] = e["key"] + s
        variant(f"path with a lone surrogate {lone!r}", surrogate)
    return broken


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(manifests(), st.integers(0, 10), json_values)
def test_every_malformed_manifest_is_refused_with_manifest_error(
        manifest: Manifest, index: int, value: Any) -> None:
    data = json.loads(manifest.to_json())
    for what, broken in _mutations(data, index, value):
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(broken), PREFIX)
            pytest.fail(f"accepted a manifest with {what}")


@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_input_is_refused_or_a_valid_manifest(raw: bytes) -> None:
    try:
        manifest = Manifest.from_json(raw, PREFIX)
    except ManifestError:
        return
    assert all(f.key == PREFIX + f.path for f in manifest.files)


@given(manifests(), st.sampled_from(["\ud800", "\udbff\udbff", "\udc80"]),
       st.sampled_from(["escaped", "utf-8", "text"]))
def test_a_lone_surrogate_anywhere_refuses_the_manifest(manifest: Manifest, lone: str,
                                                        how: str) -> None:
    """However JSON carries it (an escape, UTF-8 of a surrogate, or text holding one), a
    string that is not Unicode refuses the manifest, where restore met it as a traceback."""
    data = json.loads(manifest.to_json())
    entry = data["files"][0]
    data.update(files=[entry], links=[])
    entry["path"] = f"{data['set']}/x{lone}"
    entry["key"] = PREFIX + entry["path"]
    text = json.dumps(data, ensure_ascii=how == "escaped")
    raw: str | bytes = text.encode("utf-8", "surrogatepass") if how == "utf-8" else text
    with pytest.raises(ManifestError, match="lone surrogate"):
        Manifest.from_json(raw, PREFIX)
    # A pair is one character: a manifest of a name with an emoji reads back.
    entry["path"] = entry["path"].replace(lone, "\U0001f600")
    entry["key"] = entry["key"].replace(lone, "\U0001f600")
    assert Manifest.from_json(json.dumps(data), PREFIX).files[0].path.endswith("\U0001f600")


@given(manifests())
def test_truncated_json_is_refused(manifest: Manifest) -> None:
    text = manifest.to_json()
    for cut in range(0, len(text), max(1, len(text) // 7)):
        with pytest.raises(ManifestError):
            Manifest.from_json(text[:cut], PREFIX)


def test_deeply_nested_json_is_refused() -> None:
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json("[" * 200_000 + "]" * 200_000, PREFIX)


# -- checksums, against what the S3 server reports --------------------------------------------

def _upload(tmp_path: Path, s3: Any, bucket: str, data: bytes, algorithm: str,
            part_size: int | None) -> tuple[Path, str]:
    path = tmp_path / "object"
    path.write_bytes(data)
    threshold = part_size if part_size is not None else 1 << 40
    s3.upload_file(str(path), bucket, "k", ExtraArgs={"ChecksumAlgorithm": algorithm},
                   Config=TransferConfig(multipart_threshold=threshold,
                                         multipart_chunksize=part_size or 8 * MiB))
    head = s3.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    return path, str(head[f"Checksum{algorithm}"])


@pytest.mark.parametrize(("algorithm", "part_size"), [
    *((name, None) for name in ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME")),
    # Multipart: composite checksums, except CRC64NVME (full-object only). Not CRC32C: moto
    # reports the CRC32 composite for it, which real S3 does not.
    *((name, 5 * MiB) for name in ("CRC32", "SHA1", "SHA256", "CRC64NVME")),
])
def test_local_checksum_agrees_with_s3(tmp_path: Path, s3: Any, bucket: str, algorithm: str,
                                       part_size: int | None) -> None:
    data = os.urandom(11 * MiB + 7)
    path, checksum = _upload(tmp_path, s3, bucket, data, algorithm, part_size)
    assert file_matches(path, checksum, part_size, algorithm)
    if part_size is not None and algorithm != "CRC64NVME" and "-" not in checksum:
        # Real S3 suffixes a composite checksum with its part count (moto leaves it off).
        assert file_matches(path, f"{checksum}-3", part_size, algorithm)
        assert not file_matches(path, f"{checksum}-4", part_size, algorithm)
    other = bytearray(data)
    other[len(data) // 2] ^= 1  # same size, other bytes
    path.write_bytes(bytes(other))
    assert not file_matches(path, checksum, part_size, algorithm)


def test_checksum_that_cannot_be_computed_is_said_so(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    crc32 = base64.b64encode(zlib.crc32(b"data").to_bytes(4, "big")).decode()
    assert file_matches(path, crc32, None, "CRC32")
    assert file_matches(path, crc32, None, "SHA256")  # another width: every 4-byte CRC tried
    assert not file_matches(path, "not base64!", None, "CRC32")
    assert not file_matches(path, f"{crc32}-2", None, "CRC32")  # composite, no part size
    monkeypatch.setitem(sys.modules, "awscrt.checksums", None)  # as without botocore[crt]
    assert file_matches(path, crc32, None, "CRC32C")  # CRC32 settles it
    with pytest.raises(ChecksumUnavailable, match="pip install awscrt"):
        file_matches(path, crc32, None, "CRC32C", "CRC32C")  # named: CRC32C alone decides
    with pytest.raises(ChecksumUnavailable, match="pip install awscrt"):
        file_matches(path, base64.b64encode(b"\0" * 4).decode(), None, "CRC32")
    with pytest.raises(ChecksumUnavailable, match="pip install awscrt"):
        file_matches(path, base64.b64encode(b"\0" * 8).decode(), None, "CRC32")
