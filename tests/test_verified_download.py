"""Downloads that check their bytes on the way: the manifest's checksum, compared while the
object arrives (the CRT for single GETs, ranged GETs digesting part by part), on both transfer
clients against the moto server over HTTP, with broken and corrupted responses."""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import weakref
import zlib
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import msgspec
import pytest
from awscrt import checksums as crt_checksums
from botocore.config import Config as BotoConfig
from botocore.exceptions import ReadTimeoutError
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.crt_store import CrtObjectStore, make_store
from spotwatch.aws.ranged_get import (
    PIECE_SIZE,
    WRITE_SLICE,
    RangedGetter,
    range_size,
    split,
)
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectStore
from spotwatch.checksums import ContentMismatch, Expected, PartDigests, expected, file_matches
from spotwatch.config import MiB, TransferSettings
from spotwatch.sync.downloads import MISMATCH_ATTEMPTS, FileToFetch, SetCorrupt, fetch_verified
from spotwatch.sync.sets.manifest import ManifestEntry

from .conftest import REGION, wait_for
from .faultproxy import FaultProxy, Request

# An independent reckoning of S3's checksums, to check spotwatch's against.
DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "CRC32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "CRC32C": lambda data: crt_checksums.crc32c(data).to_bytes(4, "big"),
    "CRC64NVME": lambda data: crt_checksums.crc64nvme(data).to_bytes(8, "big"),
    "SHA1": lambda data: hashlib.sha1(data).digest(),
    "SHA256": lambda data: hashlib.sha256(data).digest(),
}
SMALL_PARTS = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)


def s3_checksum(data: bytes, algorithm: str, part_size: int | None) -> str:
    """What S3 reports: the digest of the bytes, or (composite) of the parts' digests."""
    digest = DIGESTS[algorithm]
    if part_size is None:
        return base64.b64encode(digest(data)).decode()
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)] or [b""]
    combined = digest(b"".join(digest(part) for part in parts))
    return f"{base64.b64encode(combined).decode()}-{len(parts)}"


def range_digests(data: bytes, check: Expected) -> list[bytes]:
    """The digests a ranged download takes: one per part, or one of the whole object."""
    part_size = check.part_size or max(len(data), 1)
    return [DIGESTS[check.algorithm](data[r.start:r.start + r.length])
            for r in split(len(data), part_size)]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), algorithm=st.sampled_from(sorted(DIGESTS)),
       part_size=st.none() | st.integers(1, 1200), flip=st.none() | st.integers(0, 2999))
def test_checking_on_the_way_agrees_with_reading_the_file(
        tmp_path_factory: pytest.TempPathFactory, data: bytes, algorithm: str,
        part_size: int | None, flip: int | None) -> None:
    checksum = s3_checksum(data, algorithm, part_size)
    # Named, as a manifest does (test_checksum_algorithms: what a manifest of 0.1 gets).
    check = expected(checksum, part_size, algorithm, algorithm)
    assert check is not None and check.algorithm == algorithm
    received = bytearray(data)
    if flip is not None and data:
        received[flip % len(data)] ^= 0x01  # every algorithm here detects one flipped bit
    path = tmp_path_factory.mktemp("file") / "f"
    path.write_bytes(received)
    on_the_way = check.matches(range_digests(bytes(received), check))
    assert on_the_way == file_matches(path, checksum, part_size, algorithm, algorithm)
    assert on_the_way == (bytes(received) == data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), part_size=st.integers(1, 700),
       workers=st.integers(1, 8), chunk=st.integers(1, 900),
       flip=st.none() | st.integers(0, 2999))
def test_ranges_of_several_parts_take_each_parts_digest(
        data: bytes, part_size: int, workers: int, chunk: int, flip: int | None) -> None:
    """What a ranged download does with a composite checksum: ranges of whole parts, their
    bytes arriving in chunks of any size, one digest per part; a flipped byte anywhere in any
    range fails the check."""
    check = expected(s3_checksum(data, "CRC32", part_size), part_size, "CRC32", "CRC32")
    assert check is not None
    received = bytearray(data)
    if flip is not None and data:
        received[flip % len(data)] ^= 0x01
    digests: list[bytes] = []
    for byte_range in split(len(data), range_size(len(data), part_size, workers)):
        assert byte_range.start % part_size == 0  # a range starts where a part does
        parts = PartDigests(check.new_digest, part_size)
        view = memoryview(received)[byte_range.start:byte_range.start + byte_range.length]
        for start in range(0, len(view), chunk):
            parts.update(view[start:start + chunk])
        digests.extend(parts.digests())
    assert digests == [DIGESTS["CRC32"](bytes(received[r.start:r.start + r.length]))
                       for r in split(len(data), part_size)]
    assert check.matches(digests) == (bytes(received) == data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), algorithm=st.sampled_from(sorted(DIGESTS)),
       piece_size=st.integers(1, 1200), flip=st.none() | st.integers(0, 2999),
       dropped=st.booleans())
def test_a_full_object_crc_is_checked_from_its_pieces(
        data: bytes, algorithm: str, piece_size: int, flip: int | None, dropped: bool) -> None:
    """An object fetched in ranges, each digesting its pieces: the pieces' CRCs make up the
    object's whole CRC exactly when every byte is the one sent; a missing piece never passes,
    and algorithms whose digests cannot be combined (SHA) are never split."""
    check = expected(s3_checksum(data, algorithm, None), None, algorithm, algorithm)
    assert check is not None
    assert check.splittable == algorithm.startswith("CRC")
    received = bytearray(data)
    if flip is not None and data:
        received[flip % len(data)] ^= 0x01
    pieces = PartDigests(check.new_digest, piece_size)
    pieces.update(bytes(received))
    digests = pieces.digests()
    if dropped and len(digests) > 1:
        digests = digests[:-1]
    matched = check.matches_pieces(digests, piece_size, len(data))
    assert matched == (check.splittable and bytes(received) == data
                       and not (dropped and len(digests) < len(pieces.digests())))


def test_a_single_put_object_is_fetched_in_pieces_and_checked_on_either_client(
        tmp_path: Path, s3: Any, bucket: str, client: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the multipart threshold, above two pieces: ranged GETs over several connections
    (on S3 one carries some 90 MB/s), the CRC checked from the pieces' digests."""
    size = 2 * PIECE_SIZE + 1
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data)
    settings = TransferSettings(client=client, max_concurrency=4)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        assert not store.uses_multipart(size)
        try:
            checked = store.download("k", tmp_path / "f", size, None,
                                     expected(checksum, None, "CRC32", "CRC32"))
        finally:
            store.close()
        assert proxy.count("GET") == 3
    assert checked  # on the way, not by reading the file back
    assert (tmp_path / "f").read_bytes() == data


@given(checksum=st.text(max_size=40), part_size=st.none() | st.integers(1, 10**9),
       preferred=st.sampled_from(sorted(DIGESTS)))
def test_what_cannot_be_checked_on_the_way_is_left_to_reading(
        checksum: str, part_size: int | None, preferred: str) -> None:
    """Never a guess: a check is made only when the checksum says all it needs."""
    check = expected(checksum, part_size, preferred)
    if check is not None:
        assert check.composite == checksum.partition("-")[2].isdigit()
        assert (check.part_size is None) == (check.part_count is None)


def test_ambiguous_checksums_are_left_to_reading() -> None:
    crc = s3_checksum(b"abc", "CRC32", None)
    assert expected(crc, None, "SHA256") is None  # CRC32 or CRC32C: reading tries both
    # Named, and still not checkable on the way: a composite without its part size...
    assert expected(f"{crc}-2", None, "CRC32", "CRC32") is None
    assert expected(crc, 5 * MiB, "CRC32", "CRC32") is None  # ...a multipart full or composite


# -- against S3 ------------------------------------------------------------------------------


@pytest.fixture(params=["classic", "crt"])
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_for(bucket: str, client: str) -> ObjectStore:
    """A store on the endpoint AWS_ENDPOINT_URL names (moto, or a proxy in front of it), with
    two workers: a range of SHAPES["spanning"] then spans several parts."""
    settings = msgspec.structs.replace(SMALL_PARTS, client=client, max_concurrency=2)
    store = make_store(make_s3_client(REGION, settings), bucket, settings)
    assert isinstance(store, CrtObjectStore) == (client == "crt")
    return store


def put(s3: Any, bucket: str, key: str, data: bytes, part_size: int | None = None) -> str:
    """Store the object (in parts when part_size is given); returns S3's checksum of it."""
    if part_size is None:
        s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32")
        return s3_checksum(data, "CRC32", None)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")
    parts = []
    for number, start in enumerate(range(0, len(data), part_size), 1):
        reply = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                               PartNumber=number, Body=data[start:start + part_size],
                               ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": number, "ETag": reply["ETag"],
                      "ChecksumCRC32": reply["ChecksumCRC32"]})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": parts})
    return s3_checksum(data, "CRC32", part_size)


SHAPES = {"small": (1000, None), "multipart": (12 * MiB + 7, 5 * MiB),
          "spanning": (31 * MiB + 5, 5 * MiB),
          # One PUT, fetched in pieces: its full-object CRC is combined from theirs.
          "pieces": (2 * PIECE_SIZE + 5, None)}


# 7 parts of 5 MiB: ranges of 6, 3, 2 or 1 of them leave at least one range per worker.
@pytest.mark.parametrize(("workers", "ranges"), [(1, 2), (2, 3), (3, 4), (20, 7)])
def test_ranges_span_whole_parts_and_each_part_is_checked(
        tmp_path: Path, s3: Any, bucket: str, workers: int, ranges: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer GETs than parts when the object has parts to spare for every worker; each part's
    digest is still taken, so the composite checksum is checked on the way."""
    size, part_size = SHAPES["spanning"]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        settings = msgspec.structs.replace(SMALL_PARTS, client="classic",
                                           max_concurrency=workers)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        try:
            assert store.download("k", tmp_path / "f", size, None,
                                  expected(checksum, part_size, "CRC32", "CRC32"))
        finally:
            store.close()
        gets = proxy.count("GET")
    assert (tmp_path / "f").read_bytes() == data
    assert gets == ranges


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_manifests_checksum_is_checked_on_the_way(tmp_path: Path, s3: Any, bucket: str,
                                                      client: str, shape: str) -> None:
    size, part_size = SHAPES[shape]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    store = store_for(bucket, client)
    try:
        path = tmp_path / "f"
        assert store.download("k", path, size, None,
                              expected(checksum, part_size, "CRC32", "CRC32"))
        assert path.read_bytes() == data

        other = s3_checksum(os.urandom(size), "CRC32", part_size)
        if shape == "pieces":  # left to reading the file back (see below)
            assert not store.download("k", tmp_path / "g", size, None,
                                      expected(other, part_size, "CRC32", "CRC32"))
            return
        with pytest.raises(ContentMismatch, match="k: checksum differs"):
            store.download("k", tmp_path / "g", size, None,
                           expected(other, part_size, "CRC32", "CRC32"))
    finally:
        store.close()


@pytest.mark.parametrize("left", ["longer", "shorter", "empty"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_download_over_a_file_already_there_leaves_exactly_the_object(
        tmp_path: Path, s3: Any, bucket: str, client: str, shape: str, left: str) -> None:
    """A stopped restore leaves its temporaries, and the next one writes them again:
    whatever the file held before, the download leaves the object's bytes alone."""
    size, part_size = SHAPES[shape]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    path = tmp_path / "f"
    path.write_bytes({"longer": os.urandom(size + 4097), "shorter": os.urandom(size // 2),
                      "empty": b""}[left])
    store = store_for(bucket, client)
    try:
        store.download("k", path, size, None, expected(checksum, part_size, "CRC32", "CRC32"))
    finally:
        store.close()
    assert path.read_bytes() == data


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_an_object_of_another_size_than_listed_is_a_mismatch(
        tmp_path: Path, s3: Any, bucket: str, client: str, shape: str) -> None:
    size, part_size = SHAPES[shape]
    put(s3, bucket, "k", os.urandom(size), part_size)
    store = store_for(bucket, client)
    try:
        # A manifest may claim any size up to 2**63 - 1: the download fails at the first
        # response, not after planning a range per 64 MiB of exabytes (minutes, gigabytes).
        for listed in (size - 1, size + 1, 2**62, 2**63 - 1):
            with ThreadPoolExecutor(1) as pool:
                attempt = pool.submit(store.download, "k", tmp_path / "f", listed, None, None)
                with pytest.raises(ContentMismatch, match="bytes"):
                    attempt.result(timeout=30)
    finally:
        store.close()


def test_a_full_object_crc_of_a_multipart_object_is_checked_from_its_pieces(
        tmp_path: Path, s3: Any, bucket: str, client: str) -> None:
    """Ranges arrive out of order; a CRC over the whole object is combined from the pieces'
    CRCs once all are in, while a SHA over it, which cannot be, is read back instead."""
    data = os.urandom(12 * MiB + 7)
    put(s3, bucket, "k", data, 5 * MiB)
    store = store_for(bucket, client)
    try:
        for algorithm, checked in (("CRC32", True), ("SHA256", False)):
            whole = Expected(algorithm, DIGESTS[algorithm](data))
            assert store.download("k", tmp_path / "f", len(data), None, whole) == checked
            assert (tmp_path / "f").read_bytes() == data
        # No match is left to reading too: it may be a composite checksum recorded without
        # its part count, which reading the file back (file_matches) also tries.
        other = data[:-1] + bytes([data[-1] ^ 0xFF])  # never the same bytes
        assert not store.download("k", tmp_path / "f", len(data), None,
                                  Expected("CRC32", DIGESTS["CRC32"](other)))
    finally:
        store.close()


def test_an_object_fetched_in_pieces_restores(
        tmp_path: Path, s3: Any, bucket: str, client: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A set's file fetched in pieces (one PUT, a full-object CRC made up of the pieces')."""
    size = 2 * PIECE_SIZE + 11
    data = os.urandom(size)
    entry = ManifestEntry("k", "k", size, 1, put(s3, bucket, "k", data), None, "CRC32")
    settings = TransferSettings(client=client, max_concurrency=4)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        try:
            fetch_verified(store, [FileToFetch(entry, tmp_path / "k.tmp", None)], "CRC32",
                           lambda _: None, [])
            assert (tmp_path / "k.tmp").read_bytes() == data
            assert proxy.count("GET") == 3
        finally:
            store.close()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bytes_damaged_on_the_way_are_fetched_again_and_damaged_at_rest_are_a_corrupt_set(
        tmp_path: Path, s3: Any, bucket: str, client: str, shape: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A response damaged in transit (its object intact in S3) is no corrupt set: the file is
    fetched again, its first attempts' progress taken back. Only bytes that fail every one of
    MISMATCH_ATTEMPTS downloads (damaged at rest, or on every way) make the set corrupt."""
    size, part_size = SHAPES[shape]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    entry = ManifestEntry("k", "k", size, 1, checksum, None, "CRC32")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = store_for(bucket, client)
        try:
            proxy.add("corrupt", ranged_gets, times=MISMATCH_ATTEMPTS - 1)
            progress: list[int] = []
            fetch_verified(store, [FileToFetch(entry, tmp_path / "k.tmp", part_size)],
                           "CRC32", progress.append, [])
            assert proxy.count("GET", "corrupt") == MISMATCH_ATTEMPTS - 1
            assert (tmp_path / "k.tmp").read_bytes() == data
            assert sum(progress) == size

            proxy.add("corrupt", ranged_gets, times=10**6)
            temps: list[Path] = []
            with pytest.raises(SetCorrupt):
                fetch_verified(store, [FileToFetch(entry, tmp_path / "c.tmp", part_size)],
                               "CRC32", lambda _: None, temps)
            assert temps == [tmp_path / "c.tmp"]  # one temporary, however many attempts
        finally:
            store.close()


def ranged_gets(request: Request) -> bool:
    return request.method == "GET" and request.path.endswith("/k")


@pytest.mark.parametrize("cut", ["truncate", "short"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_body_cut_off_is_fetched_again(tmp_path: Path, s3: Any, bucket: str, client: str,
                                         shape: str, cut: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Reset mid-body, or closed in good order before its Content-Length: either way the
    range is fetched again, never taken for a corrupt object."""
    size, part_size = SHAPES[shape]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    progress: list[int] = []
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add(cut, ranged_gets, times=2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = store_for(bucket, client)
        try:
            assert store.download("k", tmp_path / "f", size, progress.append,
                                  expected(checksum, part_size, "CRC32", "CRC32"))
        finally:
            store.close()
        assert proxy.count("GET", cut) == 2
    assert (tmp_path / "f").read_bytes() == data
    assert sum(progress) == size  # a broken attempt's bytes are taken back


@pytest.mark.parametrize("shape", sorted(set(SHAPES) - {"pieces"}))  # pieces: see above
def test_bytes_corrupted_in_transit_are_a_mismatch(
        tmp_path: Path, s3: Any, bucket: str, client: str, shape: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    size, part_size = SHAPES[shape]
    checksum = put(s3, bucket, "k", os.urandom(size), part_size)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("corrupt", ranged_gets, times=10**6)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = store_for(bucket, client)
        try:
            with pytest.raises(ContentMismatch):
                store.download("k", tmp_path / "f", size, None,
                               expected(checksum, part_size, "CRC32", "CRC32"))
        finally:
            store.close()
        assert proxy.count("GET", "corrupt") >= 1


def test_a_stalled_server_gets_botocores_attempts_only(tmp_path: Path, s3: Any,
                                                       bucket: str) -> None:
    """A response that never starts is botocore's to retry (max_attempts); only a body that
    breaks off is fetched again by the range, so a stalled server is not tried
    max_attempts x attempts times."""
    put(s3, bucket, "k", os.urandom(1000))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        stalled = proxy.add("delay", ranged_gets, times=10**6, delay=1.5)
        client = boto3.client("s3", region_name=REGION, endpoint_url=proxy.url,
                              config=BotoConfig(read_timeout=0.3, retries={
                                  "mode": "standard", "max_attempts": 2}))
        with ThreadPoolExecutor(2) as pool:
            getter = RangedGetter(client, bucket, pool, 2, attempts=3)
            with pytest.raises(ReadTimeoutError):
                getter.download("k", tmp_path / "f", 1000, 1000, None, None)
        assert stalled.applied == client.meta.config.retries["total_max_attempts"]  # not x 3


@pytest.mark.parametrize("checked", [True, False])
def test_ranged_downloads_hand_their_connections_back(tmp_path: Path, s3: Any, bucket: str,
                                                      checked: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Read straight off http.client (checked on the way) or through botocore's body, a range
    read to its end returns its connection to the pool: many ranges on two workers open no more
    than two connections."""
    size, part_size = SHAPES["multipart"]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        settings = msgspec.structs.replace(SMALL_PARTS, client="classic", max_concurrency=2)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        check = expected(checksum, part_size, "CRC32", "CRC32") if checked else None
        try:
            for attempt in range(4):
                assert store.download("k", tmp_path / f"f{attempt}", size, None, check) \
                    == checked
                assert (tmp_path / f"f{attempt}").read_bytes() == data
        finally:
            store.close()
        assert proxy.count("GET") == 4 * len(split(size, range_size(size, part_size, 2)))
        assert proxy.connections <= 2


def test_a_download_writes_its_file_in_small_pieces(tmp_path: Path, s3: Any, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Large writes get large page-cache folios, which a virtual machine's host may have to
    fault in again (see ranged_get.WRITE_SLICE); every write stays within the slice."""
    size, part_size = SHAPES["multipart"]
    data = os.urandom(size)
    checksum = put(s3, bucket, "k", data, part_size)
    written: list[int] = []
    pwrite = os.pwrite

    def recording(fd: int, chunk: Any, offset: int) -> int:
        written.append(len(chunk))
        return pwrite(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    store = store_for(bucket, "classic")
    try:
        assert store.download("k", tmp_path / "f", size, None,
                              expected(checksum, part_size, "CRC32", "CRC32"))
    finally:
        store.close()
    assert (tmp_path / "f").read_bytes() == data
    assert sum(written) == size and max(written) <= WRITE_SLICE


def test_a_corrupt_file_stops_the_downloads_under_way(tmp_path: Path, s3: Any, bucket: str,
                                                      client: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """When one file of a set turns out corrupt, a large one still downloading stops at its
    next chunk, and its ranges not yet begun never begin (both transfer clients)."""
    size, part_size = SHAPES["multipart"]
    big = put(s3, bucket, "big", os.urandom(size), part_size)
    put(s3, bucket, "small", b"s" * 1000)
    wrong = s3_checksum(b"t" * 1000, "CRC32", None)
    files = [FileToFetch(ManifestEntry("big", "big", size, 1, big, part_size),
                         tmp_path / "big.tmp", part_size),
             FileToFetch(ManifestEntry("small", "small", 1000, 1, wrong), tmp_path / "small.tmp",
                         None)]
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        slow = proxy.add("delay", lambda r: r.method == "GET" and r.path.endswith("/big"),
                         times=10**6, delay=1.0)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        settings = msgspec.structs.replace(SMALL_PARTS, client=client, max_concurrency=2)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        temps: list[Path] = []
        try:
            with pytest.raises(SetCorrupt, match="small"):
                fetch_verified(store, files, "CRC32", lambda _: None, temps)
        finally:
            store.close()
        assert sorted(temps) == sorted(file.temp for file in files)
        assert slow.applied < len(split(size, part_size))


def test_a_crt_download_cancelled_under_way_ends_cancelled(tmp_path: Path, s3: Any,
                                                           bucket: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    put(s3, bucket, "k", b"k" * 1000)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        stalled = proxy.add("delay", ranged_gets, times=10**6, delay=2.0)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = store_for(bucket, "crt")
        try:
            pending = store.start_download("k", tmp_path / "f", 1000)
            wait_for(lambda: stalled.applied == 1, timeout=10)
            pending.cancel()
            with pytest.raises(CancelledError):
                pending.future.result(timeout=30)
        finally:
            store.close()


class RecordingClient:
    """The CRT's S3 client, keeping a weak reference to every request it makes."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.made: list[weakref.ref[Any]] = []

    def make_request(self, **request: Any) -> Any:
        made = self._client.make_request(**request)
        self.made.append(weakref.ref(made))
        return made


def test_a_finished_crt_request_is_freed_without_the_cycle_collector(
        tmp_path: Path, s3: Any, bucket: str) -> None:
    """A request and its callbacks must not hold each other: such cycles waited for the
    collector's rare full collections, and a restore of 20,000 files grew to 340 MiB."""
    put(s3, bucket, "k", b"k" * 1000)
    store = store_for(bucket, "crt")
    assert isinstance(store, CrtObjectStore)
    crt = store.crt()
    recording = crt.client = RecordingClient(crt.client)
    gc.disable()
    try:
        assert not store.download("k", tmp_path / "f", 1000)
        wait_for(lambda: recording.made[0]() is None, timeout=10)
    finally:
        gc.enable()
        store.close()
