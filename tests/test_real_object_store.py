"""Uploads and restores against a real object store (SeaweedFS), on both transfer clients.

moto answers whatever botocore and the CRT send; a real server is where differences in how
requests are framed show (the CRT's checksum trailer, for one, is refused by SeaweedFS)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import boto3
import pytest
import yaml

from .conftest import TRANSFER_CLIENTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from seaweed import REGION, seaweedfs

MiB = 1024 * 1024
BUCKET = "spotwatch-real-store"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


@pytest.fixture(scope="module")
def seaweed_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs(tmp_path_factory.mktemp("seaweed")) as url:
        boto3.client("s3", region_name=REGION, endpoint_url=url,
                     **{k.lower(): v for k, v in CREDENTIALS.items()}).create_bucket(Bucket=BUCKET)
        yield url


def spotwatch(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=url, AWS_EC2_METADATA_DISABLED="true")
    return subprocess.run([sys.executable, "-m", "spotwatch.cli", *args, "--bucket", BUCKET],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME", "SHA256"])
@pytest.mark.parametrize("client", TRANSFER_CLIENTS)
def test_flush_then_restore_on_a_real_object_store(tmp_path: Path, seaweed_url: str,
                                                   client: str, algorithm: str) -> None:
    checkpoints = tmp_path / "ckpt"
    step = checkpoints / "step_1"
    step.mkdir(parents=True)
    files = {"model.bin": os.urandom(13 * MiB + 7),  # three parts at 5 MiB
             "optim.bin": os.urandom(MiB), "empty": b"", "meta.json": b'{"step": 1}'}
    for name, data in files.items():
        (step / name).write_bytes(data)
    prefix = f"{client}-{algorithm}/"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        # SeaweedFS has no public access block to show the bucket private.
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(checkpoints), "prefix": prefix}],
        "transfer": {"client": client, "checksum_algorithm": algorithm,
                     "multipart_threshold": "8MB", "multipart_chunksize": "5MB"},
        "imds": {"enabled": False},
        "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False},
    }))
    flushed = spotwatch(seaweed_url, "flush", "-c", str(config))
    assert flushed.returncode == 0, flushed.stderr

    restored = tmp_path / "restored"
    result = spotwatch(seaweed_url, "restore", "-c", str(config), "--to", str(restored))
    assert result.returncode == 0, result.stderr
    for name, data in files.items():
        assert (restored / "step_1" / name).read_bytes() == data, name

    # CRC32 and CRC32C checksums look alike: configured the other way, the set still restores.
    other = {"CRC32": "CRC32C", "CRC32C": "CRC32"}.get(algorithm)
    if other is not None:
        settings = yaml.safe_load(config.read_text())
        settings["transfer"]["checksum_algorithm"] = other
        config.write_text(yaml.safe_dump(settings))
        again = tmp_path / "restored-configured-otherwise"
        result = spotwatch(seaweed_url, "restore", "-c", str(config), "--to", str(again))
        assert result.returncode == 0, result.stderr
        for name, data in files.items():
            assert (again / "step_1" / name).read_bytes() == data, name


LOCK_HOLDER = """
import sys, threading
from s3transfer.crt import acquire_crt_s3_process_lock
from spotwatch.aws.crt_store import CRT_PROCESS_LOCK
# Held by this process itself: another spotwatch holding it now may let it go at any moment.
for _ in range(1200):
    if acquire_crt_s3_process_lock(CRT_PROCESS_LOCK) is not None:
        print("held", flush=True)
        break
    threading.Event().wait(0.1)  # that process's lifetime: nothing here to wait on
else:
    print("another process kept it for two minutes", flush=True)
sys.stdin.read()
"""


def chosen_client(result: subprocess.CompletedProcess[str]) -> str:
    lines = [yaml.safe_load(line) for line in result.stderr.splitlines()
             if '"transfer_client"' in line]
    assert lines, result.stderr
    return str(lines[0]["client"])


# (Not "auto without a holder gets the CRT": any spotwatch running on the host may hold it.)
@pytest.mark.parametrize(("configured", "held", "expected"), [
    ("auto", True, "classic"), ("crt", True, "crt"), ("classic", False, "classic")])
def test_auto_leaves_the_crt_to_the_spotwatch_process_holding_it(
        tmp_path: Path, seaweed_url: str, configured: str, held: bool, expected: str) -> None:
    """One CRT client per host: `auto` goes classic while another spotwatch process (say, the
    daemon beside a restore) has it; `crt` asked for outright is used regardless."""
    (tmp_path / "ckpt").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(tmp_path / "ckpt"), "prefix": f"lock-{configured}-{held}/"}],
        "transfer": {"client": configured}, "imds": {"enabled": False},
        "state": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False},
        "log": {"format": "json", "level": "debug"}}))
    with crt_lock_held_elsewhere() if held else nullcontext():
        result = spotwatch(seaweed_url, "flush", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert chosen_client(result) == expected


@contextmanager
def crt_lock_held_elsewhere() -> Iterator[None]:
    """Another process (as a running daemon would) holds the host's CRT lock meanwhile."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate("")


def test_a_restore_takes_the_crt_beside_the_process_holding_its_lock(
        tmp_path: Path, seaweed_url: str) -> None:
    """A restore only downloads, the other way over the NIC from a daemon's uploads: under
    `auto` it takes the CRT while another spotwatch process holds the lock, and the set,
    small files and a ranged one, comes back whole."""
    checkpoints = tmp_path / "ckpt"
    (checkpoints / "step_1").mkdir(parents=True)
    files = {f"rank_{rank}.pt": os.urandom(20_000 + rank) for rank in range(12)}
    files["model.pt"] = os.urandom(20 * MiB)
    for name, data in files.items():
        (checkpoints / "step_1" / name).write_bytes(data)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(checkpoints), "prefix": "beside-the-lock/"}],
        "imds": {"enabled": False}, "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False}, "log": {"format": "json", "level": "debug"}}))
    flushed = spotwatch(seaweed_url, "flush", "-c", str(config))
    assert flushed.returncode == 0, flushed.stderr
    restored = tmp_path / "restored"
    with crt_lock_held_elsewhere():
        result = spotwatch(seaweed_url, "restore", "-c", str(config), "--to", str(restored))
    assert result.returncode == 0, result.stderr
    assert chosen_client(result) == "crt"
    for name, data in files.items():
        assert (restored / "step_1" / name).read_bytes() == data, name


LOCK_LEFT_ALONE = """
import subprocess, sys, uuid
import boto3
import spotwatch.aws.crt_store as crt_store
from spotwatch.config import TransferSettings
from spotwatch.logs import configure_logging
configure_logging("warning")
# A lock of this run's own: no other process on the host holds it or sees it taken.
crt_store.CRT_PROCESS_LOCK = name = f"spotwatch-test-{uuid.uuid4().hex}"
TRY_LOCK = ("import sys; from s3transfer.crt import acquire_crt_s3_process_lock as take;"
            "print(take(sys.argv[1]) is not None)")
def free():
    return subprocess.run([sys.executable, "-c", TRY_LOCK, name], capture_output=True,
                          text=True, check=True).stdout.strip() == "True"
client = boto3.client("s3", region_name="us-east-1")
for uploads in (False, True):
    store = crt_store.make_store(client, "bucket", TransferSettings(), uploads=uploads)
    print(type(store).__name__, free())
"""


def test_a_restore_leaves_the_crt_lock_to_a_daemon_started_meanwhile() -> None:
    """A store that only downloads does not take the host's CRT lock (a daemon starting
    during the restore would otherwise go classic for its whole run); one that uploads does."""
    lines = subprocess.run([sys.executable, "-c", LOCK_LEFT_ALONE], capture_output=True,
                           text=True, check=True, timeout=60).stdout.splitlines()
    assert lines == ["CrtObjectStore True", "CrtObjectStore False"]


@pytest.mark.parametrize("client", TRANSFER_CLIENTS)
def test_retention_counts_intact_sets_on_a_real_object_store(tmp_path: Path, seaweed_url: str,
                                                             client: str) -> None:
    """The ETags recorded from PutObject replies (and HEADs after multipart uploads) are the
    ones the store's listings give, so retention prunes; a replaced object keeps an older set."""
    checkpoints = tmp_path / "ckpt"
    for age, name in ((300, "step_1"), (200, "step_2"), (100, "step_3")):
        for file, size in (("small.pt", 3_000), ("big.pt", 11 * MiB)):
            (checkpoints / name).mkdir(parents=True, exist_ok=True)
            (checkpoints / name / file).write_bytes(os.urandom(size))
            os.utime(checkpoints / name / file, (1_700_000_000 - age,) * 2)
    prefix = f"keep-{client}/"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(checkpoints), "prefix": prefix}],
        "transfer": {"client": client, "multipart_threshold": "8MB",
                     "multipart_chunksize": "5MB"},
        "imds": {"enabled": False}, "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False}}))
    assert spotwatch(seaweed_url, "flush", "-c", str(config)).returncode == 0
    boto3.client("s3", region_name=REGION, endpoint_url=seaweed_url,
                 **{k.lower(): v for k, v in CREDENTIALS.items()}).put_object(
        Bucket=BUCKET, Key=f"{prefix}step_3/big.pt", Body=os.urandom(11 * MiB))

    result = spotwatch(seaweed_url, "prune", "-c", str(config), "--keep-sets", "1")
    assert result.returncode == 0, result.stderr
    gone = {line.split()[1] for line in result.stdout.splitlines()[:-1]}
    assert gone == {f"s3://{BUCKET}/{key}" for key in (  # step_2 counts, step_3 does not
        f"{prefix}.spotwatch/manifests/step_1.json", f"{prefix}step_1/big.pt",
        f"{prefix}step_1/small.pt")}


def test_check_passes_on_a_store_without_public_access_blocks(tmp_path: Path,
                                                              seaweed_url: str) -> None:
    """SeaweedFS answers GetPublicAccessBlock with 501 NotImplemented: with public buckets
    allowed, the preflight (which `run` also waits on) passes rather than call S3 unreachable."""
    (tmp_path / "ckpt").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(tmp_path / "ckpt"), "prefix": "check/"}],
        "imds": {"enabled": False}, "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False}}))
    result = spotwatch(seaweed_url, "check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no public access block (NotImplemented)" in result.stdout


@pytest.mark.parametrize("client", TRANSFER_CLIENTS)
def test_a_name_the_store_lists_otherwise_is_never_sealed(tmp_path: Path, seaweed_url: str,
                                                          client: str) -> None:
    """SeaweedFS keeps a key holding a backslash as if it were a '/': it would store
    `rank\\0.pt` as `rank/0.pt`, over that object, where no restore looks for it. The file is
    never sent: the flush names it and seals nothing of its set, the object at the other name
    keeps its bytes, and a restore brings back the sets sealed before, whole."""
    checkpoints = tmp_path / "ckpt"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION, "allow_public_bucket": True},
        "watch": [{"path": str(checkpoints), "prefix": f"backslash-{client}/"}],
        "transfer": {"client": client}, "imds": {"enabled": False},
        "state": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False}}))
    (checkpoints / "step_1" / "rank").mkdir(parents=True)
    (checkpoints / "step_1" / "model.pt").write_bytes(b"step 1")
    (checkpoints / "step_1" / "rank" / "0.pt").write_bytes(b"rank 0 of step 1")
    assert spotwatch(seaweed_url, "flush", "-c", str(config)).returncode == 0
    (checkpoints / "step_2").mkdir()
    (checkpoints / "step_2" / "model.pt").write_bytes(b"step 2")
    (checkpoints / "step_2" / "rank\\0.pt").write_bytes(b"rank 0 of step 2")
    (checkpoints / "step_1" / "rank\\0.pt").write_bytes(b"would go over rank/0.pt")
    flushed = spotwatch(seaweed_url, "flush", "-c", str(config))
    assert flushed.returncode == 1, flushed.stderr
    assert "rank\\\\0.pt" in flushed.stderr or "rank\\0.pt" in flushed.stderr, flushed.stderr
    restored = tmp_path / "restored"
    result = spotwatch(seaweed_url, "restore", "-c", str(config), "--to", str(restored))
    assert result.returncode == 0, result.stderr
    assert (restored / "step_1" / "model.pt").read_bytes() == b"step 1"
    assert (restored / "step_1" / "rank" / "0.pt").read_bytes() == b"rank 0 of step 1"
    assert not (restored / "step_2").exists()
