"""`spotwatch demo` as a user runs it: a subprocess that must end in PASS."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_rehearsal_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "spotwatch.cli", "demo"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "spotwatch detected the notice" in out
    assert re.search(r"flush done: \d+ files", out)
    assert "emergency checkpoint" in out
    assert re.search(r"verification: +12 checkpoint files compared .*; 4 sets with manifests",
                     out)
    assert out.rstrip().endswith("PASS: no checkpoint work lost")
    match = re.search(r"detection latency: +([\d.]+) s", out)
    assert match
    latency = float(match.group(1))
    assert latency < 1.0 + 0.5  # poll interval plus slack
    assert "Traceback" not in result.stderr
