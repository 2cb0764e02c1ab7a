"""`spotwatch check` and the refusal at `run` start: region, public access, write, IMDS."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest

from spotwatch.aws.imds import ENDPOINT_MODE_ENV, share_with_sdk
from spotwatch.config import ImdsSettings
from spotwatch.emulator import ImdsEmulator

from .conftest import Workspace, block_public_access, keys_in
from .faultproxy import FaultProxy, Request
from .test_daemon_e2e import save_checkpoint


def check(workspace: Workspace, bucket: str | None = None) -> Any:
    args = ["check", "-c", "config.yaml"] + (["--bucket", bucket] if bucket else [])
    return workspace.cli(*args)


def test_private_same_region_bucket_passes(workspace: Workspace, s3: Any) -> None:
    result = check(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok") and "bucket region" in line for line in lines)
    assert any(line.startswith("ok") and "all public access blocked" in line for line in lines)
    assert any(line.startswith("ok") and "can write" in line for line in lines)
    assert any("credentials" in line and "...ting" in line for line in lines)
    assert "testing" not in result.stdout.replace("...ting", "")  # no secrets printed
    assert not s3.list_objects_v2(Bucket=workspace.bucket).get("KeyCount")  # probe removed


def test_check_makes_no_state_directory(workspace: Workspace, s3: Any) -> None:
    """A check before the unit's first start (as root, say) must not make the daemon's state
    directory, which would then be the checker's, with its mode: a missing one that could be
    made passes (one that could not is refused as `run` refuses it: test_trainer_users)."""
    state = workspace.root / "state-to-be" / "spotwatch"
    workspace.write_config(state={"dir": str(state)})
    result = check(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not state.parent.exists()


@pytest.mark.parametrize("verb", ["check", "run"])
def test_a_state_directory_that_is_a_link_to_nothing_is_refused_alike(
        workspace: Workspace, s3: Any, verb: str) -> None:
    """A dangling symlink at state.dir: `run` cannot make the directory, so `check` must not
    pass it (old: it did, as a missing directory that could be made)."""
    state = workspace.root / "state-link"
    state.symlink_to(workspace.root / "nowhere")
    workspace.write_config(state={"dir": str(state)})
    result = workspace.cli(verb, "-c", "config.yaml", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"spotwatch: error: cannot create state directory {state}: File exists")


def test_cross_region_bucket_is_refused(workspace: Workspace, s3: Any) -> None:
    eu = boto3.client("s3", region_name="eu-west-1")
    eu.create_bucket(Bucket=f"{workspace.bucket}-eu",
                     CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    block_public_access(eu, f"{workspace.bucket}-eu")
    result = check(workspace, f"{workspace.bucket}-eu")
    assert result.returncode == 1
    assert "FAIL  bucket region" in result.stdout
    assert "eu-west-1" in result.stdout
    run = workspace.cli("run", "-c", "config.yaml", "--bucket", f"{workspace.bucket}-eu")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        "spotwatch: error: refusing to start: bucket region")
    workspace.write_config(aws={"allow_cross_region": True})
    assert check(workspace, f"{workspace.bucket}-eu").returncode == 0


def test_public_bucket_is_refused(workspace: Workspace, s3: Any) -> None:
    s3.delete_public_access_block(Bucket=workspace.bucket)
    result = check(workspace)
    assert result.returncode == 1
    assert "FAIL  public access" in result.stdout
    workspace.write_config(aws={"allow_public_bucket": True})
    assert check(workspace).returncode == 0


def test_instance_in_another_region_is_refused(workspace: Workspace) -> None:
    with ImdsEmulator(region="eu-central-1") as other:
        workspace.write_config(imds={"endpoint": other.url})
        result = check(workspace)
    assert result.returncode == 1
    assert ("the instance is in eu-central-1, configured region is us-west-2 "
            "(set aws.allow_cross_region: true to allow)") in result.stdout
    with ImdsEmulator(region="eu-central-1") as other:  # the switch it names lets it start
        workspace.write_config(imds={"endpoint": other.url}, aws={"allow_cross_region": True})
        assert check(workspace).returncode == 0


def test_unreachable_imds_is_only_a_warning(workspace: Workspace) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workspace.write_config(imds={"endpoint": f"http://127.0.0.1:{port}", "timeout": 0.3})
    result = check(workspace)
    assert result.returncode == 0, result.stdout
    assert "warn  IMDS" in result.stdout


def test_missing_bucket_fails(workspace: Workspace) -> None:
    result = check(workspace, "no-such-bucket-anywhere")
    assert result.returncode == 1
    assert "cannot reach s3://no-such-bucket-anywhere" in result.stdout


def test_a_denied_delete_is_not_reported_as_a_denied_write(workspace: Workspace, s3: Any) -> None:
    """A role that may write but not delete under the prefix (a hand-made policy without
    s3:DeleteObject) fails the check, which names the delete and the probe left behind: the
    write itself worked, so "cannot write" would send the operator after the wrong grant."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("403", lambda request: request.operation == "DeleteObject", times=1000)
        result = workspace.cli("check", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "write" in line)
    assert line.startswith("FAIL"), line
    assert "cannot write" not in line
    probe = next(iter(keys_in(s3, workspace.bucket)))
    assert "cannot delete" in line and probe in line and "AccessDenied" in line, line


def _is_probe_read(request: Any) -> bool:
    return request.method == "GET" and "/.spotwatch/probe-" in request.path


def _is_listing(request: Any) -> bool:
    return request.method == "GET" and "list-type" in request.query


def _is_upload_listing(request: Any) -> bool:
    return request.operation == "ListMultipartUploads"


@pytest.mark.parametrize(("denied", "named"), [
    (_is_probe_read, "cannot read back"),
    (_is_listing, "cannot list s3://"),
    (_is_upload_listing, "cannot list the multipart uploads"),
])
def test_a_denied_read_or_listing_fails_the_check_and_says_which(
        workspace: Workspace, s3: Any, denied: Callable[[Any], bool], named: str) -> None:
    """A role that may write but not read back or list (a hand-made policy without
    s3:GetObject, s3:ListBucket or s3:ListBucketMultipartUploads) would upload fine and then
    fail at restore, sealing or crash cleanup: the check says so up front."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("403", denied, times=1000)
        result = workspace.cli("check", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if named in line]
    assert line.startswith("FAIL") and "AccessDenied" in line, line
    assert not keys_in(s3, workspace.bucket)  # the probe is deleted all the same


def test_instance_role_credentials_come_from_the_configured_imds(
        workspace: Workspace, imds: ImdsEmulator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no other credentials, the instance role's come from the IMDS spotwatch is set to
    ask (imds.endpoint here; imds.endpoint_mode on an IPv6-only instance): botocore reads
    neither from spotwatch's config, and looked at 169.254.169.254, where it found none."""
    now = datetime.now(UTC)
    imds.set_item("meta-data/iam/security-credentials/ckpt-writer", json.dumps({
        "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAINSTANCEROLE9876",
        "SecretAccessKey": "role-secret", "Token": "role-token",
        "LastUpdated": now.isoformat(), "Expiration": (now + timedelta(hours=6)).isoformat()}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp_path / "no-such-file")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    result = check(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "credentials" in line)
    assert line.startswith("ok") and "iam-role" in line and "...9876" in line, line
    assert imds.gets_of("meta-data/iam/security-credentials/ckpt-writer") >= 1


@pytest.mark.parametrize("mode", ["IPv6", "IPv4"])
def test_the_sdk_looks_for_credentials_by_the_configured_endpoint_mode(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config's mode wins over the environment's, as in spotwatch's own IMDS client.
    monkeypatch.setenv(ENDPOINT_MODE_ENV, "IPv4" if mode == "IPv6" else "IPv6")
    share_with_sdk(ImdsSettings(endpoint_mode=mode))  # type: ignore[arg-type]
    session = botocore.session.Session()
    assert session.get_config_variable("ec2_metadata_service_endpoint_mode") == mode


def test_a_one_shot_flush_refuses_a_bucket_run_would_refuse(workspace: Workspace,
                                                             s3: Any) -> None:
    """In another region, or public: refused in one line before anything is uploaded; allowed
    by the same settings that allow `run`."""
    (workspace.checkpoints / "step_1").mkdir()
    (workspace.checkpoints / "step_1" / "model.pt").write_bytes(b"weights")
    eu = boto3.client("s3", region_name="eu-west-1")
    other = f"{workspace.bucket}-eu"
    eu.create_bucket(Bucket=other, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    block_public_access(eu, other)
    flushed = workspace.cli("flush", "-c", "config.yaml", "--bucket", other)
    assert flushed.returncode == 1
    assert flushed.stderr.strip().splitlines()[-1].startswith(
        "spotwatch: error: refusing to flush: bucket region: s3://" + other), flushed.stderr
    assert not keys_in(eu, other)
    s3.delete_public_access_block(Bucket=workspace.bucket)
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 1
    assert flushed.stderr.strip().splitlines()[-1].startswith(
        "spotwatch: error: refusing to flush: public access"), flushed.stderr
    assert not keys_in(s3, workspace.bucket)
    workspace.write_config(aws={"allow_cross_region": True, "allow_public_bucket": True})
    assert workspace.cli("flush", "-c", "config.yaml", "--bucket", other).returncode == 0
    assert keys_in(eu, other) >= {"run1/step_1/model.pt"}


def checks_while_s3_holds(workspace: Workspace, monkeypatch: pytest.MonkeyPatch,
                          held: Callable[[Request], bool], seconds: float) -> list[Any]:
    """The preflight checks, bounded to `seconds`, while S3 takes the requests `held` picks
    and never answers them."""
    from spotwatch.aws.preflight import checks_within
    from spotwatch.config import load_config

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("delay", held, times=10_000, delay=3600)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        try:
            return checks_within(load_config(workspace.config_file), workspace.bucket, seconds)
        finally:
            for rule in proxy.rules:
                rule.release()


def test_check_answers_when_s3_takes_requests_and_never_replies(
        workspace: Workspace, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 (or a proxy before it) accepting connections and never answering held `spotwatch
    check` for the SDK's timeouts and retries, minutes in all: it now answers once its bound
    is over, with one failure that says so (exit 1 from the CLI)."""
    results = checks_while_s3_holds(workspace, monkeypatch, lambda request: True, 2.0)
    # What answered is kept (the credentials, which ask no S3), then what did not.
    assert [(r.name, r.ok, r.unreachable) for r in results] == [
        ("credentials", True, False), ("bucket", False, True)]
    assert results[-1].detail == f"S3 did not answer within 2 s (s3://{workspace.bucket})"


def test_check_cut_short_in_its_write_check_keeps_what_answered_and_names_the_probe(
        workspace: Workspace, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 stops answering once the probe object is written: the checks before it are
    reported as they came out, and the line that says S3 did not answer names the probe
    object the check could not delete."""
    from spotwatch.aws.preflight import write_probe_key
    from spotwatch.config import load_config

    results = checks_while_s3_holds(  # the probe object's read-back is never answered
        workspace, monkeypatch,
        lambda request: request.method == "GET" and "/probe-" in request.path, 5.0)
    assert [r.name for r in results] == ["credentials", "bucket region", "public access",
                                         "encryption", "bucket"]
    assert all(r.ok for r in results[:-1]), results
    probe = write_probe_key(load_config(workspace.config_file))
    assert results[-1].detail == (
        f"S3 did not answer within 5 s (s3://{workspace.bucket}); the write check's probe "
        f"object may be left at s3://{workspace.bucket}/{probe}")


def test_a_one_shot_flush_answers_within_its_time_when_s3_never_does(
        workspace: Workspace, s3: Any) -> None:
    """S3 taking requests and never answering held the flush's check of the bucket's region
    and public access for the SDK's ten minutes, past any notice's deadline: the check now
    takes no longer than the flush may (sync.stop_timeout), and the flush says what it left."""
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1000)
    workspace.write_config(sync={"stop_timeout": 3})
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("delay", lambda request: True, times=10_000, delay=3600)
        try:
            # The subprocess timeout is the hang this guards against, not a latency bound.
            flushed = workspace.cli("flush", "-c", "config.yaml", timeout=120,
                                    AWS_ENDPOINT_URL=proxy.url)
        finally:
            for rule in proxy.rules:
                rule.release()
    assert flushed.returncode == 1, flushed.stderr
    assert "Traceback" not in flushed.stderr
