"""The systemd unit is valid, and the daemon speaks sd_notify: READY, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Workspace
from .readme_commands import run_in_overlaid_root, shell_block, upper

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "spotwatch.service"
UNIT_INSTALLED = Path("/etc/systemd/system/spotwatch.service")


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def test_unit_contract() -> None:
    settings = unit_settings()
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2"  # a config error: a restart cannot help
    assert settings["StateDirectory"] == "spotwatch"
    assert settings["EnvironmentFile"].endswith("/etc/spotwatch/spotwatch.env")
    assert int(settings["WatchdogSec"]) > 0
    stop = int(settings["TimeoutStopSec"])
    assert 100 < stop < 120  # longer than the default final flush, shorter than the notice
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert settings[hardening] == "yes"
    assert settings["ProtectSystem"] == "strict"


def unit_environment(env_file: Path) -> dict[str, str]:
    """The service's environment as systemd composes it: Environment= first, then the
    EnvironmentFile (here `env_file` in its place), whose settings override."""
    composed: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, value = line.removeprefix("Environment=").split("=", 1)
            composed[key] = value
        elif line.startswith("EnvironmentFile="):
            for setting in env_file.read_text().splitlines():
                key, value = setting.split("=", 1)
                composed[key] = value
    return composed


def test_a_config_named_in_the_environment_file_is_the_one_run_reads(tmp_path: Path) -> None:
    """SPOTWATCH_CONFIG=... in /etc/spotwatch/spotwatch.env, as the README's rule (-c, else
    $SPOTWATCH_CONFIG, ...) promises: ExecStart must not name another with -c."""
    config = tmp_path / "job 7 config.yaml"
    config.write_text("watch: [{path: /opt/ml/checkpoints}]\nset_in_the_env_file: 1\n")
    env_file = tmp_path / "spotwatch.env"
    env_file.write_text(f"S3_BUCKET_NAME=my-checkpoints\nSPOTWATCH_CONFIG={config}\n")
    argv = unit_settings()["ExecStart"].split()
    assert argv[0] == "/usr/local/bin/spotwatch"
    done = subprocess.run([sys.executable, "-m", "spotwatch.cli", *argv[1:]], cwd="/",
                          env={**os.environ, **unit_environment(env_file)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr  # that config's error: it was the one read
    assert "unknown config key 'set_in_the_env_file'" in done.stderr


def test_unit_lets_the_trainer_of_another_user_be_told() -> None:
    settings = unit_settings()
    # /run/spotwatch/notice.json: reachable by every user, and kept over a restart.
    assert settings["RuntimeDirectory"] == "spotwatch"
    assert settings["RuntimeDirectoryMode"] == "0755"
    assert settings["RuntimeDirectoryPreserve"] == "restart"
    # hooks.signal to a trainer running as another user (see tests/test_trainer_users.py).
    assert "CAP_KILL" in settings["CapabilityBoundingSet"].split()


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart to exist: point it at a real executable in a copy of the unit.
    unit = tmp_path / "spotwatch.service"
    spotwatch = shutil.which("spotwatch") or "/bin/true"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/spotwatch", spotwatch))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0 and not problems, result.stderr


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def read_messages(sock: socket.socket, seconds: float) -> list[str]:
    messages = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def test_daemon_notifies_systemd(workspace: Workspace, notify_socket: socket.socket) -> None:
    path = notify_socket.getsockname()
    daemon = workspace.start_daemon(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    messages = read_messages(notify_socket, 1.0)
    assert any(m.startswith("READY=1") for m in messages), messages
    keepalives = [m for m in messages if m == "WATCHDOG=1"]
    assert len(keepalives) >= 5  # every 0.1 s: half the watchdog interval
    assert daemon.stop() == 0
    stopping = [m for m in read_messages(notify_socket, 0.5) if m.startswith("STOPPING=1")]
    assert stopping, messages
    # The stop systemd allows is the config's (stop_timeout 30 s here), not the unit's alone.
    assert "EXTEND_TIMEOUT_USEC=45000000" in stopping[0].splitlines(), stopping


def test_no_watchdog_for_another_pid(workspace: Workspace, notify_socket: socket.socket) -> None:
    path = notify_socket.getsockname()
    daemon = workspace.start_daemon(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000",
                                    WATCHDOG_PID="1")
    messages = read_messages(notify_socket, 0.6)
    assert any(m.startswith("READY=1") for m in messages)
    assert "WATCHDOG=1" not in messages
    assert daemon.stop() == 0


@pytest.mark.timeout(30)
def test_a_manager_that_stops_reading_never_blocks_the_sender(
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    from spotwatch.daemon import sdnotify

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    # Nobody reads: the socket's queue fills, and from then on a send must fail, not wait.
    sent = [sdnotify.notify("WATCHDOG=1") for _ in range(100_000)]
    assert sent[0] and not sent[-1]


def _can_overlay_root() -> str | None:
    """Why the README's install commands cannot run here, or None."""
    if os.geteuid() != 0:
        return "overlaying /etc, /opt and /usr/local needs root"
    missing = [tool for tool in ("unshare", "systemd-analyze") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def test_readme_install_commands_as_written(tmp_path: Path) -> None:
    reason = _can_overlay_root()
    if reason:
        pytest.skip(reason)
    block = shell_block("systemctl enable --now spotwatch")
    # After the README's commands, in the same overlaid root: the installed unit verifies
    # (its ExecStart exists there) and the command it starts works.
    check = ("systemd-analyze verify /etc/systemd/system/spotwatch.service\n"
             "/usr/local/bin/spotwatch --version\n")
    done = run_in_overlaid_root(block + check, workdir=tmp_path, cwd=ROOT, extra_env={})
    assert done.returncode == 0, done.stdout + done.stderr
    problems = [line for line in done.stderr.splitlines() if f"{UNIT_INSTALLED}:" in line]
    assert not problems, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("spotwatch ")

    assert upper(tmp_path, str(UNIT_INSTALLED)).read_text() == UNIT.read_text()
    assert upper(tmp_path, "/etc/spotwatch/config.yaml").read_text() == \
        (ROOT / "config.yaml").read_text()
    assert upper(tmp_path, "/etc/spotwatch/spotwatch.env").read_text() == \
        "S3_BUCKET_NAME=my-checkpoints\n"
    assert upper(tmp_path, "/etc/systemd/system/multi-user.target.wants/"
                           "spotwatch.service").is_symlink()
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload", "enable --now spotwatch"]
