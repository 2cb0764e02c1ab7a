"""Shared fixtures: a moto S3 server over HTTP, the IMDS emulator, real files, the CLI."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog  # noqa: F401 (see below)
import yaml
from moto.server import ThreadedMotoServer

from spotwatch.aws.preflight import PUBLIC_ACCESS_FLAGS
from spotwatch.emulator import ImdsEmulator

from .memory_store import FakeClock, InMemoryObjectStore

# structlog is loaded before any test configures logging, so that configure_logging applies at
# once (as before spotwatch loaded it lazily) and capture_logs always sees its configuration.

REGION = "us-west-2"
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def no_instance_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, spotwatch finds no EC2 instance type, on whatever host the tests run: its
    targets follow from what a test sets, not from the host."""
    monkeypatch.setattr("awscrt.s3.get_ec2_instance_type", lambda: None)


@pytest.fixture(autouse=True)
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every boto3 client in tests and subprocesses talks to the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("S3_BUCKET_NAME", raising=False)
    monkeypatch.delenv("SPOTWATCH_CONFIG", raising=False)
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def s3(aws_env: None) -> Any:
    return boto3.client("s3", region_name=REGION)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    block_public_access(s3, name)  # as new buckets are on AWS
    return name


def block_public_access(s3: Any, bucket: str) -> None:
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        flag: True for flag in PUBLIC_ACCESS_FLAGS})


@pytest.fixture
def imds() -> Iterator[ImdsEmulator]:
    with ImdsEmulator() as emulator:
        yield emulator


def object_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def keys_in(s3: Any, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def holds_throughout(predicate: Callable[[], Any], seconds: float,
                     interval: float = 0.05) -> bool:
    """Whether the predicate holds at every look over this window (something that must not
    happen, watched for as long as it would take to)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


@dataclass
class Workspace:
    root: Path
    checkpoints: Path
    config_file: Path
    bucket: str
    imds_url: str
    launcher: tuple[str, ...] = ()  # a command the daemon runs under, e.g. setpriv
    transfer_client: str | None = None  # transfer.client; None: the default (auto)

    def write_config(self, **sections: Any) -> Path:
        config: dict[str, Any] = {
            "aws": {"region": REGION},
            "watch": [{"path": str(self.checkpoints), "prefix": "run1/"}],
            "sync": {"settle_seconds": 0.2, "quiet_seconds": 1.0, "stop_timeout": 30},
            "imds": {"endpoint": self.imds_url, "poll_interval": 0.2},
            "state": {"dir": str(self.root / "state")},
            "metrics": {"port": 0},  # any free port: daemons of several tests may overlap
        }
        if self.transfer_client is not None:
            config["transfer"] = {"client": self.transfer_client}
        for name, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(name), dict):
                config[name].update(value)
            else:
                config[name] = value
        self.config_file.write_text(yaml.safe_dump(config))
        return self.config_file

    def status(self) -> dict[str, Any]:
        """The daemon's status.json ({} until it wrote one)."""
        try:
            return json.loads((self.root / "state" / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["S3_BUCKET_NAME"] = self.bucket
        # As systemd's RuntimeDirectory would: the notice file stays in this test's directory.
        env["RUNTIME_DIRECTORY"] = str(self.root / "run")
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "spotwatch.cli", *args], cwd=self.root, env=self.env(**env),
            capture_output=True, text=True, timeout=timeout,
        )

    def cli_on_terminal(self, *args: str, **env: str) -> tuple[int, str]:
        """Run the CLI with a pseudo-terminal as stdin/stdout/stderr: (exit code, output)."""
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "spotwatch.cli", *args], cwd=self.root, env=self.env(**env),
            stdin=terminal, stdout=terminal, stderr=terminal)
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            output += chunk
        os.close(controller)
        return process.wait(timeout=60), output.decode(errors="replace")

    def start_daemon(self, *args: str, **env: str) -> Daemon:
        log_path = self.root / f"daemon-{uuid.uuid4().hex[:6]}.log"
        handle = log_path.open("w")
        process = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "spotwatch.cli", "run", "-c",
             str(self.config_file), *args],
            cwd=self.root, env=self.env(**env), stdout=handle, stderr=subprocess.STDOUT,
        )
        daemon = Daemon(process, log_path)
        daemon.wait_for_event("daemon_started")
        return daemon


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name]

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        def seen() -> list[dict[str, Any]] | None:
            if self.process.poll() is not None and len(self.named(name)) < count:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {name}:"
                                     f"\n{self.log_path.read_text()}")
            found = self.named(name)
            return found if len(found) >= count else None

        return wait_for(seen, timeout)[count - 1]  # type: ignore[no-any-return]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=timeout)


TRANSFER_CLIENTS = ("classic", "crt")


@pytest.fixture(params=TRANSFER_CLIENTS)
def transfer_client(request: pytest.FixtureRequest, workspace: Workspace) -> str:
    """Runs a test on each transfer client: the workspace's config names it from now on."""
    workspace.transfer_client = request.param
    workspace.write_config()
    return str(request.param)


@pytest.fixture
def workspace(tmp_path: Path, bucket: str, imds: ImdsEmulator) -> Iterator[Workspace]:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    space = Workspace(tmp_path, checkpoints, tmp_path / "config.yaml", bucket, imds.url)
    space.write_config()
    daemons: list[Daemon] = []
    original = space.start_daemon

    def tracked_start(*args: str, **env: str) -> Daemon:
        daemon = original(*args, **env)
        daemons.append(daemon)
        return daemon

    space.start_daemon = tracked_start  # type: ignore[method-assign]
    yield space
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


@pytest.fixture
def clock() -> FakeClock:
    """Fake monotonic and wall time, for the engine on the in-memory store."""
    return FakeClock()


@pytest.fixture
def store() -> InMemoryObjectStore:
    return InMemoryObjectStore()


def installed_python(minor: int) -> Path:
    """A real CPython 3.<minor> (pyenv's) for tests of an older or newer distribution's Python;
    skips the test when there is none."""
    found = sorted((Path.home() / ".pyenv" / "versions").glob(f"3.{minor}.*/bin/python3.{minor}"))
    if not found:
        pytest.skip(f"no Python 3.{minor} installed (pyenv)")
    return found[-1]


def _tiny_tmpfs(directory: Path) -> Iterator[Path]:
    """directory made and a 1 MiB tmpfs mounted there, to fill up."""
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:  # lazily: a daemon the test left running may still hold files there
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def tiny_state_dir(tmp_path: Path) -> Iterator[Path]:
    """The workspace's state directory on a 1 MiB tmpfs."""
    yield from _tiny_tmpfs(tmp_path / "state")


@pytest.fixture
def tiny_run_dir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs apart from the state directory, as /run is."""
    yield from _tiny_tmpfs(tmp_path / "run")


def fill(directory: Path) -> Path:
    """Take every block left on the directory's file system: the file that holds them."""
    filler = directory / "filler"
    with filler.open("ab", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 1024)
        except OSError:
            pass  # the disk is full now
    return filler
