"""Config loading and validation, and the CLI's one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.crt_store import DEFAULT_TARGET_GBPS, target_throughput_gbps
from spotwatch.aws.instance_network import BASELINE_GBPS, MAX_TABLE_GBPS
from spotwatch.config import (
    MAX_SECONDS,
    MAX_TARGET_THROUGHPUT_GBPS,
    MiB,
    TransferSettings,
    find_config_file,
    load_config,
    parse_size,
)
from spotwatch.errors import ConfigError
from spotwatch.state import StateDir
from spotwatch.sync.ledger import Ledger

from .conftest import Workspace, keys_in, wait_for
from .test_daemon_e2e import save_checkpoint


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "watch:\n  - path: ckpt\n"))
    assert config.region is None  # not configured: resolved from the SDK, then IMDS
    assert config.watch[0].path == tmp_path / "ckpt"
    assert config.watch[0].prefix == "checkpoints/"
    assert config.watch[0].exclude == ("*.tmp", "*.tmp/*", "__pycache__/*", ".git/*",
                                       "tmp-checkpoint-*/*", "*/tmp-checkpoint-*/*",
                                       "*.orbax-checkpoint-tmp-*/*", "*-unfinished")
    assert config.sync.mode == "continuous"
    assert config.imds.poll_interval == 1.0
    assert config.imds.token_ttl == 21600
    assert config.transfer.multipart_threshold == 64 * MiB
    assert config.transfer.multipart_chunksize == 16 * MiB
    assert config.transfer.max_concurrency == 20


def test_full_config_is_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
aws: {region: eu-central-1}
watch:
  - {path: /opt/ml/checkpoints, prefix: job7/, exclude: ["*"], include: ["*.pt"]}
sync: {mode: on-notice, settle_seconds: 1}
transfer: {multipart_threshold: 128MB, multipart_chunksize: 32MiB, max_concurrency: 8,
           checksum_algorithm: crc32c}
imds: {endpoint: "http://[::1]:9", poll_interval: 0.5, token_ttl: 600}
state: {dir: state}
"""))
    assert config.region == "eu-central-1"
    assert config.watch[0].include == ("*.pt",)
    assert config.sync.mode == "on-notice"
    assert config.transfer.multipart_threshold == 128 * MiB
    assert config.transfer.multipart_chunksize == 32 * MiB
    assert config.transfer.checksum_algorithm == "CRC32C"
    assert config.imds.endpoint == "http://[::1]:9"
    assert config.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("watch: [{path: x}]\nfoo: 1\n", "unknown config key 'foo'"),
        ("watch: [{path: x}]\nsync: {moed: continuous}\n", "unknown config key 'sync.moed'"),
        ("watch: [{path: x, prefx: a/}]\n", "unknown config key 'watch[0].prefx'"),
        ("watch: [{path: x}]\nimds: {poll_interval: fast}\n",
         "'imds.poll_interval' must be a number, got 'fast'"),
        ("watch: [{path: x}]\ntransfer: {max_concurrency: yes}\n",
         "'transfer.max_concurrency' must be integer, got bool"),
        ("watch: [{path: x}]\nsync: {mode: sometimes}\n", "'sync.mode' must be one of"),
        ("watch: [{path: x}]\naws: {region: mars}\n", "not an AWS region name"),
        ("watch: [{path: x}]\ntransfer: {multipart_chunksize: 1MB}\n", "from 5 MiB to 5 GiB"),
        ("watch: []\n", "at least one directory"),
        ("watch: [{prefix: a/}]\n", "'watch[0].path' is required"),
        ("watch: [{path: x, prefix: ../up}]\n", "relative key prefix"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("watch: [{path: x}]\nimds: {token_ttl: 99999}\n", "1 to 21600"),
    ],
)
def test_invalid_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"YAML syntax error at line 3"):
        load_config(write(tmp_path, "watch: [{path: x}]\nsync: 1\n  mode: x\n"))


def test_sizes() -> None:
    assert parse_size("64MB", "k") == 64 * MiB
    assert parse_size(" 2 GiB ", "k") == 2048 * MiB
    assert parse_size(1234, "k") == 1234
    with pytest.raises(ConfigError):
        parse_size("lots", "k")


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = write(tmp_path, "watch: [{path: x}]\n")
    assert find_config_file(None) == Path("config.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("watch: [{path: y}]\n")
    monkeypatch.setenv("SPOTWATCH_CONFIG", str(other))
    assert find_config_file(None) == other
    assert find_config_file(str(local)) == local
    with pytest.raises(ConfigError, match="config file not found"):
        find_config_file(str(tmp_path / "missing.yaml"))


def assert_usage_error(result: object, fragment: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 2, stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("spotwatch: error:")
    assert fragment in lines[0]
    assert "Traceback" not in stderr


def test_cli_missing_config_file(workspace: Workspace) -> None:
    assert_usage_error(workspace.cli("run", "-c", "nope.yaml"), "config file not found: nope.yaml")


def test_cli_config_file_that_is_a_directory_says_so(workspace: Workspace) -> None:
    (workspace.root / "conf.d").mkdir()
    assert_usage_error(workspace.cli("check", "-c", "conf.d"), "config file conf.d is a directory")


def test_cli_yaml_syntax_error(workspace: Workspace) -> None:
    workspace.config_file.write_text("watch: [\n")
    assert_usage_error(workspace.cli("run", "-c", "config.yaml"), "YAML syntax error")


def test_cli_unknown_key(workspace: Workspace) -> None:
    workspace.write_config(sync={"bogus": 1})
    assert_usage_error(workspace.cli("flush", "-c", "config.yaml"),
                       "unknown config key 'sync.bogus'")


def test_cli_wrong_type(workspace: Workspace) -> None:
    workspace.write_config(imds={"poll_interval": "often"})
    assert_usage_error(workspace.cli("run", "-c", "config.yaml"), "'imds.poll_interval' must be")


def test_a_watch_dir_missing_at_the_start_is_watched_for(workspace: Workspace, s3: Any) -> None:
    """One watched directory not made yet (the trainer makes it later, a volume not mounted
    yet) does not keep the daemon from protecting the others, nor its own files once made."""
    later = workspace.root / "later" / "run"
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/"},
                                  {"path": str(later), "prefix": "run2/"}])
    flushed = workspace.cli("flush", "-c", "config.yaml")  # says what it could not protect
    assert flushed.returncode == 1
    assert flushed.stderr.splitlines()[-1] == (
        f"spotwatch: error: 1 watched directories not there (not made or mounted yet): {later}")
    daemon = workspace.start_daemon()
    daemon.wait_for_event("watch_dir_missing")
    wait_for(lambda: f"missing:      1 watched directories not there (not made or mounted "
                     f"yet): {later}" in workspace.cli("status", "-c", "config.yaml").stdout)
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1_000)
    wait_for(lambda: "run1/step_1/model.pt" in keys_in(s3, workspace.bucket))
    save_checkpoint(later / "step_1" / "model.pt", 1_000)
    wait_for(lambda: "run2/step_1/model.pt" in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0


@pytest.mark.parametrize("command", ["run", "flush"])
def test_cli_watch_path_that_is_a_file(workspace: Workspace, command: str) -> None:
    (workspace.root / "model.pt").write_bytes(b"weights")
    workspace.write_config(watch=[{"path": str(workspace.root / "model.pt")}])
    assert_usage_error(workspace.cli(command, "-c", "config.yaml"),
                       f"watch directory is not a directory: {workspace.root / 'model.pt'}")


def test_cli_missing_bucket(workspace: Workspace) -> None:
    result = workspace.cli("run", "-c", "config.yaml", S3_BUCKET_NAME="")
    assert_usage_error(result, "no bucket")


def test_cli_bad_bucket_name(workspace: Workspace) -> None:
    result = workspace.cli("run", "-c", "config.yaml", "--bucket", "Not_A_Bucket")
    assert_usage_error(result, "not a valid S3 bucket name")


def test_cli_usage_error_is_one_line(workspace: Workspace) -> None:
    assert_usage_error(workspace.cli("frobnicate"), "invalid choice")
    assert_usage_error(workspace.cli("run", "--no-such-flag"), "unrecognized arguments")


@pytest.mark.parametrize("command", ["iam-policy", "status", "run"])
def test_cli_empty_config_flag(workspace: Workspace, command: str) -> None:
    # ./config.yaml is there: an empty -c (an unset shell variable) must not fall back to it.
    result = workspace.cli(command, "-c", "", timeout=20)  # old: `run` started the daemon
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "-c/--config: an empty path" in result.stderr


def test_cli_version(workspace: Workspace) -> None:
    from spotwatch import __version__

    result = workspace.cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"spotwatch {__version__}"


def test_cli_empty_bucket_flag(workspace: Workspace) -> None:
    # $S3_BUCKET_NAME is set: an empty --bucket must not silently fall back to it.
    assert_usage_error(workspace.cli("run", "-c", "config.yaml", "--bucket", ""),
                       "--bucket is empty")


# A command prefix under which file permissions apply: root's capabilities bypass them.
AS_UNPRIVILEGED = (() if os.geteuid() != 0 else
                   ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"))
needs_setpriv = pytest.mark.skipif(bool(AS_UNPRIVILEGED) and not shutil.which("setpriv"),
                                   reason="dropping root's file capabilities needs setpriv")


def cli_unprivileged(workspace: Workspace, *args: str, **env: str
                     ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_UNPRIVILEGED, sys.executable, "-m", "spotwatch.cli", *args],
                          cwd=workspace.root, env=workspace.env(**env), capture_output=True,
                          text=True, timeout=60)


@needs_setpriv
@pytest.mark.parametrize("given_by", ["-c", "SPOTWATCH_CONFIG"])
def test_cli_config_in_a_directory_this_user_cannot_search(workspace: Workspace,
                                                           given_by: str) -> None:
    closed = workspace.root / "closed"
    closed.mkdir()
    shutil.copy(workspace.config_file, closed / "config.yaml")
    closed.chmod(0o000)
    path = str(closed / "config.yaml")
    try:
        result = (cli_unprivileged(workspace, "iam-policy", "-c", path) if given_by == "-c"
                  else cli_unprivileged(workspace, "iam-policy", SPOTWATCH_CONFIG=path))
    finally:
        closed.chmod(0o700)
    assert_usage_error(result, f"cannot read config file {path}: Permission denied")


def test_cli_config_path_too_long_for_the_file_system(workspace: Workspace) -> None:
    assert_usage_error(workspace.cli("iam-policy", "-c", "c" * 5000), "File name too long")


@needs_setpriv
def test_cli_unreadable_env_file(workspace: Workspace) -> None:
    env_file = workspace.root / "config" / ".env"
    env_file.parent.mkdir()
    env_file.write_text("S3_BUCKET_NAME=from-env-file\n")
    env_file.chmod(0o000)
    result = cli_unprivileged(workspace, "iam-policy", "-c", "config.yaml", S3_BUCKET_NAME="")
    assert_usage_error(result, f"cannot read {env_file}: Permission denied")


def test_cli_crt_checksum_without_the_crt(workspace: Workspace) -> None:
    workspace.write_config(transfer={"checksum_algorithm": "CRC32C"})
    assert_usage_error(workspace.cli("check", "-c", "config.yaml", BOTO_DISABLE_CRT="true"),
                       "CRC32C needs the AWS CRT")


@pytest.mark.parametrize("disabled", [False, True])
def test_default_checksum_is_the_one_every_version_restores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disabled: bool) -> None:
    monkeypatch.setattr("botocore.compat.HAS_CRT", not disabled)
    config = load_config(write(tmp_path, "watch: [{path: c}]\n"))
    assert config.transfer.checksum_algorithm == "CRC32"


def test_cli_default_checksum_without_the_crt_loads(workspace: Workspace) -> None:
    """BOTO_DISABLE_CRT set and nothing configured: CRC32, not a refusal of the default."""
    result = workspace.cli("iam-policy", "-c", "config.yaml", BOTO_DISABLE_CRT="true")
    assert result.returncode == 0, result.stderr


def test_cli_crt_client_without_the_crt(workspace: Workspace) -> None:
    workspace.write_config(transfer={"client": "crt"})
    assert_usage_error(workspace.cli("check", "-c", "config.yaml", BOTO_DISABLE_CRT="true"),
                       "config key 'transfer.client': crt needs the AWS CRT")


@pytest.mark.parametrize(("client", "disabled", "attempts", "uses_crt"), [
    ("auto", False, 10, True), ("auto", True, 10, False), ("classic", False, 10, False),
    ("crt", False, 10, True), ("auto", False, 1, False), ("crt", False, 2, True)])
def test_transfer_client_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str,
                                disabled: bool, attempts: int, uses_crt: bool) -> None:
    """auto: the CRT wherever botocore can use it (awscrt importable, BOTO_DISABLE_CRT unset)
    and it can keep to transfer.max_attempts (the CRT always retries)."""
    monkeypatch.setattr("botocore.compat.HAS_CRT", not disabled)
    config = load_config(write(tmp_path, "watch: [{path: c}]\ntransfer: "
                                         f"{{client: {client}, max_attempts: {attempts}}}\n"))
    assert config.transfer.client == client
    assert config.transfer.uses_crt is uses_crt


def test_cli_crt_client_with_a_single_attempt(workspace: Workspace) -> None:
    """The CRT retries whatever it is told: one attempt would silently be six."""
    workspace.write_config(transfer={"client": "crt", "max_attempts": 1})
    assert_usage_error(workspace.cli("check", "-c", "config.yaml"),
                       "config key 'transfer.max_attempts' must be at least 2 with "
                       "'transfer.client: crt'")


@given(gbps=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6))
@settings(max_examples=60, deadline=None)
def test_target_throughput_is_taken_or_refused_in_one_line(gbps: float) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "watch: [{path: c}]\ntransfer: {target_throughput: "
                                      f"{_yaml_number(gbps)}}}\n")
        if 0 < gbps <= MAX_TARGET_THROUGHPUT_GBPS:
            assert load_config(path).transfer.target_throughput == gbps
            return
        with pytest.raises(ConfigError) as refused:
            load_config(path)
    message = str(refused.value)
    assert message.startswith("config key 'transfer.target_throughput' must be")
    assert "\n" not in message


def test_target_throughput_defaults_from_the_instance_type(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CRT's figure for the instance type (None off EC2), else the table's, else
    10 Gbit/s; a configured one wins."""
    monkeypatch.setattr("awscrt.s3.get_ec2_instance_type", lambda: "p4d.24xlarge")
    monkeypatch.setattr("awscrt.s3.get_recommended_throughput_target_gbps", lambda: 400.0)
    assert target_throughput_gbps(TransferSettings()) == 400.0
    assert target_throughput_gbps(TransferSettings(target_throughput=25.0)) == 25.0
    monkeypatch.setattr("awscrt.s3.get_recommended_throughput_target_gbps", lambda: None)
    for instance_type, gbps in [(None, DEFAULT_TARGET_GBPS), ("m5.large", DEFAULT_TARGET_GBPS),
                                ("g5.xlarge", DEFAULT_TARGET_GBPS), ("g5.48xlarge", 100.0),
                                ("g6.12xlarge", 40.0), ("g6e.48xlarge", 400.0),
                                ("trn2.48xlarge", MAX_TABLE_GBPS)]:
        monkeypatch.setattr("awscrt.s3.get_ec2_instance_type", lambda named=instance_type: named)
        assert target_throughput_gbps(TransferSettings()) == gbps, instance_type
        assert target_throughput_gbps(TransferSettings(target_throughput=2.5)) == 2.5
    assert DEFAULT_TARGET_GBPS == 10.0


@given(st.sampled_from(sorted(BASELINE_GBPS)), st.sampled_from([None, 400.0, 600.0]))
def test_an_instance_types_target_is_its_nics_within_the_default_and_the_cap(
        instance_type: str, recommended: float | None) -> None:
    """Every type in the table: never below the CRT's default, never above MAX_TABLE_GBPS,
    else its baseline; where the CRT has a figure, the CRT's."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("awscrt.s3.get_ec2_instance_type", lambda: instance_type)
        patched.setattr("awscrt.s3.get_recommended_throughput_target_gbps", lambda: recommended)
        target = target_throughput_gbps(TransferSettings())
    if recommended is not None:
        assert target == recommended
        return
    assert DEFAULT_TARGET_GBPS <= target <= MAX_TABLE_GBPS
    assert target == min(max(BASELINE_GBPS[instance_type], DEFAULT_TARGET_GBPS),
                         MAX_TABLE_GBPS)


def _yaml_number(value: float) -> str:
    """The number as YAML writes it: repr's '1e-05' would read back as a string."""
    return str(yaml.safe_dump(value).split("\n", 1)[0])


# Settings of the AWS SDK that botocore refuses only once a client or credentials are made.
BAD_SDK_SETTINGS = [
    ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "not-a-url", "Metadata endpoint: not-a-url"),
    ("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv5", "endpoint mode: IPv5"),
    ("AWS_ENDPOINT_URL_S3", "not-a-url", "Invalid endpoint: not-a-url"),
    ("AWS_ENDPOINT_URL", "http://[::1", "Invalid IPv6 URL"),
    ("AWS_PROFILE", "no-such-profile", "(no-such-profile) could not be found"),
    ("AWS_SECRET_ACCESS_KEY", "", "missing: AWS_SECRET_ACCESS_KEY"),
]


@pytest.mark.parametrize(("variable", "value", "fragment"), BAD_SDK_SETTINGS)
@pytest.mark.parametrize("command", ["check", "flush", "restore"])
def test_cli_bad_aws_sdk_setting_is_one_line(workspace: Workspace, command: str, variable: str,
                                             value: str, fragment: str) -> None:
    if variable.startswith("AWS_EC2_METADATA_SERVICE"):
        workspace.write_config(imds={"endpoint": None})  # the file's would win
    result = workspace.cli(command, "-c", "config.yaml", **{variable: value})
    assert_usage_error(result, fragment)


@pytest.mark.parametrize(("endpoint", "said"), [
    ("", "AWS_REGION is not an AWS region name: 'us west 2'"),  # AWS's own S3
    (None, "region_name 'us west 2'"),  # the tests' moto: botocore refuses it
], ids=["aws", "store-of-its-own"])
def test_cli_region_of_no_format_from_the_environment_is_one_line(
        workspace: Workspace, endpoint: str | None, said: str) -> None:
    workspace.write_config(aws={"region": None})
    env = {"AWS_REGION": "us west 2"}
    if endpoint is not None:
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    assert_usage_error(workspace.cli("check", "-c", "config.yaml", **env), said)


def test_cli_unparsable_aws_config_file_is_one_line(workspace: Workspace) -> None:
    aws_config = workspace.root / "aws-config"
    aws_config.write_text("this is [not an ini file\n")
    result = workspace.cli("check", "-c", "config.yaml", AWS_CONFIG_FILE=str(aws_config))
    assert_usage_error(result, f"Unable to parse config file: {aws_config}")


def test_a_set_left_unsealed_in_a_watch_dir_missing_at_the_start_is_sealed_once_it_is_back(
        workspace: Workspace, s3: Any) -> None:
    """A crash left step_1's files in S3 without its manifest; the daemon starts before the
    volume holding it is mounted. The set is neither sealed empty nor forgotten: its manifest
    is written once the directory is back."""
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1_000)
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    manifest = "run1/.spotwatch/manifests/step_1.json"
    s3.delete_object(Bucket=workspace.bucket, Key=manifest)  # as a kill -9 before it left
    ledger = Ledger(StateDir(workspace.root / "state").ledger)
    ledger.set_settled(workspace.bucket, "run1/step_1", False)
    ledger.close()
    mount = workspace.root / "unmounted"
    workspace.checkpoints.rename(mount)
    daemon = workspace.start_daemon()
    daemon.wait_for_event("watch_dir_missing")
    mount.rename(workspace.checkpoints)
    daemon.wait_for_event("watch_dir_back")
    wait_for(lambda: manifest in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0


@pytest.mark.parametrize("command", ["status", "flush", "run", "restore", "prune"])
@pytest.mark.parametrize("below", ["", "state"])
def test_cli_state_dir_that_is_a_file(workspace: Workspace, command: str, below: str) -> None:
    """A file where the state directory (or one of its parents) should be is a config error
    for every verb that uses it: exit 2, which the systemd unit does not restart on. Old: the
    ledger's or mkdir's errno text and exit 1, and `status` said "not running" (exit 0)."""
    blocker = workspace.root / "not-a-dir"
    blocker.write_bytes(b"x")
    workspace.write_config(state={"dir": str(blocker / below)})
    args = ["--dry-run", "--keep-sets", "1"] if command == "prune" else []
    assert_usage_error(workspace.cli(command, "-c", "config.yaml", *args, timeout=20),
                       f"config key 'state.dir' ({blocker / below}) is not a directory")


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("case", ["directory", "below a file"])
def test_cli_notice_file_that_is_a_directory_or_below_a_file(
        workspace: Workspace, command: str, case: str) -> None:
    """hooks.notice_file naming a directory (`/run/spotwatch` for `/run/spotwatch/notice.json`)
    or a path below a file: the trainer would never be told of a notice. Old: `run` started
    healthy with a warning in its log."""
    if case == "directory":
        notice_file = workspace.root / "notices"
        notice_file.mkdir()
        why = (f"config key 'hooks.notice_file' ({notice_file}) is a directory: name the file "
               f"to write, such as {notice_file / 'notice.json'}")
    else:
        blocker = workspace.root / "not-a-dir"
        blocker.write_bytes(b"x")
        notice_file = blocker / "notice.json"
        why = (f"config key 'hooks.notice_file' ({notice_file}) cannot be made: {blocker} is "
               "not a directory")
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    assert_usage_error(workspace.cli(command, "-c", "config.yaml", timeout=20), why)


# -- numbers written as text, and none written as text --------------------------------------


def load_text(text: str) -> Any:
    """A config from text in a directory of its own (hypothesis runs a test many times)."""
    with tempfile.TemporaryDirectory() as directory:
        return load_config(write(Path(directory), "watch: [{path: x}]\n" + text))


NUMBER_KEYS = [("imds", "poll_interval", 0.1, MAX_SECONDS), ("job", "peer_poll_interval", 0.05,
               MAX_SECONDS), ("transfer", "target_throughput", 0.001, MAX_TARGET_THROUGHPUT_GBPS),
               ("sync", "stop_timeout", 0.001, MAX_SECONDS)]


def _as_text(number: float, spelling: str) -> str:
    return {"repr": repr(number), "exponent": f"{number:e}", "no dot": f"{number:.0e}",
            "padded": f" {number} "}[spelling]


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(NUMBER_KEYS), fraction=st.floats(0, 1),
       spelling=st.sampled_from(["repr", "exponent", "no dot", "padded"]),
       quoted=st.booleans())
def test_a_number_written_as_text_is_that_number(key: tuple[str, str, float, float],
                                                 fraction: float, spelling: str,
                                                 quoted: bool) -> None:
    section, name, low, high = key
    text = _as_text(low + (high - low) * fraction, spelling)
    expected = float(text)
    if not low <= expected <= high:  # rounded by the spelling past a bound
        return
    value = f'"{text}"' if quoted else text
    job = "id: j, nodes: 1, " if section == "job" else ""  # peer_poll_interval needs a job
    config = load_text(f"{section}: {{{job}{name}: {value}}}\n")
    assert getattr(getattr(config, section), name) == expected


@pytest.mark.parametrize("text", ['"1e-1"', "1e-1", '"0.5"', "'5'", '"+2.5E+0"', '".5"'])
def test_yaml_number_texts_are_taken_as_numbers(text: str) -> None:
    config = load_text(f"imds: {{poll_interval: {text}}}\n")
    assert config.imds.poll_interval == float(text.strip("'\""))


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12))
def test_text_that_is_no_plain_number_is_refused_in_one_line(text: str) -> None:
    try:
        number = float(text)
    except ValueError:
        number = None
    plain = number is not None and math.isfinite(number) and "_" not in text \
        and not any(word in text.lower() for word in ("inf", "nan"))
    if plain:
        return
    with pytest.raises(ConfigError) as raised:
        load_text(yaml.safe_dump({"imds": {"poll_interval": text}}))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("config key 'imds.poll_interval' must be")


@pytest.mark.parametrize(("text", "problem"), [
    ('"1e999"', "must be a finite number"), ('"inf"', "must be a number"),
    ('".nan"', "must be a number"), ('"1_000"', "must be a number"),
    ('"0.01"', "must be from 0.1 to 86400 seconds"), ('"-1"', "must be from 0.1"),
])
def test_number_texts_keep_the_keys_range(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, f"watch: [{{path: x}}]\nimds: {{poll_interval: {text}}}\n"))
    assert f"'imds.poll_interval' {problem}" in str(raised.value)


@settings(max_examples=40, deadline=None)
@given(word=st.sampled_from(["none", "null"]).flatmap(
    lambda word: st.tuples(*(st.sampled_from([c, c.upper()]) for c in word)).map("".join)),
    quote=st.sampled_from(['"', "'"]))
def test_none_and_null_as_text_are_none_in_any_case(word: str, quote: str) -> None:
    config = load_text(f"sync: {{continuous_bandwidth: {quote}{word}{quote}}}\n"
                       f"transfer: {{sse: {quote}{word}{quote}, "
                       f"target_throughput: {quote}{word}{quote}}}\n")
    assert config.sync.continuous_bandwidth is None
    assert config.transfer.sse == "none"
    assert config.transfer.target_throughput is None


@pytest.mark.parametrize("value", ["true", "[1]", "{a: 1}"])
def test_a_number_key_given_another_type_is_told_it_takes_a_number(value: str) -> None:
    """Not "integer or number or string": most text is refused there too."""
    with pytest.raises(ConfigError, match=r"'imds.poll_interval' must be a number, got "):
        load_text(f"imds: {{poll_interval: {value}}}\n")


# -- metrics.address -------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1",
                                     "2001:db8::8a2e:370:7334", "localhost", "metrics.internal",
                                     "ip-10-0-0-1.ec2.internal", "host-1.", "a" * 63])
def test_a_metrics_address_that_is_an_ip_or_host_name_is_taken(address: str) -> None:
    assert load_text(f"metrics: {{address: '{address}'}}\n").metrics.address == address


@settings(max_examples=50, deadline=None)
@given(address=st.ip_addresses())
def test_every_ip_literal_is_a_metrics_address(address: Any) -> None:
    assert load_text(f"metrics: {{address: '{address}'}}\n").metrics.address == str(address)


@pytest.mark.parametrize("address", ["not an address!", "999.1.1.1", "1.2.3", "127.0.0.1:9100",
                                     "[::1]", " 127.0.0.1", "localhost ", "host\tname",
                                     "-host", "host-", "a..b", "http://localhost", "a" * 64,
                                     ".".join(["a" * 60] * 5)])
def test_a_metrics_address_that_is_neither_is_refused(address: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_text(f"metrics: {{address: {json.dumps(address)}}}\n")
    message = str(raised.value)
    assert message.startswith("config key 'metrics.address' ") and "\n" not in message


def test_an_empty_metrics_address_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load_text("metrics: {address: ''}\n")
    assert str(raised.value) == "config key 'metrics.address' must not be empty"
