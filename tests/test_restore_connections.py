"""A restore keeps many small GETs under way at once: each waits out S3's first-byte latency,
so the number at once, not the bandwidth, sets how fast a set of small files comes back."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from spotwatch.aws.crt_store import (
    GBPS_PER_CONNECTION,
    RESTORE_CONNECTIONS,
    crt_connections,
    for_restore,
)
from spotwatch.config import TransferSettings

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
    # Nothing else of the settings changes.
    assert msgspec.structs.replace(settings, target_throughput=None) == TransferSettings()


@pytest.mark.parametrize("configured", [0.4, 4.0, 100.0])
def test_a_configured_target_throughput_is_kept_by_a_restore(configured: float) -> None:
    settings = TransferSettings(target_throughput=configured)
    assert for_restore(settings) == settings
    assert crt_connections(settings) == round(configured / GBPS_PER_CONNECTION)


