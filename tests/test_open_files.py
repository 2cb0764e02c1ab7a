"""A restore fits the open-files limit: the soft one is raised to the hard one at start, and
where even that is low, the restore keeps fewer connections instead of failing.

On a p4d or p5 (the CRT's 400 Gbit/s target) a restore of many small files keeps about a
thousand connections open; under the soft limit of a login shell or systemd (1,024) it failed
with AWS_ERROR_MAX_FDS_EXCEEDED."""

from __future__ import annotations

import math
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
    CRT_MIN_OPEN_FILES,
    FDS_PER_WORKER,
    GBPS_PER_CONNECTION,
    crt_connections,
    descriptors_held_back,
    for_restore,
    make_store,
    within_open_files,
)
from spotwatch.config import MAX_CONCURRENCY, TransferSettings
from spotwatch.limits import MOST_OPEN_FILES

from .conftest import Workspace
from .test_restore_connections import small_files

# The instance type's target on a p4d or p5: about 1,000 CRT connections.
P4D_TARGET_GBPS = 400.0
# Open files: far fewer than a restore of 400 files on that target would use.
LOW = descriptors_held_back() + 64


def limited(soft: int, hard: int | None = None) -> Callable[[], None]:
    """For preexec_fn: the child starts with these limits on open files (hard: as it is)."""
    def apply() -> None:
        current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, current_hard if hard is None else hard))
    return apply


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= LOW,
                    reason="the hard limit leaves nothing to raise to")
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


def _fds_used(settings: TransferSettings, crt: bool = True) -> int:
    """What a store with these settings may hold open at most (within_open_files)."""
    connections = crt_connections(settings) if crt else 0
    return 2 * connections + FDS_PER_WORKER * settings.max_concurrency + descriptors_held_back()


@given(spare=st.integers(min_value=8, max_value=MOST_OPEN_FILES),
       target=st.floats(min_value=0.01, max_value=800.0),
       workers=st.integers(min_value=1, max_value=MAX_CONCURRENCY),
       crt=st.booleans())
def test_a_store_s_connections_fit_the_open_files_limit(
        spare: int, target: float, workers: int, crt: bool) -> None:
    open_files = descriptors_held_back() + spare
    settings = TransferSettings(target_throughput=target, max_concurrency=workers)
    fitted = within_open_files(settings, open_files, crt=crt)
    if _fds_used(settings, crt) <= open_files:
        assert fitted == settings  # nothing taken away where it fits
    else:
        assert _fds_used(fitted, crt) <= open_files
        assert fitted.max_concurrency <= workers
        assert crt_connections(fitted) <= crt_connections(settings)
        # The CRT rounds its connections up: the fitted target never takes one more.
        assert fitted.target_throughput is not None
        assert (not crt or math.ceil(fitted.target_throughput / GBPS_PER_CONNECTION)
                <= (open_files - descriptors_held_back()
                    - FDS_PER_WORKER * fitted.max_concurrency) // 2)


@pytest.mark.parametrize("hard", [None, LOW, 512],
                         ids=["soft-limit-low", "hard-limit-low", "hard-limit-512"])
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
    # Cut only where even the hard limit is too low, and then said.
    machine_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = hard if hard is not None else min(machine_hard, MOST_OPEN_FILES)
    needed = _fds_used(for_restore(TransferSettings(target_throughput=P4D_TARGET_GBPS)))
    assert ("open_files_limit_low" in restored.stderr) == (limit < needed)
    for name, data in written.items():
        assert (tmp_path / "back" / name).read_bytes() == data


@pytest.mark.parametrize("client", ["crt", "auto"])
def test_under_too_few_open_files_for_the_crt_flush_and_restore_take_the_classic_client(
        workspace: Workspace, tmp_path: Path, client: str) -> None:
    """A hard limit of 24 open files: the CRT failed every restore with
    AWS_ERROR_MAX_FDS_EXCEEDED; the classic client with one worker fits, and it is said."""
    written = small_files(workspace.checkpoints)
    workspace.write_config(transfer={"client": client})
    low = CRT_MIN_OPEN_FILES - 40
    done = [subprocess.run(
        [sys.executable, "-m", "spotwatch.cli", *command], cwd=workspace.root,
        env=workspace.env(), capture_output=True, text=True, timeout=120,
        preexec_fn=limited(low, low))
        for command in (["flush"], ["restore", "--to", str(tmp_path / "back")])]
    assert [run.returncode for run in done] == [0, 0], [run.stderr[-2000:] for run in done]
    for name, data in written.items():
        assert (tmp_path / "back" / name).read_bytes() == data
    assert all("the CRT needs at least" in run.stderr for run in done)
    # Said once per command, with what the limit left.
    assert [run.stderr.count("open_files_limit_low") for run in done] == [1, 1]


def test_the_crt_store_of_a_daemon_keeps_its_connections_within_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spotwatch.aws.crt_store.open_files_limit", lambda: LOW)
    settings = TransferSettings(client="crt", target_throughput=P4D_TARGET_GBPS)
    assert _fds_used(settings) > LOW
    client = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                          aws_access_key_id="k", aws_secret_access_key="s")
    store = make_store(client, "bucket", settings)
    try:
        assert (2 * store.downloads_at_once + FDS_PER_WORKER * store.max_concurrency
                + descriptors_held_back() <= LOW)
    finally:
        store.close()
