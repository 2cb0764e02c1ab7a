"""Every line the CLI prints for a human (errors, summaries, status and check lines, the
readable log) stays one line whatever names it holds: control characters are escaped."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.commands.status import render_status
from spotwatch.logs import configure_logging

from .conftest import Workspace
from .test_checkpoint_sets import restore

SRC = Path(__file__).resolve().parent.parent / "src" / "spotwatch"


def test_control_characters_are_escaped_and_other_text_is_kept() -> None:
    from spotwatch.console import one_line  # here: the other tests also run on older code

    text = "a\nb\rc\td\x1b[31me\x7ff\x85g\u2028h\udcffi\u00e9\u4e2d"
    assert one_line(text) == "a\\nb\\rc\\td\\x1b[31me\\x7ff\\x85g\\u2028h\\xffi\u00e9\u4e2d"
    assert one_line(os.fsdecode(b"step_1/\xff\n")) == "step_1/\\xff\\n"


def test_restore_error_and_summary_name_a_path_with_a_newline_on_one_line(
        workspace: Workspace) -> None:
    (workspace.checkpoints / "step_1").mkdir()
    (workspace.checkpoints / "step_1" / "a").write_bytes(b"x")
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    a_file = workspace.root / "f\nile"
    a_file.touch()
    refused = restore(workspace, "--to", str(a_file))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.endswith("\n")
    assert f"{workspace.root}/f\\nile is not a directory" in refused.stderr
    restored = restore(workspace, "--to", str(workspace.root / "new\ndir"))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == (f"restored step_1 into {workspace.root}/new\\ndir: 1 files "
                               f"downloaded (0.0 MiB), 0 already present\n")


def test_flush_names_a_failing_file_with_a_newline_on_one_line(workspace: Workspace) -> None:
    (workspace.checkpoints / "step_1").mkdir()
    (workspace.checkpoints / "step_1" / "new\nline").write_bytes(b"y")  # moto refuses the key
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 1
    errors = [line for line in flushed.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"spotwatch: error: the flush left 1 failing files: "
                      f"{workspace.checkpoints}/step_1/new\\nline (the first failed with: An "
                      "error occurred (404) when calling the PutObject operation: Not Found)"]


def test_status_lines_stay_lines() -> None:
    report: dict[str, Any] = {
        "bucket": "b", "daemon_pid": 7, "uploaded_objects": 0, "uploaded_bytes": 0,
        "last_upload_at": None,
        "daemon": {"pending_files": 0, "pending_bytes": 0, "uploading": 0,
                   "unsettled_files": 0, "unreadable_dirs": ["/ck/a\nb"],
                   "incomplete_sets": ["step\r1"]}}
    lines = render_status(report).splitlines()
    assert any(line.endswith("/ck/a\\nb") for line in lines)
    assert any(line.endswith("step\\r1") for line in lines)


def test_the_readable_log_keeps_a_librarys_message_on_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    try:
        logging.getLogger("botocore.test").warning("first\nsecond")
    finally:
        configure_logging("info", "json")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "first\\nsecond" in err


def test_the_cli_prints_for_a_human_only_through_spotwatch_console() -> None:
    """The one place lines are made one line: a print() elsewhere in the commands would skip
    it (demo prints only its own text; JSON output escapes by itself)."""
    modules = [SRC / "cli.py", *sorted((SRC / "commands").glob("*.py"))]
    bare = []
    for module in modules:
        if module.name == "demo.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print"):
                first = node.args[0] if node.args else None
                through = (isinstance(first, ast.Call) and isinstance(first.func, ast.Name)
                           and first.func.id in ("one_line", "render_status"))
                json_out = isinstance(first, ast.IfExp) or (
                    isinstance(first, ast.Call) and ast.unparse(first.func) == "json.dumps")
                version = isinstance(first, ast.JoinedStr) and "__version__" in ast.unparse(first)
                if not (through or json_out or version):
                    bare.append(f"{module.name}:{node.lineno}")
    assert bare == []


@pytest.mark.parametrize("command", [["iam-policy"], ["status"]])
def test_output_into_a_closed_pipe_ends_quietly(workspace: Workspace, command: list[str]) -> None:
    """`spotwatch status | head -1`: the reader gone, the command ends as SIGPIPE would end it
    (128 + 13), without a traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first line is written
    env = {k: v for k, v in workspace.env().items() if k != "PYTHONUNBUFFERED"}
    try:
        for unbuffered in ({}, {"PYTHONUNBUFFERED": "1"}):  # written at once, or at the end
            ended = subprocess.run(
                [sys.executable, "-m", "spotwatch.cli", *command, "-c", "config.yaml"],
                cwd=workspace.root, env={**env, **unbuffered}, stdout=writer,
                stderr=subprocess.PIPE, text=True, timeout=60)
            assert (ended.returncode, ended.stderr) == (141, ""), unbuffered
    finally:
        os.close(writer)


def test_everything_a_flush_left_undone_is_one_error_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    from spotwatch.commands.flush import report_left_behind

    record = {"failed": 1, "failed_files": ["/c/step_1/a.pt"],
              "still_written": 1, "still_written_files": ["/c/step_2/log.txt"],
              "unreadable_dirs": ["/c/step_3"], "refused_files": [], "missing_dirs": ["/d"]}
    assert report_left_behind(record, "the flush") == 1
    assert capsys.readouterr().err == (
        "spotwatch: error: the flush left 1 failing files: /c/step_1/a.pt; 1 watched "
        "directories not there (not made or mounted yet): /d; 1 directories spotwatch may not "
        "read, their files not uploaded: /c/step_3; the flush stopped waiting for 1 files still "
        "being written: /c/step_2/log.txt\n")
    assert report_left_behind({"failed": 0}, "the flush") == 0
    assert capsys.readouterr().err == ""
    # A daemon's stop that cut the flush short: the files it had left are not durable.
    cut_short = {"reason": "shutdown", "failed": 0, "timed_out": True, "pending_files": 4}
    assert report_left_behind(cut_short, "the daemon's flush") == 1
    assert capsys.readouterr().err == (
        "spotwatch: error: the daemon's flush was cut short by the daemon's stop "
        "(sync.stop_timeout) with 4 files not yet durable in S3\n")
    # A flush of its own that reached its time limit with uploads S3 never answered.
    overdue = {"reason": "manual", "failed": 0, "timed_out": True, "pending_files": 2}
    assert report_left_behind(overdue, "the daemon's flush") == 1
    assert capsys.readouterr().err == (
        "spotwatch: error: the daemon's flush reached its time limit (a notice's deadline, else "
        "sync.stop_timeout from its start) with 2 files not yet durable in S3 (still uploading: "
        "is S3 answering?)\n")


def _split_names(text: str) -> list[str]:
    """The names a comma-separated list holds, read back as a reader would: a quoted one
    runs to its closing quote (a backslash escapes the next character)."""
    found: list[str] = []
    at = 0
    while True:
        if text.startswith("'", at):
            name, at = [], at + 1
            while text[at] != "'":
                if text[at] == "\\":
                    at += 1
                name.append(text[at])
                at += 1
            found.append("".join(name))
            at += 1
        else:
            end = text.find(", ", at)
            found.append(text[at:] if end < 0 else text[at:end])
            at = len(text) if end < 0 else end
        if at >= len(text):
            return found
        assert text.startswith(", ", at)
        at += 2


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                        max_size=12), min_size=1, max_size=6))
def test_a_list_of_names_reads_back_as_the_same_names(items: list[str]) -> None:
    from spotwatch.console import names  # here: the other tests also run on older code

    assert _split_names(names(items)) == items


def test_names_ending_in_a_space_are_quoted_in_status_and_errors(workspace: Workspace) -> None:
    """A watched directory "run " is not shown as "run": status and flush quote it."""
    missing = workspace.root / "later "
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/"},
                                  {"path": str(missing), "prefix": "run2/"}])
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 1
    assert flushed.stderr.splitlines()[-1].endswith(f"(not made or mounted yet): '{missing}'")
    report: dict[str, Any] = {
        "bucket": "b", "daemon_pid": 7, "uploaded_objects": 0, "uploaded_bytes": 0,
        "last_upload_at": None,
        "daemon": {"pending_files": 0, "pending_bytes": 0, "uploading": 0,
                   "unsettled_files": 0, "missing_dirs": [str(missing), "/ck/b"],
                   "unsealed_sets": ["step_2 ", "step, 3"]}}
    lines = render_status(report).splitlines()
    assert any(line.endswith(f"yet): '{missing}', /ck/b") for line in lines)
    assert any(line.endswith("if any): 'step_2 ', 'step, 3'") for line in lines)


def test_a_set_to_name_with_set_is_given_as_the_shell_takes_it() -> None:
    from spotwatch.sync.restore.run import _none_left

    why = _none_left("run1/", [], ["final model "], [])
    assert why.endswith("; 'final model ' has no step number, so is no checkpoint here "
                        "(--set 'final model ' restores it)")


def test_a_ctrl_c_while_the_command_line_is_read_ends_quietly(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C in a command's first milliseconds came while argparse was set up, before the
    try that ends a command on one: a 16-line traceback. It ends as any Ctrl-C does: 130."""
    from spotwatch import cli

    def interrupted() -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["status"]) == 130
    assert "Traceback" not in capsys.readouterr().err
