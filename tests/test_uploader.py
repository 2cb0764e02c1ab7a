"""The uploader against the moto S3 server over HTTP: bytes, checksums, multipart, races."""

from __future__ import annotations

import os
import queue
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import s3transfer.upload
from s3transfer.utils import ChunksizeAdjuster

import spotwatch.aws.store
from spotwatch.aws.crt_store import CrtObjectStore, make_store
from spotwatch.aws.s3 import make_s3_client, transfer_config
from spotwatch.config import MiB, TransferSettings
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync.uploader import Uploader

from .conftest import REGION, object_bytes, wait_for
from .faultproxy import FaultProxy

SMALL_PARTS = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
_client = "classic"  # the transfer client of the test running (see transfer_client)


@pytest.fixture(autouse=True, params=["classic", "crt"])
def transfer_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both transfer clients; upload() uses the test's."""
    monkeypatch.setattr(sys.modules[__name__], "_client", request.param)
    return str(request.param)


def upload(bucket: str, settings: TransferSettings, *jobs: UploadJob,
           between: Any = None) -> list[UploadResult]:
    results: queue.Queue[UploadResult] = queue.Queue()
    settings = msgspec.structs.replace(settings, client=_client)
    store = make_store(make_s3_client(REGION, settings), bucket, settings)
    assert isinstance(store, CrtObjectStore) == (_client == "crt")
    uploader = Uploader(store, results.put)
    try:
        for job in jobs:
            uploader.submit(job)
        if between:
            between()
        return [results.get(timeout=60) for _ in jobs]
    finally:
        uploader.shutdown()


def job_for(path: Path, key: str) -> UploadJob:
    return UploadJob(path, key, Snapshot.of(os.stat(path)))


def test_default_transfer_tuning() -> None:
    config = transfer_config(TransferSettings())
    assert config.multipart_threshold == 64 * MiB
    assert config.multipart_chunksize == 16 * MiB
    assert config.max_request_concurrency == 20


def test_small_and_multipart_files_land_byte_identical(tmp_path: Path, s3: Any,
                                                       bucket: str) -> None:
    small = tmp_path / "small.pt"
    small.write_bytes(os.urandom(1000))
    large = tmp_path / "large.pt"
    large.write_bytes(os.urandom(12 * MiB + 7))
    results = upload(bucket, SMALL_PARTS, job_for(small, "a/small.pt"),
                     job_for(large, "a/large.pt"))
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert object_bytes(s3, bucket, "a/small.pt") == small.read_bytes()
    assert object_bytes(s3, bucket, "a/large.pt") == large.read_bytes()
    head = s3.head_object(Bucket=bucket, Key="a/large.pt", ChecksumMode="ENABLED")
    field = f"Checksum{SMALL_PARTS.checksum_algorithm}"
    assert field in head
    by_key = {r.job.key: r for r in results}
    assert by_key["a/large.pt"].checksum == head[field]
    assert by_key["a/small.pt"].checksum
    assert {r.checksum_algorithm for r in results} == {SMALL_PARTS.checksum_algorithm}


def test_other_checksum_algorithm(tmp_path: Path, s3: Any, bucket: str) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"payload")
    settings = TransferSettings(checksum_algorithm="SHA256")
    [result] = upload(bucket, settings, job_for(path, "m.pt"))
    head = s3.head_object(Bucket=bucket, Key="m.pt", ChecksumMode="ENABLED")
    assert result.checksum == head["ChecksumSHA256"]


def test_file_changed_during_upload_is_reported(tmp_path: Path, bucket: str) -> None:
    path = tmp_path / "growing.pt"
    path.write_bytes(os.urandom(30 * MiB))
    job = job_for(path, "growing.pt")

    def append() -> None:
        with path.open("ab") as handle:
            handle.write(b"more")

    [result] = upload(bucket, SMALL_PARTS, job, between=append)
    assert result.outcome is Outcome.CHANGED


def test_missing_file_and_missing_bucket(tmp_path: Path, bucket: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")
    job = job_for(path, "x.pt")
    path.unlink()
    [vanished] = upload(bucket, TransferSettings(), job)
    assert vanished.outcome is Outcome.VANISHED
    path.write_bytes(b"x")
    settings = TransferSettings(max_attempts=2)  # the fewest the CRT can keep to
    [failed] = upload("no-such-bucket-here", settings, job_for(path, "x.pt"))
    assert failed.outcome is Outcome.FAILED
    assert failed.error and "NoSuchBucket" in failed.error


def test_small_bodies_skip_the_continue_round_trip(tmp_path: Path, bucket: str) -> None:
    client = make_s3_client(REGION, TransferSettings())
    sent: dict[int, str | None] = {}

    def record(request: Any, **kwargs: Any) -> None:
        expect = request.headers.get("Expect")
        sent[int(request.headers["Content-Length"])] = expect.decode() if expect else None

    client.meta.events.register("before-send.s3.PutObject", record)
    for size in (64 * 1024, 2 * MiB):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        with path.open("rb") as body:
            client.put_object(Bucket=bucket, Key=f"k/{size}", Body=body)
    assert sent == {64 * 1024: None, 2 * MiB: "100-continue"}


@pytest.mark.parametrize("algorithm", ["CRC32C", "CRC64NVME"])
def test_crt_checksum_algorithms_upload(tmp_path: Path, s3: Any, bucket: str,
                                        algorithm: str) -> None:
    """These need the AWS CRT (a dependency now): without it every upload failed for good."""
    small = tmp_path / "small.pt"
    small.write_bytes(os.urandom(1000))
    large = tmp_path / "large.pt"
    large.write_bytes(os.urandom(11 * MiB))
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                checksum_algorithm=algorithm)
    results = upload(bucket, settings, job_for(small, "c/small.pt"), job_for(large, "c/large.pt"))
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DONE], results
    for result in results:
        assert object_bytes(s3, bucket, result.job.key) == result.job.path.read_bytes()
        assert result.checksum
    head = s3.head_object(Bucket=bucket, Key="c/small.pt", ChecksumMode="ENABLED")
    assert {r.job.key: r for r in results}["c/small.pt"].checksum == head[f"Checksum{algorithm}"]


def test_part_count_stays_within_s3s_limit(tmp_path: Path, s3: Any, bucket: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that would need more than the 10,000 parts S3 allows at the configured chunk
    size gets bigger parts (s3transfer's ChunksizeAdjuster, on the uploader's path). Shown
    with the limit scaled down to 2 parts, as a 50 GB file is no test fixture."""
    for module in (s3transfer.upload, spotwatch.aws.store):  # classic, CRT
        monkeypatch.setattr(module, "ChunksizeAdjuster", lambda: ChunksizeAdjuster(max_parts=2))
    path = tmp_path / "big.pt"
    path.write_bytes(os.urandom(12 * MiB))
    [result] = upload(bucket, SMALL_PARTS, job_for(path, "big.pt"))
    assert result.outcome is Outcome.DONE
    head = s3.head_object(Bucket=bucket, Key="big.pt", PartNumber=1)
    assert head["PartsCount"] == 2 and head["ContentLength"] == 10 * MiB
    assert object_bytes(s3, bucket, "big.pt") == path.read_bytes()


@pytest.mark.parametrize(("part_size", "target_gbps"), [(256 * MiB, 1.0), (5 * 1024 * MiB, None)])
def test_part_sizes_up_to_s3s_limit_upload_at_any_target_throughput(
        tmp_path: Path, s3: Any, bucket: str, part_size: int, target_gbps: float | None) -> None:
    """Any part size S3 allows uploads: the CRT's default pool refused parts over 128 MiB at
    1 Gbit/s (1 GiB at its default 10), and every upload failed with a traceback."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(6 * MiB))
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=part_size,
                                target_throughput=target_gbps)
    [result] = upload(bucket, settings, job_for(path, "model.pt"))
    assert result.outcome is Outcome.DONE, result
    assert object_bytes(s3, bucket, "model.pt") == path.read_bytes()


def test_a_file_whose_parts_outgrow_the_crts_pool_uploads(tmp_path: Path, s3: Any, bucket: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A file so large that the parts keeping it within S3's 10,000 outgrow what the CRT's
    pool holds (128 MiB at up to 1 Gbit/s: files over 1.25 TB) uploads: the CRT refused every
    attempt, and the file never reached S3. Shown with the limit scaled down to 1 part."""
    for module in (s3transfer.upload, spotwatch.aws.store):  # classic, CRT
        monkeypatch.setattr(module, "ChunksizeAdjuster", lambda: ChunksizeAdjuster(max_parts=1))
    path = tmp_path / "huge.pt"
    with path.open("wb") as handle:  # sparse: 129 MiB in a single part of 160 MiB
        handle.truncate(129 * MiB)
    settings = msgspec.structs.replace(SMALL_PARTS, target_throughput=1.0)
    [result] = upload(bucket, settings, job_for(path, "huge.pt"))
    assert result.outcome is Outcome.DONE, result
    assert result.part_size == 160 * MiB
    head = s3.head_object(Bucket=bucket, Key="huge.pt", PartNumber=1)
    assert head["PartsCount"] == 1 and head["ContentLength"] == 129 * MiB


def test_a_path_counts_as_uploading_until_its_result_is_delivered(bucket: str,
                                                                   tmp_path: Path) -> None:
    """The engine must handle an upload's result before starting the next upload of the
    path (their multipart ledger notes would otherwise come in the wrong order)."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(1000))
    settings = msgspec.structs.replace(TransferSettings(), client=_client)
    store = make_store(make_s3_client(REGION, settings), bucket, settings)
    seen: queue.Queue[bool] = queue.Queue()
    uploader: Uploader

    def delivered(result: UploadResult) -> None:
        seen.put(uploader.is_uploading(path))

    uploader = Uploader(store, delivered)
    try:
        uploader.submit(job_for(path, "run/model.pt"))
        assert seen.get(timeout=60) is True
        wait_for(lambda: not uploader.is_uploading(path))
        assert uploader.in_flight() == 0
    finally:
        uploader.shutdown()


@pytest.mark.parametrize("to", [0, 12 * MiB])
def test_a_file_truncated_while_its_parts_go_up_ends_its_upload_at_once(
        tmp_path: Path, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, to: int) -> None:
    """A part read after its file was truncated (a trainer saving the next step over it) is
    refused, not sent short: S3 would wait for the missing bytes until botocore's 60 s read
    timeout, and every retry again, holding the upload for ten minutes."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(40 * MiB))  # 8 parts, 2 at a time: parts 3 to 8 come later
    job = job_for(path, "model.pt")
    settings = msgspec.structs.replace(SMALL_PARTS, client=_client, max_concurrency=2,
                                       target_throughput=0.8)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        held = proxy.add("delay", lambda r: r.operation == "UploadPart", times=2, delay=1.0)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
        results: queue.Queue[UploadResult] = queue.Queue()
        uploader = Uploader(store, results.put)
        try:
            uploader.submit(job)
            wait_for(lambda: held.applied >= 1, timeout=30)
            os.truncate(path, to)
            # Well before the 60 s S3 would keep a short part's request waiting.
            result = results.get(timeout=40)
        finally:
            uploader.shutdown()
    assert result.outcome in (Outcome.CHANGED, Outcome.CANCELLED), result
    wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=30)
