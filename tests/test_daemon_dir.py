"""status and flush run by another user than the daemon's (a trainer beside the systemd
unit's root daemon): they find that daemon's state directory, or say why they cannot, never
"not running" and a flush of their own beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotwatch.bucket import NamedBucket
from spotwatch.commands import daemon_dir
from spotwatch.commands.daemon_dir import daemons_state_dir
from spotwatch.config import load_config
from spotwatch.errors import SpotwatchError
from spotwatch.state import StateDir, StateLock


@pytest.fixture
def as_a_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as a user other than root, with the system state directory under
    tmp_path; returns it (not made yet)."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "user-state"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    system = tmp_path / "var-lib-spotwatch"
    monkeypatch.setattr(daemon_dir, "SYSTEM_STATE_DIR", system)
    return system


def config_without_state(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("aws: {region: us-west-2}\nwatch: [{path: ckpt}]\n")
    return path


def test_a_user_without_a_daemon_of_its_own_finds_the_system_daemon(
        tmp_path: Path, as_a_user: Path) -> None:
    config = load_config(config_without_state(tmp_path))
    assert daemons_state_dir(config).path == config.state_dir  # no system daemon: its own
    as_a_user.mkdir()
    lock = StateLock(StateDir(as_a_user))
    lock.acquire()  # the root daemon
    try:
        assert daemons_state_dir(config).path == as_a_user
    finally:
        lock.release()
    assert daemons_state_dir(config).path == config.state_dir  # it stopped: its own again


def test_a_system_state_directory_the_user_may_not_read_is_said(
        tmp_path: Path, as_a_user: Path) -> None:
    config = load_config(config_without_state(tmp_path))
    as_a_user.mkdir()
    (as_a_user / "lock").symlink_to("lock")  # opening it fails, as a 0750 root dir would
    with pytest.raises(SpotwatchError, match=r"cannot be read by this user.*sudo"):
        daemons_state_dir(config)


def test_a_configured_state_directory_is_the_only_one_looked_at(
        tmp_path: Path, as_a_user: Path) -> None:
    path = config_without_state(tmp_path)
    path.write_text(path.read_text() + f"state: {{dir: {tmp_path / 'mine'}}}\n")
    config = load_config(path)
    as_a_user.mkdir()
    (as_a_user / "lock").symlink_to("lock")
    assert daemons_state_dir(config).path == tmp_path / "mine"


def test_status_of_a_user_shows_the_system_daemon_running(tmp_path: Path,
                                                          as_a_user: Path) -> None:
    from spotwatch.commands.status import gather_status

    config = load_config(config_without_state(tmp_path))
    as_a_user.mkdir()
    lock = StateLock(StateDir(as_a_user))
    lock.acquire()
    try:
        report = gather_status(config, NamedBucket("bucket", "--bucket"))
    finally:
        lock.release()
    assert report["daemon_pid"] == os.getpid()
    assert report["state_dir"] == str(as_a_user)
