"""The `job` section: a multi-node job's id, node count and this node's rank, with the
launchers' environment variables as fallbacks, and single-node configs left exactly as before."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.config import JOB_ENVIRONMENT, load_config
from spotwatch.errors import ConfigError

from .conftest import Workspace

LAUNCHER_VARIABLES = sorted({v for names in JOB_ENVIRONMENT.values() for v in names})


@pytest.fixture(autouse=True)
def _no_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def write(tmp_path: Path, job: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("watch:\n  - path: ckpt\n" + job)
    return path


def test_without_a_job_section_a_single_node(tmp_path: Path) -> None:
    job = load_config(write(tmp_path)).job
    assert (job.id, job.nodes, job.rank, job.is_multi_node) == (None, None, None, False)


def test_launcher_variables_alone_do_not_make_a_job(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # spotwatch started inside a single-node SLURM allocation stays a single node.
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NODEID", "2")
    assert not load_config(write(tmp_path)).job.is_multi_node


def test_job_from_the_file(tmp_path: Path) -> None:
    job = load_config(write(tmp_path, "job: {id: llama-70b, nodes: 4, rank: 3}\n")).job
    assert (job.id, job.nodes, job.rank, job.is_multi_node) == ("llama-70b", 4, 3, True)


@pytest.mark.parametrize("variable", JOB_ENVIRONMENT["rank"])
def test_rank_from_each_launcher_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          variable: str) -> None:
    monkeypatch.setenv(variable, "2")
    assert load_config(write(tmp_path, "job: {id: j, nodes: 3}\n")).job.rank == 2


def test_rank_variables_in_order_and_the_file_first(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("GROUP_RANK", "2")
    assert load_config(write(tmp_path, "job: {id: j, nodes: 4}\n")).job.rank == 2
    assert load_config(write(tmp_path, "job: {id: j, nodes: 4, rank: 2}\n")).job.rank == 2


@pytest.mark.parametrize(("job", "environment", "message"), [
    # A file copied from node 0 onto node 2: both nodes would seal rank 0's part.
    ("job: {id: j, nodes: 4, rank: 0}\n", {"SLURM_NODEID": "2"},
     "job.rank is 0 in the config file but SLURM_NODEID=2"),
    ("job: {id: j, nodes: 4, rank: 1}\n", {"SPOTWATCH_NODE_RANK": " 3 "},
     "job.rank is 1 in the config file but SPOTWATCH_NODE_RANK=3"),
    # Launched again on 3 nodes with the file of the 4-node launch: no set would ever complete.
    ("job: {id: j, nodes: 4}\n", {"SLURM_NNODES": "3", "SLURM_NODEID": "0"},
     "job.nodes is 4 in the config file but SLURM_NNODES=3"),
])
def test_the_file_and_the_launcher_must_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              job: str, environment: dict[str, str],
                                              message: str) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, job))


def test_a_disagreeing_launcher_is_one_line_and_exit_2(workspace: Workspace) -> None:
    workspace.write_config(job={"id": "j", "nodes": 2, "rank": 0})
    result = workspace.cli("run", "-c", "config.yaml", SLURM_NODEID="1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "SLURM_NODEID=1" in result.stderr, \
        result.stderr


def test_whole_job_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTWATCH_JOB_ID", "run-7")
    monkeypatch.setenv("SLURM_NNODES", "8")
    monkeypatch.setenv("SLURM_NODEID", "5")
    job = load_config(write(tmp_path)).job
    assert (job.id, job.nodes, job.rank) == ("run-7", 8, 5)


@pytest.mark.parametrize(("job", "environment", "message"), [
    ("job: {id: j}\n", {}, "job.nodes"),
    ("job: {nodes: 2, rank: 0}\n", {}, "needs 'job.id'"),
    ("job: {id: j, nodes: 2, rank: 2}\n", {}, "must be below job.nodes (2)"),
    ("job: {id: j, nodes: 0}\n", {}, "job.nodes"),
    ("job: {id: 'a/b', nodes: 2}\n", {}, "job.id"),
    ("job: {id: '', nodes: 2}\n", {}, "job.id"),
    ("job: {id: j, nodes: 2}\n", {"GROUP_RANK": "two"}, "GROUP_RANK='two'"),
    ("job: {id: j, nodes: 2}\n", {"GROUP_RANK": "5"}, "must be below job.nodes"),
    ("job: {id: j}\n", {"SLURM_NNODES": "-1"},
     "SLURM_NNODES='-1' from the environment is not a whole number from 0 to 999999999"),
    ("job: [1]\n", {}, "job"),
])
def test_bad_jobs_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str,
                               environment: dict[str, str], message: str) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refusal:
        load_config(write(tmp_path, job))
    assert message in str(refusal.value)
    assert "\n" not in str(refusal.value)


@given(st.dictionaries(st.sampled_from(LAUNCHER_VARIABLES), st.text(max_size=12), max_size=6))
def test_any_environment_loads_or_is_refused_in_one_line(environment: dict[str, str]) -> None:
    saved = {v: os.environ.pop(v, None) for v in LAUNCHER_VARIABLES}
    try:
        for variable, value in environment.items():
            if "\x00" not in value:
                os.environ[variable] = value
        with tempfile.TemporaryDirectory() as directory:
            try:
                job = load_config(write(Path(directory))).job
            except ConfigError as refusal:
                assert "\n" not in str(refusal)
            else:
                if job.id is not None and job.rank is not None:
                    assert job.nodes is not None and 0 <= job.rank < job.nodes
    finally:
        for variable, value in saved.items():
            os.environ.pop(variable, None)
            if value is not None:
                os.environ[variable] = value


def test_run_without_a_rank_is_a_usage_error(workspace: Workspace) -> None:
    workspace.write_config(job={"id": "j", "nodes": 2})
    result = workspace.cli("run", "-c", "config.yaml", SPOTWATCH_NODE_RANK="", GROUP_RANK="",
                           NODE_RANK="", SLURM_NODEID="")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "job.rank is not set" in result.stderr
