"""The README's shell commands, run as written: what a user copies from the README must work.

A command block is found by a piece of its text and run verbatim by bash. `sudo` is a shim that
runs its command as is (the tests that install things run as root), and for commands that
install into the system, `/etc`, `/opt` and `/usr/local` are overlaid by temporary directories
in a private mount namespace, so the install lands there and the host is left untouched;
`systemctl` is a shim that records its arguments and only enables units offline, never
starting anything.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OVERLAID = ("/etc", "/opt", "/usr/local")

# sudo for a test that already runs as root; `sudo NAME=value command` sets the variable.
SUDO_SHIM = '#!/bin/sh\nexec env "$@"\n'
SYSTEMCTL_SHIM = """#!/bin/sh
# Records the call; enables units offline (symlinks only), never talks to a running systemd.
echo "$*" >>"$SYSTEMCTL_LOG"
[ "$1" = enable ] || exit 0
shift
units=""
for arg in "$@"; do
    case "$arg" in -*) ;; *) units="$units $arg" ;; esac
done
# shellcheck disable=SC2086
exec /usr/bin/systemctl --root=/ enable $units
"""


def shell_block(containing: str, language: str = "sh") -> str:
    """The one ```sh (or other `language`) block of the README that contains `containing`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.S | re.M)
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"{len(matching)} README {language} blocks contain {containing!r}"
    return matching[0]


def shims(directory: Path, *, systemctl: bool = False) -> Path:
    """A directory to put first on PATH, with the `sudo` (and `systemctl`) shims."""
    directory.mkdir(parents=True, exist_ok=True)
    scripts = {"sudo": SUDO_SHIM, **({"systemctl": SYSTEMCTL_SHIM} if systemctl else {})}
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def run_block(script: str, *, cwd: Path, env: dict[str, str],
              timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a README block with bash, stopping at its first failing command."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_overlaid_root(script: str, *, workdir: Path, cwd: Path, extra_env: dict[str, str],
                         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs `script` with /etc, /opt and /usr/local overlaid by directories under
    `workdir/upper` (what the script writes stays there) and the shims first on PATH.
    `workdir/systemctl.log` gets one line per systemctl call."""
    mounts = []
    for directory in OVERLAID:
        upper, work = (workdir / kind / directory.strip("/") for kind in ("upper", "work"))
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        mounts.append(f"mount -t overlay overlay -o lowerdir={directory},upperdir={upper},"
                      f"workdir={work} {directory}")
    env = {**os.environ, **extra_env, "SYSTEMCTL_LOG": str(workdir / "systemctl.log"),
           "PATH": f"{shims(workdir / 'shims', systemctl=True)}:{os.environ['PATH']}"}
    wrapped = "\n".join([*mounts, script])
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-euo", "pipefail", "-c",
         wrapped], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def upper(workdir: Path, path: str) -> Path:
    """Where `path` (under an overlaid directory) landed on the host."""
    return workdir / "upper" / path.lstrip("/")
