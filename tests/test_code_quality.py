"""The code stays typed and lint-clean; CI fails otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_is_clean() -> None:
    result = run_tool("ruff", "check", "src", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme



def test_imports_point_downward_only() -> None:
    """The layers contract in pyproject.toml: cli > commands > daemon > sync | notices > aws >
    config and friends > model | errors | emulator; every module is in a layer."""
    # lint-imports has no `python -m` entry point; this is what its console script runs.
    lint_imports = ("import sys; from importlinter.cli import lint_imports_command; "
                    "sys.exit(lint_imports_command())")
    result = subprocess.run([sys.executable, "-c", lint_imports], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
