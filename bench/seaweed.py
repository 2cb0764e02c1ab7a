"""Local servers for the benchmarks: SeaweedFS (a real object store with an S3 API) and ports.

`weed mini` runs master, volume server, filer and S3 gateway in one process. Every port it
would open is moved to a free one so that several runs (or other people's servers) never
collide, and everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

BIN = Path(sys.executable).parent
REGION = "us-east-1"  # what SeaweedFS reports for every bucket
START_TIMEOUT = 90.0
# weed mini's listening ports, each moved to a free one (gRPC ports default to port + 10000,
# which may be taken, so they are set too).
WEED_PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                   "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port",
                   "admin.port.grpc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            ensure_alive(process, log, deadline)
            time.sleep(0.1)


def ensure_alive(process: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    if process.poll() is not None or time.monotonic() > deadline:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"{process.args!r} did not start:\n{tail}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def weed_command(data_dir: Path, ports: dict[str, int]) -> list[str]:
    return [str(BIN / "weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false"]


def wait_until_s3_serves(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """The S3 port opens before the filer behind it is ready: wait for a real answer."""
    client = boto3.client("s3", region_name=REGION, endpoint_url=url,
                          aws_access_key_id="bench", aws_secret_access_key="bench",
                          config=BotoConfig(retries={"max_attempts": 1}))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError):
            ensure_alive(process, log, deadline)
            time.sleep(0.2)


@contextmanager
def seaweedfs(data_dir: Path) -> Iterator[str]:
    """A fresh SeaweedFS in `data_dir`; yields its S3 endpoint URL.

    It starts without AWS_* or S3_* variables: with none it creates no identity and accepts
    any access key, as the benchmark's tools all use the same made-up one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in WEED_PORT_FLAGS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    log = data_dir / "weed.log"
    with log.open("wb") as output:
        process = subprocess.Popen(weed_command(data_dir, ports), env=env, cwd=data_dir,
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        wait_for_port(ports["s3.port"], process, log)
        wait_until_s3_serves(url, process, log)
        yield url
    finally:
        stop(process)
