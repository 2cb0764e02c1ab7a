"""A restore fits the open-files limit: the soft one is raised to the hard one at start, and
where even that is low, the restore keeps fewer connections instead of failing.

On a p4d or p5 (the CRT's 400 Gbit/s target) a restore of many small files keeps about a
thousand connections open; under the soft limit of a login shell or systemd (1,024) it failed
with AWS_ERROR_MAX_FDS_EXCEEDED."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.aws.crt_store import (
    FDS_HELD_BACK,
    crt_connections,
    make_store,
    within_open_files,
)
from spotwatch.config import MAX_CONCURRENCY, TransferSettings
from spotwatch.limits import MOST_OPEN_FILES

from .conftest import Workspace
from .test_restore_connections import small_files

# The instance type's target on a p4d or p5: about 1,000 CRT connections.
P4D_TARGET_GBPS = 400.0
LOW = 192  # open files: far fewer than a restore of 400 files on that target would use


def limited(soft: int, hard: int | None = None) -> Callable[[], None]:
    """For preexec_fn: the child starts with these limits on open files (hard: as it is)."""
    def apply() -> None:
        current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, current_hard if hard is None else hard))
    return apply


def test_every_command_raises_the_soft_limit_to_the_hard_one() -> None:
    probe = ("import resource; from spotwatch.limits import raise_open_files_limit; "
             "raised = raise_open_files_limit(); "
             "print(raised, *resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          preexec_fn=limited(LOW), check=True)
    raised, soft, hard = (int(n) for n in done.stdout.split())
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MOST_OPEN_FILES)
    assert soft == raised == wanted > LOW


def test_a_soft_limit_already_at_the_hard_one_is_left_as_it_is() -> None:
    probe = ("import resource; from spotwatch.limits import raise_open_files_limit; "
             "print(raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          preexec_fn=limited(LOW, LOW), check=True)
    assert [int(n) for n in done.stdout.split()] == [LOW, LOW, LOW]


def _fds_used(settings: TransferSettings) -> int:
    """What a restore with these settings may hold open at most (within_open_files)."""
    return 2 * crt_connections(settings) + 2 * settings.max_concurrency + FDS_HELD_BACK


@given(open_files=st.integers(min_value=FDS_HELD_BACK + 8, max_value=MOST_OPEN_FILES),
       target=st.floats(min_value=0.4, max_value=800.0),
       workers=st.integers(min_value=1, max_value=MAX_CONCURRENCY))
def test_a_restore_s_connections_fit_the_open_files_limit(
        open_files: int, target: float, workers: int) -> None:
    settings = TransferSettings(target_throughput=target, max_concurrency=workers)
    fitted = within_open_files(settings, open_files)
    if _fds_used(settings) <= open_files:
        assert fitted == settings  # nothing taken away where it fits
    else:
        assert _fds_used(fitted) <= open_files
        assert fitted.max_concurrency <= workers
        assert crt_connections(fitted) <= crt_connections(settings)


@pytest.mark.parametrize("hard", [None, LOW], ids=["soft-limit-low", "hard-limit-low"])
def test_a_restore_on_a_p4d_target_succeeds_under_a_low_open_files_limit(
        workspace: Workspace, tmp_path: Path, hard: int | None) -> None:
    written = small_files(workspace.checkpoints)
    workspace.write_config(transfer={"client": "crt", "target_throughput": P4D_TARGET_GBPS})
    flushed = workspace.cli("flush")
    assert flushed.returncode == 0, flushed.stderr
    restored = subprocess.run(
        [sys.executable, "-m", "spotwatch.cli", "restore", "--to", str(tmp_path / "back")],
        cwd=workspace.root, env=workspace.env(), capture_output=True, text=True, timeout=120,
        preexec_fn=limited(LOW, hard))
    assert restored.returncode == 0, restored.stderr
    for name, data in written.items():
        assert (tmp_path / "back" / name).read_bytes() == data


def test_the_limit_raised_is_what_the_trainer_s_hooks_inherit_too() -> None:
    # Documented behaviour, as under systemd's LimitNOFILE: a child sees the raised limit.
    probe = ("import resource, subprocess, sys; from spotwatch.limits import "
             "raise_open_files_limit; raise_open_files_limit(); print(subprocess.run("
             "[sys.executable, '-c', 'import resource; print(resource.getrlimit("
             "resource.RLIMIT_NOFILE)[0])'], capture_output=True, text=True).stdout.strip(), "
             "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          preexec_fn=limited(LOW), check=True, env=dict(os.environ))
    child, parent = done.stdout.split()
    assert child == parent


def test_the_crt_store_of_a_daemon_keeps_its_connections_within_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spotwatch.aws.crt_store.open_files_limit", lambda: LOW)
    settings = TransferSettings(client="crt", target_throughput=P4D_TARGET_GBPS)
    assert _fds_used(settings) > LOW
    client = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                          aws_access_key_id="k", aws_secret_access_key="s")
    store = make_store(client, "bucket", settings)
    try:
        assert 2 * store.downloads_at_once + 2 * store.max_concurrency + FDS_HELD_BACK <= LOW
    finally:
        store.close()
