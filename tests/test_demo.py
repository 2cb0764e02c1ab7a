"""`spotwatch demo` as a user runs it: a subprocess that must end in PASS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spotwatch.commands.demo import _missed

# What a laptop's environment may hold that must not take the rehearsal off its own S3 and
# IMDS: IMDS turned off for the SDKs, a proxy that cannot reach loopback, another profile,
# stray credentials.
HOSTILE = {"AWS_EC2_METADATA_DISABLED": "true", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "AWS_PROFILE": "nonexistent", "AWS_SESSION_TOKEN": "stale",
           "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}


@pytest.mark.parametrize("environment", ["clean", "hostile"])
def test_demo_rehearsal_passes(environment: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    if environment == "hostile":
        config = tmp_path / "aws-config"
        config.write_text("[default]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:9\n"
                          "s3 =\n  addressing_style = virtual\n")
        env.update(HOSTILE, AWS_CONFIG_FILE=str(config))
    result = subprocess.run([sys.executable, "-m", "spotwatch.cli", "demo"], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "spotwatch detected the notice" in out
    assert re.search(r"flush done: \d+ files", out)
    assert "emergency checkpoint" in out
    assert re.search(r"verification: +12 checkpoint files compared .*; 4 sets with manifests",
                     out)
    assert out.rstrip().endswith("PASS: no checkpoint work lost")
    assert re.search(r"detection latency: +[\d.]+ s", out)
    assert "Traceback" not in result.stderr


def test_a_failed_rehearsal_says_which_step_never_came() -> None:
    """A FAIL always names its cause, also when every object is in S3 as it should be."""
    assert _missed({"fired": 1.0}, [1]) == [
        "spotwatch never detected the emulated spot notice",
        "the trainer was never told of the notice",
        "the newest checkpoint set was not sealed within 60 s",
        "the notice's flush did not finish within 60 s",
        "the daemon exited with 1"]
    every = {"fired": 1.0, "detected": 1.1, "trainer-saw": 1.2, "newest": 2.0, "flushed": 2.0}
    assert _missed(every, [0]) == []
    assert _missed(every, []) == ["the daemon did not stop within 60 s"]
