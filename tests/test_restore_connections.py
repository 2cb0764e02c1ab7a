"""A restore keeps many small GETs under way at once: each waits out S3's first-byte latency,
so the number at once, not the bandwidth, sets how fast a set of small files comes back."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from spotwatch.aws.crt_store import (
    GBPS_PER_CONNECTION,
    GBPS_PER_S3_CONNECTION,
    RESTORE_CONNECTIONS,
    crt_connections,
    for_restore,
)
from spotwatch.config import MAX_CONCURRENCY, TransferSettings

from .conftest import Workspace
from .faultproxy import FaultProxy

FILES = 400
# Each GetObject is answered this late, as S3 answers after its first-byte latency: long
# enough that a restore's downloads overlap, whatever the machine's speed.
LATENCY = 0.2


def small_files(root: Path) -> dict[str, bytes]:
    written = {}
    for i in range(FILES):
        data = os.urandom(1024 + i)
        path = root / "step_1" / f"shard_{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[f"step_1/shard_{i:04d}.bin"] = data
    return written


def test_a_restore_on_the_crt_keeps_a_hundred_small_gets_under_way(
        workspace: Workspace, tmp_path: Path) -> None:
    written = small_files(workspace.checkpoints)
    workspace.write_config(transfer={"client": "crt"})
    flushed = workspace.cli("flush")
    assert flushed.returncode == 0, flushed.stderr
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("delay", lambda r: r.operation == "GET" and not r.query, times=10**6,
                  delay=LATENCY)
        restored = workspace.cli("restore", "--to", str(tmp_path / "back"),
                                 AWS_ENDPOINT_URL=proxy.url)
        assert restored.returncode == 0, restored.stderr
        # 25 connections before (the CRT's 10 Gbit/s without an instance type).
        assert proxy.most_at_once("GET") >= 100
    for name, data in written.items():
        assert (tmp_path / "back" / name).read_bytes() == data


@pytest.mark.parametrize("recommended", [None, 10.0, 400.0])
def test_a_restore_opens_at_least_its_connections_and_never_fewer_than_the_instance_would(
        recommended: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("awscrt.s3.get_recommended_throughput_target_gbps",
                        lambda: recommended)
    settings = for_restore(TransferSettings())
    assert crt_connections(settings) >= RESTORE_CONNECTIONS
    assert settings.target_throughput is not None
    assert settings.target_throughput >= (recommended or 0)
    # Ranged GETs: as many as the instance's throughput takes (400 Gbit/s: the most), and
    # without its figure the configured 20.
    assert settings.max_concurrency == (MAX_CONCURRENCY if recommended == 400.0 else 20)
    # Nothing else of the settings changes.
    assert msgspec.structs.replace(settings, target_throughput=None, max_concurrency=20) \
        == TransferSettings()


@pytest.mark.parametrize(("configured", "workers"), [(0.4, 20), (4.0, 20), (100.0, 143),
                                                     (400.0, MAX_CONCURRENCY)])
def test_a_configured_target_throughput_is_kept_by_a_restore_and_sets_its_ranged_gets(
        configured: float, workers: int) -> None:
    settings = TransferSettings(target_throughput=configured)
    restoring = for_restore(settings)
    assert restoring == msgspec.structs.replace(settings, max_concurrency=workers)
    assert crt_connections(restoring) == round(configured / GBPS_PER_CONNECTION)


@pytest.mark.parametrize("recommended", [None, 400.0])
def test_a_restore_never_runs_fewer_ranged_gets_than_max_concurrency_says(
        recommended: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("awscrt.s3.get_recommended_throughput_target_gbps",
                        lambda: recommended)
    settings = for_restore(TransferSettings(max_concurrency=200, target_throughput=10.0))
    assert settings.max_concurrency == 200
    wanted = round(400.0 / GBPS_PER_S3_CONNECTION)
    assert for_restore(TransferSettings(max_concurrency=200)).max_concurrency == (
        min(wanted, MAX_CONCURRENCY) if recommended else 200)


SHARDS = 6
SHARD_BYTES = 20 * 2**20
PART_BYTES = 5 * 2**20  # S3's smallest part: a shard is 4 parts, each its own ranged GET


@pytest.mark.parametrize("transfer_client", ["classic", "crt"], indirect=True)
def test_a_restore_fetches_large_shards_over_as_many_connections_as_its_target_takes(
        workspace: Workspace, transfer_client: str, tmp_path: Path) -> None:
    written = {}
    for i in range(SHARDS):
        data = os.urandom(SHARD_BYTES)
        path = workspace.checkpoints / "step_1" / f"model_{i}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[f"step_1/model_{i}.safetensors"] = data
    # 50 Gbit/s: 71 ranged GETs at once, every one of the set's 24 (before: 20, whatever the
    # target).
    workspace.write_config(transfer={"multipart_threshold": PART_BYTES,
                                     "multipart_chunksize": PART_BYTES,
                                     "target_throughput": 50})
    flushed = workspace.cli("flush")
    assert flushed.returncode == 0, flushed.stderr
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("delay", lambda r: r.operation == "GET" and not r.query, times=10**6,
                  delay=2 * LATENCY)
        restored = workspace.cli("restore", "--to", str(tmp_path / "back"),
                                 AWS_ENDPOINT_URL=proxy.url)
        assert restored.returncode == 0, restored.stderr
        assert proxy.most_at_once("GET") > 20
    for name, data in written.items():
        assert (tmp_path / "back" / name).read_bytes() == data




@pytest.mark.parametrize(("instance_type", "workers"), [("g5.48xlarge", 143), ("g6e.48xlarge",
                                                                              MAX_CONCURRENCY),
                                                        ("g6.8xlarge", 36), ("g5.xlarge", 20)])
def test_a_restore_on_an_instance_type_the_crt_has_no_figure_for_fills_its_nic(
        instance_type: str, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A g5.48xlarge's 100 Gbit/s take 143 ranged GETs, not the 20 of the CRT's default."""
    monkeypatch.setattr("awscrt.s3.get_recommended_throughput_target_gbps", lambda: None)
    monkeypatch.setattr("awscrt.s3.get_ec2_instance_type", lambda: instance_type)
    settings = for_restore(TransferSettings())
    assert settings.max_concurrency == workers
    assert crt_connections(settings) >= RESTORE_CONNECTIONS
