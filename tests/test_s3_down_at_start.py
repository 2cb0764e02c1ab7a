"""`spotwatch run` while S3 is unreachable at start: it tells the trainer of notices all the
same and waits for the preflight checks, which still refuse a wrong bucket once S3 answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from spotwatch.emulator import ImdsEmulator

from .conftest import REGION, Daemon, Workspace, block_public_access, keys_in, wait_for
from .faultproxy import FaultProxy
from .test_daemon_e2e import save_checkpoint
from .test_metrics import scrape


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_run(workspace: Workspace, endpoint: str, *args: str, **env: str) -> Daemon:
    """`spotwatch run` with S3 at `endpoint`, started (not waited for)."""
    log_path = workspace.root / f"daemon-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "spotwatch.cli", "run", "-c", str(workspace.config_file),
             *args],
            cwd=workspace.root, env=workspace.env(AWS_ENDPOINT_URL=endpoint, **env), stdout=handle,
            stderr=subprocess.STDOUT)
    return Daemon(process, log_path)


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


@contextmanager
def s3_on(port: int) -> Iterator[Any]:
    """An S3 server on `port` (S3 coming back); yields a client of it. moto keeps its buckets
    per process: the workspace's bucket is there already."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield boto3.client("s3", region_name=REGION, endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


def make_bucket(s3: Any, name: str, region: str = REGION) -> None:
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    block_public_access(s3, name)


@pytest.fixture
def outage(workspace: Workspace) -> Workspace:
    """The workspace's config for a daemon that finds S3 down: few SDK attempts per check
    (a run of the checks then ends in seconds), hooks that leave a trace."""
    told = workspace.root / "told.txt"
    workspace.write_config(transfer={"max_attempts": 2}, hooks={
        "notice_file": str(workspace.root / "notice.json"),
        "command": f"echo \"$SPOTWATCH_NOTICE_ID\" >> {told}"})
    return workspace


def test_notices_reach_the_trainer_while_s3_is_down_and_uploads_follow(
        outage: Workspace, imds: ImdsEmulator) -> None:
    port = free_port()  # nothing listens there: connections are refused
    notice_file = outage.root / "notice.json"
    with running(start_run(outage, f"http://127.0.0.1:{port}")) as daemon:
        warning = daemon.wait_for_event("s3_unreachable_at_start")
        assert "S3 unreachable" in warning["reason"]
        assert not daemon.named("daemon_started")
        status = wait_for(lambda: outage.status().get("waiting_for_s3") and outage.status())
        assert status["pid"] == daemon.process.pid and status["degraded"]
        shown = outage.cli("status", "-c", str(outage.config_file))
        assert shown.returncode == 0, shown.stderr
        assert "waiting for S3" in shown.stdout and "checks pending" in shown.stdout
        assert outage.cli("status", "-c", str(outage.config_file), "--healthy").returncode == 1
        # The metrics say what status.json says: IMDS is up, whatever S3 does.
        assert status["imds_up"] is True and status["metrics_url"]
        assert wait_for(lambda: scrape(status["metrics_url"]).get(
            ("spotwatch_imds_up", ())) == 1)

        imds.fire_spot_interruption("terminate", in_seconds=120)
        told = json.loads(wait_for(lambda: notice_file.is_file() and notice_file.read_text()))
        assert told["kind"] == "spot-interruption"
        wait_for(lambda: (outage.root / "told.txt").is_file())
        data = save_checkpoint(outage.checkpoints / "emergency.pt", 50_000)  # during the outage
        assert daemon.process.poll() is None  # still up, still waiting

        with s3_on(port) as s3:
            wait_for(lambda: "run1/emergency.pt" in keys_in(s3, outage.bucket), timeout=90)
            assert s3.get_object(Bucket=outage.bucket,
                                 Key="run1/emergency.pt")["Body"].read() == data
            daemon.wait_for_event("s3_checks_passed")
            daemon.wait_for_event("daemon_started")
            assert daemon.stop() == 0
    # Told once: neither the notice file nor the command again as new after the wait.
    assert (outage.root / "told.txt").read_text().split() == [told["id"]]
    assert len(daemon.named("notice_detected")) == 1
    assert json.loads(notice_file.read_text()) == told
    assert len(daemon.named("s3_unreachable_at_start")) == 1


def test_a_refusal_found_once_s3_answers_ends_run(outage: Workspace) -> None:
    port = free_port()
    in_eu = f"{outage.bucket}-eu"
    save_checkpoint(outage.checkpoints / "step_1.pt", 1_000)
    with running(start_run(outage, f"http://127.0.0.1:{port}", "--bucket", in_eu)) as daemon:
        daemon.wait_for_event("s3_unreachable_at_start")
        with s3_on(port):
            eu = boto3.client("s3", region_name="eu-west-1",
                              endpoint_url=f"http://127.0.0.1:{port}")
            make_bucket(eu, in_eu, "eu-west-1")
            assert daemon.process.wait(timeout=90) == 1
            assert keys_in(eu, in_eu) == set()  # not one upload
    last = daemon.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("spotwatch: error: refusing to start: bucket region"), last
    assert "eu-west-1" in last
    assert not daemon.named("daemon_started")


def test_a_refusal_at_start_still_ends_run_at_once(outage: Workspace) -> None:
    eu = boto3.client("s3", region_name="eu-west-1")
    make_bucket(eu, f"{outage.bucket}-eu", "eu-west-1")
    result = outage.cli("run", "-c", str(outage.config_file), "--bucket", f"{outage.bucket}-eu")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "spotwatch: error: refusing to start: bucket region")
    assert "s3_unreachable_at_start" not in result.stderr


def test_a_stop_while_waiting_for_s3_ends_run_with_exit_1(outage: Workspace) -> None:
    """And status, the daemon gone, does not show a clean state: it never counted the files
    (one of them here) that are not in S3."""
    save_checkpoint(outage.checkpoints / "step_1.pt", 1000)
    with running(start_run(outage, f"http://127.0.0.1:{free_port()}")) as daemon:
        daemon.wait_for_event("s3_unreachable_at_start")
        wait_for(lambda: outage.status().get("waiting_for_s3"))
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=30) == 1
    assert daemon.named("stopped_waiting_for_s3")
    last = daemon.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("spotwatch: error: stopped while waiting for S3"), last
    shown = outage.cli("status", "-c", str(outage.config_file)).stdout
    assert "daemon:       not running" in shown, shown
    # It never counted them: status counts them on disk, and says why its report did not.
    assert ("left behind:  1 files, 1000 B not in S3 (counted on disk now); it last reported"
            in shown and "waiting for S3 at start, before it counted the watched files" in shown
            ), shown
    report = json.loads(outage.cli("status", "--json", "-c", str(outage.config_file)).stdout)
    assert report["left_by_last_run"]["not_counted"] is True
    assert report["left_by_last_run"]["files_not_in_s3"] == 1


def test_a_transient_s3_answer_is_no_refusal(workspace: Workspace, s3: Any) -> None:
    """A 503 on GetPublicAccessBlock says nothing of the bucket: `check` says S3 is
    unreachable, not that the bucket is public."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("503", lambda request: "publicAccessBlock" in request.query, times=1000)
        workspace.write_config(transfer={"max_attempts": 2})
        result = workspace.cli("check", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  public access" not in result.stdout
    assert "FAIL  bucket           S3 unreachable" in result.stdout
    assert "SlowDown" in result.stdout


def test_a_feature_the_store_does_not_implement_is_no_outage(workspace: Workspace,
                                                              s3: Any) -> None:
    """An S3-compatible store without public access blocks (SeaweedFS) answers
    GetPublicAccessBlock with 501 NotImplemented, every time: a verdict on the bucket, not an
    outage. `check` finds the bucket not fully private (refused, or allowed by
    aws.allow_public_bucket), and `run` starts and uploads rather than wait for S3 for good."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("501", lambda request: "publicAccessBlock" in request.query, times=10**6)
        refused = workspace.cli("check", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "FAIL  public access" in refused.stdout
        assert "no public access block (NotImplemented)" in refused.stdout
        assert "unreachable" not in refused.stdout

        workspace.write_config(aws={"allow_public_bucket": True})
        allowed = workspace.cli("check", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        with running(start_run(workspace, proxy.url)) as daemon:
            daemon.wait_for_event("daemon_started")
            save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 3_000)
            wait_for(lambda: "run1/step_1/model.pt" in keys_in(s3, workspace.bucket))
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=60) == 0, daemon.log_path.read_text()
    assert not daemon.named("s3_unreachable_at_start")


def test_a_flush_asked_of_a_daemon_waiting_for_s3_ends_with_one_line(
        outage: Workspace) -> None:
    """`spotwatch flush` (a trainer's epilogue, say) asks the daemon, which keeps reporting
    while it waits for S3: its flush starts only once the checks pass, maybe never. The
    command must not wait for it without a word, nor for good: it says why, exit 1."""
    with running(start_run(outage, f"http://127.0.0.1:{free_port()}")) as daemon:
        daemon.wait_for_event("s3_unreachable_at_start")
        wait_for(lambda: outage.status().get("waiting_for_s3"))
        result = outage.cli("flush", "-c", str(outage.config_file), timeout=45)
        assert result.returncode == 1, result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"spotwatch: error: the daemon (pid {daemon.process.pid}) is "
                               "waiting for S3"), last
        assert daemon.process.poll() is None  # the daemon waits on, the flush asked of it


def test_a_stop_during_the_first_run_of_the_checks_ends_run_with_one_line(
        outage: Workspace, imds: ImdsEmulator) -> None:
    """S3 takes connections and never answers: the first run of the checks lasts as long as
    the SDK's timeouts, and the trainer is told of notices meanwhile. A stop then ends `run`
    at once, as a stop while it waits does (exit 1, one line, the lifecycle action
    released), not by SIGTERM's default action, without a word."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the kernel's backlog; nothing answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        notice_file = outage.root / "notice.json"
        with running(start_run(outage, endpoint)) as daemon:
            imds.fire_spot_interruption("terminate", in_seconds=120)
            wait_for(lambda: notice_file.is_file())  # told during the first run
            assert not daemon.named("s3_unreachable_at_start")  # that run goes on
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=30) == 1
    last = daemon.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("spotwatch: error: stopped before"), last


def test_a_refusal_found_while_s3_is_down_names_its_own_reason(outage: Workspace) -> None:
    """S3 down and the instance in another region: `run` refuses at once (S3 coming back
    would not change that), and its one line names the instance's region, not S3's outage,
    which alone would only have made it wait."""
    with ImdsEmulator(region="eu-central-1") as other:
        outage.write_config(transfer={"max_attempts": 2}, imds={"endpoint": other.url})
        result = outage.cli("run", "-c", str(outage.config_file),
                            AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spotwatch: error: refusing to start: instance region"), last
    assert "eu-central-1" in last


def test_a_start_whose_first_checks_s3_leaves_unanswered_is_not_timed_out_by_systemd(
        outage: Workspace, tmp_path: Path) -> None:
    """S3 takes connections and never answers: the first run of the checks lasts the SDK's
    timeouts, longer than the unit's TimeoutStartSec (60 s), and READY=1 comes only after it.
    Meanwhile the daemon asks systemd for more time (EXTEND_TIMEOUT_USEC), so it is not killed
    and restarted over and over while it tells the trainer of notices."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    received: list[str] = []

    def extended() -> bool:
        with suppress(TimeoutError):
            received.append(notify.recv(4096).decode())
        return any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in received)

    with notify, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the kernel's backlog; nothing answers
        daemon = start_run(outage, f"http://127.0.0.1:{silent.getsockname()[1]}",
                           NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
        with running(daemon):
            wait_for(extended, timeout=30)
            assert not daemon.named("s3_unreachable_at_start")  # the first run goes on
            assert not any(m.startswith("READY=1") for m in received)
            usec = next(int(m.split("\n")[0].split("=")[1]) for m in received
                        if m.startswith("EXTEND_TIMEOUT_USEC="))
            assert usec >= 30_000_000  # from each message, more than the time to the next


def answer_of(url: str) -> str:
    """A GET's status and text ("503 waiting_for_s3: ..."), or "" while nothing listens."""
    try:
        answer = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return ""
    return f"{answer.status_code} {answer.text}"


def test_healthz_says_the_daemon_waits_for_s3_then_ok(outage: Workspace) -> None:
    """An orchestrator probing /healthz while the start waits for S3 learns why the daemon is
    not healthy (503, waiting_for_s3 and the reason) instead of a refused connection; once
    the checks pass, the same server answers 200."""
    port, metrics_port = free_port(), free_port()
    outage.write_config(transfer={"max_attempts": 2}, metrics={"port": metrics_port})
    url = f"http://127.0.0.1:{metrics_port}"
    with running(start_run(outage, f"http://127.0.0.1:{port}")) as daemon:
        daemon.wait_for_event("s3_unreachable_at_start")
        wait_for(lambda: answer_of(f"{url}/healthz").startswith(
            "503 waiting_for_s3: S3 unreachable at start"))
        exposed = answer_of(f"{url}/metrics")
        assert exposed.startswith("200 ")
        # Nothing counted yet: the pending gauges say not known (NaN), never 0.
        for gauge in ("pending_files", "pending_bytes", "incomplete_sets", "unsealed_sets"):
            assert f"\nspotwatch_{gauge} NaN\n" in exposed, exposed
        assert wait_for(lambda: outage.status().get("waiting_for_s3")
                        and outage.status())["metrics_url"] == url
        with s3_on(port):
            daemon.wait_for_event("daemon_started")
            wait_for(lambda: answer_of(f"{url}/healthz") == "200 ok\n")
            wait_for(lambda: "\nspotwatch_pending_files 0.0\n" in answer_of(f"{url}/metrics"))
            assert daemon.stop() == 0
