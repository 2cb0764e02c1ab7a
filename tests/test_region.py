"""The region: aws.region, else AWS_REGION / AWS_DEFAULT_REGION / the profile, else IMDS;
AWS_EC2_METADATA_DISABLED=true keeps spotwatch away from IMDS altogether."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from spotwatch.aws.region import resolve_region
from spotwatch.config import load_config
from spotwatch.emulator import ImdsEmulator
from spotwatch.errors import ConfigError

from .conftest import REGION, Workspace
from .faultproxy import FaultProxy
from .test_config import assert_usage_error

NO_REGION_ENV = {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", "AWS_EC2_METADATA_DISABLED": ""}


def config_without_region(tmp_path: Path, imds_url: str, **imds: Any) -> Path:
    path = tmp_path / "region.yaml"
    settings = ", ".join(f"{key}: {value}" for key, value in {"endpoint": imds_url,
                                                               **imds}.items())
    path.write_text(f"watch: [{{path: ckpt}}]\nimds: {{{settings}}}\n")
    return path


@pytest.fixture
def no_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in NO_REGION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))


def test_config_region_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            imds: ImdsEmulator) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    path = tmp_path / "c.yaml"
    path.write_text("aws: {region: ap-south-1}\nwatch: [{path: x}]\n")
    assert resolve_region(load_config(path)) == "ap-south-1"


def test_sdk_environment_before_imds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     no_region: None) -> None:
    with ImdsEmulator(region="eu-central-1") as other:
        config = load_config(config_without_region(tmp_path, other.url))
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
        assert resolve_region(config) == "eu-west-3"
        monkeypatch.setenv("AWS_REGION", "eu-north-1")  # the variable every SDK reads first
        assert resolve_region(config) == "eu-north-1"
        assert other.counts().get("get", 0) == 0


def test_profile_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_region: None,
                        imds: ImdsEmulator) -> None:
    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[profile train]\nregion = sa-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.setenv("AWS_PROFILE", "train")
    assert resolve_region(load_config(config_without_region(tmp_path, imds.url))) == "sa-east-1"
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ConfigError, match="cannot read the AWS region"):
        resolve_region(load_config(config_without_region(tmp_path, imds.url)))


def test_instance_region_last(tmp_path: Path, no_region: None) -> None:
    with ImdsEmulator(region="ca-central-1") as other:
        config = load_config(config_without_region(tmp_path, other.url))
        assert resolve_region(config) == "ca-central-1"


def test_no_region_anywhere_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              no_region: None, imds: ImdsEmulator) -> None:
    config = load_config(config_without_region(tmp_path, imds.url, enabled="false"))
    with pytest.raises(ConfigError, match=r"not asking IMDS: imds\.enabled is false"):
        resolve_region(config)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = load_config(config_without_region(tmp_path, imds.url))
    with pytest.raises(ConfigError, match="AWS_EC2_METADATA_DISABLED=true"):
        resolve_region(config)
    assert imds.counts().get("token_put", 0) == 0


def check(workspace: Workspace, imds_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    config_without_region(workspace.root, imds_url)
    (workspace.root / "ckpt").mkdir(exist_ok=True)
    return workspace.cli("check", "-c", "region.yaml", **{**NO_REGION_ENV, **env})


def test_cli_takes_the_environment_region(workspace: Workspace) -> None:
    # The bucket is in us-west-2; without aws.region the SDK's region is the expected one.
    result = check(workspace, workspace.imds_url, AWS_DEFAULT_REGION="eu-west-1")
    assert result.returncode == 1, result.stdout
    assert "configured region is eu-west-1" in result.stdout
    result = check(workspace, workspace.imds_url, AWS_DEFAULT_REGION="eu-west-1",
                   AWS_REGION="us-west-2")
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_takes_the_instance_region(workspace: Workspace) -> None:
    with ImdsEmulator(region="eu-central-1") as other:
        result = check(workspace, other.url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "s3://" in result.stdout and "configured region is eu-central-1" in result.stdout


def test_cli_without_any_region_exits_2(workspace: Workspace) -> None:
    result = check(workspace, workspace.imds_url, AWS_EC2_METADATA_DISABLED="true")
    assert_usage_error(result, "no AWS region")


def test_metadata_disabled_means_no_imds_at_all(workspace: Workspace,
                                                imds: ImdsEmulator) -> None:
    workspace.write_config()
    result = workspace.cli("check", "-c", "config.yaml", AWS_EC2_METADATA_DISABLED="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "disabled (AWS_EC2_METADATA_DISABLED=true): no notices will be seen" in result.stdout
    daemon = workspace.start_daemon(AWS_EC2_METADATA_DISABLED="true")
    warning = daemon.wait_for_event("imds_disabled")
    assert warning["reason"] == "AWS_EC2_METADATA_DISABLED=true"
    imds.fire_spot_interruption()
    daemon.stop()
    assert daemon.named("notice_detected") == [] and len(daemon.named("imds_disabled")) == 1
    assert imds.counts().get("token_put", 0) == 0 and imds.counts().get("get", 0) == 0


def test_the_crt_signs_for_the_buckets_own_region_when_another_is_allowed(
        workspace: Workspace) -> None:
    """aws.allow_cross_region with the CRT: botocore follows S3's redirect to the bucket's
    region, the CRT does not, and S3 refuses a request signed for another region (or sent to
    its endpoint). So the CRT's requests are made for the bucket's own region."""
    with FaultProxy(workspace.env()["AWS_ENDPOINT_URL"]) as proxy:
        workspace.write_config(aws={"region": "eu-west-1", "allow_cross_region": True},
                               transfer={"client": "crt"})
        (workspace.checkpoints / "step_1").mkdir(parents=True, exist_ok=True)
        (workspace.checkpoints / "step_1" / "model.pt").write_bytes(b"weights" * 100)
        result = workspace.cli("flush", "-c", str(workspace.config_file),
                               AWS_ENDPOINT_URL=proxy.url)
        assert result.returncode == 0, result.stderr
        uploads = [request for request, _ in proxy.seen if request.operation == "PutObject"
                   and request.path.endswith("/step_1/model.pt")]
    assert uploads, [request.path for request, _ in proxy.seen]
    assert {request.signing_region for request in uploads} == {REGION}
