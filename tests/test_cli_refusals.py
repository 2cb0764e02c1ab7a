"""The CLI's contract at its edges: `check` refuses what `run` refuses at start, an output
that cannot be written is one line and an exit code (never a traceback), poll intervals have
a floor, `none` and `null` mean the same, and a config from a pipe is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotwatch.config import load_config
from spotwatch.errors import ConfigError

from .conftest import Workspace
from .test_config import assert_usage_error, cli_unprivileged, needs_setpriv

# -- check refuses what run refuses ---------------------------------------------------------


def refused_alike(workspace: Workspace, fragment: str) -> None:
    """`check` gives the very line and exit code `run` gives (which refuses at start)."""
    checked = workspace.cli("check", "-c", "config.yaml")
    assert_usage_error(checked, fragment)
    ran = workspace.cli("run", "-c", "config.yaml")
    assert (ran.returncode, ran.stderr) == (checked.returncode, checked.stderr)


@pytest.mark.parametrize("kind", ["file", "device", "fifo", "under a file"])
def test_check_refuses_a_watch_path_that_is_no_directory_as_run_does(
        workspace: Workspace, kind: str) -> None:
    a_file = workspace.root / "afile"
    a_file.write_text("x")
    fifo = workspace.root / "fifo"
    os.mkfifo(fifo)
    path = {"file": a_file, "device": Path("/dev/null"), "fifo": fifo,
            "under a file": a_file / "sub"}[kind]
    workspace.write_config(watch=[{"path": str(path), "prefix": "run1/"}])
    refused_alike(workspace, f"watch directory is not a directory: {path}"
                  if kind != "under a file" else f"watch directory {path}: Not a directory")


def test_check_refuses_a_job_node_without_a_rank_as_run_does(workspace: Workspace) -> None:
    workspace.write_config(job={"id": "j1", "nodes": 2})
    refused_alike(workspace, "job.rank is not set")


@needs_setpriv
def test_check_fails_on_a_watched_directory_this_user_cannot_read(workspace: Workspace) -> None:
    closed = workspace.checkpoints / "closed"
    closed.mkdir()
    workspace.write_config(watch=[{"path": str(closed), "prefix": "run1/"}])
    closed.chmod(0o000)
    try:
        result = cli_unprivileged(workspace, "check", "-c", "config.yaml")
    finally:
        closed.chmod(0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and f"{closed}: cannot read it: Permission denied" in failed[0]
    assert "Traceback" not in result.stderr


# -- output that cannot be written -----------------------------------------------------------


def cli_with(workspace: Workspace, redirect: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a shell redirection applied to it (`>&-`, `2>/dev/full`); the other
    stream captured."""
    return subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m",
                           "spotwatch.cli", *args], cwd=workspace.root, env=workspace.env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
@pytest.mark.parametrize("args", [("status", "-c", "config.yaml"), ("--version",),
                                  ("--help",), ("run", "--help"),
                                  ("check", "-c", "config.yaml"),
                                  ("iam-policy", "-c", "config.yaml")], ids=" ".join)
def test_an_output_that_cannot_be_written_fails_in_one_line(
        workspace: Workspace, redirect: str, args: tuple[str, ...]) -> None:
    result = cli_with(workspace, redirect, *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("spotwatch: error: cannot write the output: ")
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full", ">&- 2>&-", ">/dev/full 2>&-"])
def test_a_config_or_usage_error_exits_2_whatever_stderr_is(workspace: Workspace,
                                                            redirect: str) -> None:
    for args in (("check", "-c", "nope.yaml"), ("no-such-command",)):
        result = cli_with(workspace, redirect, *args)
        assert result.returncode == 2, args
        assert result.stdout == "" and result.stderr == ""


# -- poll interval floors --------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("watch: [{path: x}]\n" + text)
    return path


@pytest.mark.parametrize(("text", "floor"), [
    ("imds: {poll_interval: 0.000001}\n", "'imds.poll_interval' must be from 0.1 to"),
    ("imds: {poll_interval: 0.09}\n", "'imds.poll_interval' must be from 0.1 to"),
    ("job: {id: j, nodes: 2, rank: 0, peer_poll_interval: 0.000001}\n",
     "'job.peer_poll_interval' must be from 0.05 to"),
])
def test_a_poll_interval_below_its_floor_is_refused(tmp_path: Path, text: str,
                                                    floor: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert floor in str(raised.value) and "\n" not in str(raised.value)
    # The floor itself is allowed.
    config = load_config(write(tmp_path, "imds: {poll_interval: 0.1}\n"
                               "job: {id: j, nodes: 2, rank: 0, peer_poll_interval: 0.05}\n"))
    assert (config.imds.poll_interval, config.job.peer_poll_interval) == (0.1, 0.05)


def test_check_refuses_a_poll_interval_below_the_floor(workspace: Workspace) -> None:
    workspace.write_config(imds={"poll_interval": 0.000001})
    assert_usage_error(workspace.cli("check", "-c", "config.yaml"),
                       "'imds.poll_interval' must be from 0.1 to 86400 seconds")


# -- none and null; a config that is not a regular file; prune's hint -----------------------


@pytest.mark.parametrize("spelling", ["none", "None", "null", "~"])
def test_none_and_null_are_one_value_for_bandwidth_and_sse(tmp_path: Path,
                                                          spelling: str) -> None:
    config = load_config(write(tmp_path, f"sync: {{continuous_bandwidth: {spelling}}}\n"
                                         f"transfer: {{sse: {spelling.lower()}}}\n"))
    assert config.sync.continuous_bandwidth is None
    assert config.transfer.sse == "none"


def test_a_config_from_a_pipe_is_read(workspace: Workspace) -> None:
    """`-c <(envsubst < template)`: /dev/fd/N is a pipe, not a regular file."""
    reader, writer = os.pipe()
    os.write(writer, workspace.config_file.read_bytes())
    os.close(writer)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "spotwatch.cli", "iam-policy", "-c", f"/dev/fd/{reader}"],
            cwd=workspace.root, env=workspace.env(), capture_output=True, text=True,
            timeout=60, pass_fds=(reader,))
    finally:
        os.close(reader)
    assert result.returncode == 0, result.stderr
    assert '"Statement"' in result.stdout


def test_prune_keep_sets_0_is_not_told_to_pass_keep_sets(workspace: Workspace) -> None:
    result: Any = workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "0")
    assert_usage_error(result, "nothing to prune: --keep-sets 0 keeps every set")
    assert "--keep-sets)" not in result.stderr


# -- a region from the environment is held to what aws.region takes -------------------------

# AWS's own S3: no endpoint of another store named (the tests' moto is one).
AWS_S3 = {"AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": ""}


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
@pytest.mark.parametrize("region", ["x", "US-EAST-1", "us east 1", "x" * 300, "../x",
                                    "us-east-1\n"], ids=lambda r: repr(r[:12]))
def test_check_refuses_a_region_from_the_environment_that_is_none(
        workspace: Workspace, variable: str, region: str) -> None:
    workspace.write_config(aws={"region": None})
    env = {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", variable: region, **AWS_S3}
    result = workspace.cli("check", "-c", "config.yaml", **env)
    assert_usage_error(result, f"{variable} ")
    assert repr(region)[:20] in result.stderr


@pytest.mark.parametrize("command", ["run", "flush", "restore"])
def test_every_command_that_needs_a_region_refuses_one_from_the_environment(
        workspace: Workspace, command: str) -> None:
    """'x' is a region botocore takes, and then sends requests to s3.x.amazonaws.com."""
    workspace.write_config(aws={"region": None})
    assert_usage_error(workspace.cli(command, "-c", "config.yaml", AWS_REGION="x", **AWS_S3),
                       "AWS_REGION is not an AWS region name: 'x'")


def test_a_store_of_its_own_names_its_region_as_it_likes(workspace: Workspace) -> None:
    """With an S3 endpoint of its own named (as the tests' moto is), a region AWS would not
    take is the store's own (Garage's "garage"): not refused as no region name."""
    workspace.write_config(aws={"region": None})
    result = workspace.cli("check", "-c", "config.yaml", AWS_REGION="garage",
                           AWS_DEFAULT_REGION="")
    assert "not an AWS region name" not in result.stderr, result.stderr
    assert "configured region is garage" in result.stdout, result.stdout


# -- metrics.address -------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:9100", "999.1.1.1", "not an address!"])
def test_check_refuses_a_metrics_address_as_run_does(workspace: Workspace, address: str) -> None:
    workspace.write_config(metrics={"address": address})
    refused_alike(workspace, f"config key 'metrics.address' must be an IP address (IPv6 without "
                  f"brackets) or a host name, without a port, got {address!r}")


# -- a state directory on a kernel file system ----------------------------------------------


@pytest.mark.parametrize(("state_dir", "fs_type"), [
    ("/proc/self/x", "proc"), ("/proc/x", "proc"), ("/proc", "proc"),
    ("/sys/kernel/x", "sysfs"), ("/sys/x", "sysfs")])
def test_check_refuses_a_state_dir_on_a_kernel_file_system_as_run_does(
        workspace: Workspace, state_dir: str, fs_type: str) -> None:
    if not Path(state_dir).parent.exists():
        pytest.skip(f"no {Path(state_dir).parent} here")
    workspace.write_config(state={"dir": state_dir})
    refused_alike(workspace, f"config key 'state.dir' ({state_dir}) is on a {fs_type} file "
                  "system")


def test_a_state_dir_on_a_disk_is_not_taken_for_a_kernel_one(tmp_path: Path) -> None:
    """A directory named proc on a disk is not /proc."""
    path = write(tmp_path, f"state: {{dir: {tmp_path / 'proc' / 'x'}}}\n")
    assert load_config(path).state_dir == tmp_path / "proc" / "x"
