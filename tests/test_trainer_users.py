"""A trainer running as another user than the daemon is told too: it reads the notice file
(found without arguments) and gets the hook signal from a daemon with the shipped unit's
capabilities. The daemon runs as root, the trainer as nobody (uid 65534)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotwatch.emulator import ImdsEmulator
from spotwatch.interruption import interruption_pending
from spotwatch.model import FileVersion
from spotwatch.sync.ledger import Ledger

from .conftest import REGION, Workspace, keys_in, wait_for
from .test_systemd import unit_settings

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
READ_NOTICE = "import json, spotwatch; print(json.dumps(spotwatch.interruption_pending()))"
TRAINER = """
import signal, sys, time
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
print("ready", flush=True)
deadline = time.monotonic() + 30
while not asked and time.monotonic() < deadline:
    time.sleep(0.01)  # the trainer's own wait for the signal (the input), not the test's
sys.exit(0 if asked else 1)
"""


def trainer_env() -> dict[str, str]:
    """A trainer's environment: nothing tells it where the daemon put the notice."""
    hidden = {"RUNTIME_DIRECTORY", "SPOTWATCH_NOTICE_FILE", "XDG_RUNTIME_DIR", "STATE_DIRECTORY"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["HOME"] = "/nonexistent"
    return env


def read_notice_as_nobody(*namespace: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*namespace, *AS_NOBODY, sys.executable, "-c", READ_NOTICE],
                          env={**trainer_env(), **env}, cwd="/", capture_output=True,
                          text=True, timeout=60)


def unit_launcher() -> tuple[str, ...]:
    """Run the daemon as root with only the capabilities the shipped unit leaves it."""
    caps = unit_settings()["CapabilityBoundingSet"].split()
    allowed = ",".join(f"+{cap.removeprefix('CAP_').lower()}" for cap in caps)
    return ("setpriv", "--inh-caps=-all", f"--bounding-set=-all,{allowed}")


def test_trainer_of_another_user_reads_the_notice(workspace: Workspace,
                                                  imds: ImdsEmulator) -> None:
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    # The daemon gets a /run of its own (a tmpfs in a mount namespace), with the unit's umask
    # and no systemd: as root it puts the notice in /run/spotwatch.
    workspace.launcher = ("unshare", "--mount", "--propagation=private", "sh", "-c",
                          'umask 0027 && mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"',
                          "sh", *unit_launcher())
    daemon = workspace.start_daemon(RUNTIME_DIRECTORY="")
    in_daemon_mounts = ("nsenter", f"--mount=/proc/{daemon.process.pid}/ns/mnt")
    imds.fire_spot_interruption()
    daemon.wait_for_event("flush_started")  # the notice file is written before the flush
    reader = read_notice_as_nobody(*in_daemon_mounts)
    assert reader.returncode == 0, reader.stderr
    notice = json.loads(reader.stdout)
    assert notice is not None and notice["kind"] == "spot-interruption", reader.stderr
    assert reader.stderr == ""
    assert daemon.stop() == 0


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="spotwatch-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_notice_file_the_trainer_cannot_read_warns(shared_dir: Path) -> None:
    private = shared_dir / "notice.json"
    private.write_text('{"kind": "spot-interruption"}')
    private.chmod(0o600)
    reader = read_notice_as_nobody(SPOTWATCH_NOTICE_FILE=str(private))
    assert reader.returncode == 0, reader.stderr
    assert json.loads(reader.stdout) is None
    assert f"cannot read the notice file {private}: Permission denied" in reader.stderr


def test_signal_reaches_a_trainer_of_another_user(workspace: Workspace,
                                                  imds: ImdsEmulator) -> None:
    trainer = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", TRAINER], env=trainer_env(),
                               cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == "ready\n"
        pid_file = workspace.root / "trainer.pid"
        pid_file.write_text(str(trainer.pid))
        workspace.write_config(hooks={"signal": "USR1", "pid_file": str(pid_file)})
        workspace.launcher = unit_launcher()
        daemon = workspace.start_daemon()
        imds.fire_spot_interruption()
        assert trainer.wait(timeout=60) == 0  # it got the signal
        assert daemon.named("hook_signal_sent")[0]["pid"] == trainer.pid
        assert daemon.stop() == 0
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.parametrize("verb", ["run", "check"])
@pytest.mark.parametrize("place", ["made", "to be made", "below a closed folder"])
def test_a_state_directory_another_user_owns_is_one_line_and_a_config_error(
        shared_dir: Path, bucket: str, verb: str, place: str) -> None:
    """The sidecar (uid 10001) with its state on a volume it cannot write, e.g. a hostPath or
    bind mount owned by root (made, or to be made in one), or below a folder it may not
    enter (another user's home, systemd's /var/lib/private): one line on stderr naming the
    directory, and exit 2, the status the systemd unit does not restart on and a
    container's operator must mend. `check`, the preflight, refuses it as `run` does (old,
    below a closed folder: Path.exists() raised PermissionError in `check`, a traceback)."""
    owned = shared_dir / "owned"
    owned.mkdir(mode=0o700 if place == "below a closed folder" else 0o755)  # root's
    state = shared_dir / "state" if place == "made" else owned / "state"
    if place == "made":
        state.mkdir(mode=0o755)  # root's
    checkpoints = shared_dir / "checkpoints"
    checkpoints.mkdir()
    config = shared_dir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION}, "watch": [{"path": str(checkpoints), "prefix": "run1/"}],
        "imds": {"enabled": False}, "state": {"dir": str(state)}, "metrics": {"port": 0}}))
    done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", verb, "-c",
                           str(config)], env={**trainer_env(), "S3_BUCKET_NAME": bucket},
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    action = "write" if place == "made" else "create"
    assert done.stderr.splitlines()[-1] == (
        f"spotwatch: error: cannot {action} state directory {state}: Permission denied "
        f"(uid {NOBODY}; make it writable by this user, or set state.dir)")
    assert not os.path.exists(state / "lock")


def status_config(shared_dir: Path, state: Path) -> Path:
    """A config for `spotwatch status` on this state directory."""
    config = shared_dir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION},
        "watch": [{"path": str(shared_dir / "checkpoints"), "prefix": "run1/"}],
        "imds": {"enabled": False}, "state": {"dir": str(state)}, "metrics": {"port": 0}}))
    return config


def test_status_of_a_state_directory_this_user_cannot_read_is_one_line(
        shared_dir: Path, bucket: str) -> None:
    """`spotwatch status --healthy` (the container's healthcheck) run by a user who may not
    read the daemon's state directory: one line naming it, not a traceback."""
    state = shared_dir / "state"
    state.mkdir(mode=0o700)  # root's
    (state / "lock").write_text("1\n")
    config = status_config(shared_dir, state)
    for extra in ((), ("--healthy",)):
        done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", "status", "-c",
                               str(config), *extra],
                              env={**trainer_env(), "S3_BUCKET_NAME": bucket}, cwd="/",
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1].startswith("spotwatch: error: cannot read state "
                                                       f"directory {state}: "), done.stderr


def test_status_with_no_daemon_reads_a_ledger_this_user_may_not_write(
        shared_dir: Path, bucket: str) -> None:
    """A stopped root daemon's state (0755, its ledger 0644) read by another user's `spotwatch
    status`: what the ledger says was uploaded, not a failure to open it for writing."""
    state = shared_dir / "state"
    state.mkdir(mode=0o755)
    ledger = Ledger(state / "ledger.sqlite3")
    ledger.record(bucket, "run1/step_1/model.pt", Path("/ckpt/step_1/model.pt"),
                  FileVersion(7, 1_000), "c2lnbg==")
    ledger.close()
    for left in state.iterdir():
        left.chmod(0o644)
    config = status_config(shared_dir, state)
    done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", "status", "-c",
                           str(config), "--json"],
                          env={**trainer_env(), "S3_BUCKET_NAME": bucket}, cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["uploaded_objects"], report["uploaded_bytes"]) == (1, 7)


def test_status_of_a_report_this_user_cannot_read_says_so(shared_dir: Path, bucket: str) -> None:
    """The state directory may be entered (a daemon of another user without systemd made it
    0755) but status.json is its owner's alone: `status` names the file instead of calling a
    running daemon one that has not reported yet."""
    state = shared_dir / "state"
    state.mkdir(mode=0o755)
    report = state / "status.json"
    report.write_text(json.dumps({"pid": os.getpid(), "role": "daemon"}))
    report.chmod(0o600)
    config = status_config(shared_dir, state)
    with (state / "lock").open("w") as lock:  # held as a running daemon holds it
        lock.write(str(os.getpid()))
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        for extra in ((), ("--healthy",)):
            done = subprocess.run([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", "status",
                                   "-c", str(config), *extra],
                                  env={**trainer_env(), "S3_BUCKET_NAME": bucket}, cwd="/",
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stdout
            assert "starting" not in done.stdout
            assert done.stderr.splitlines()[-1] == \
                f"spotwatch: error: cannot read status file {report}: Permission denied"


def test_a_notice_file_the_daemon_cannot_write_is_named_at_start(workspace: Workspace,
                                                                 shared_dir: Path) -> None:
    """hooks.notice_file in a directory the daemon (with the unit's capabilities) may not
    write: said when it starts, not only when a notice comes and the trainer misses it."""
    closed = shared_dir / "notices"
    closed.mkdir()
    closed.chmod(0o555)
    notice_file = closed / "notice.json"
    workspace.write_config(hooks={"notice_file": str(notice_file)})
    workspace.launcher = unit_launcher()
    daemon = workspace.start_daemon()
    failed = [e for e in daemon.named("hook_failed") if e["hook"] == "notice_file"]
    assert [(e["path"], e["error"]) for e in failed] == [(str(notice_file), "Permission denied")]
    assert daemon.named("notice_detected") == []
    # And status says so, until the file can be written.
    reason = (f"the trainer cannot be told of a notice: {notice_file}: Permission denied")
    assert wait_for(lambda: reason in workspace.status().get("degraded", []))
    assert daemon.stop() == 0


def own_run(setup: str, *launcher: str) -> tuple[str, ...]:
    """Launch in a /run of the daemon's own (a tmpfs in a mount namespace), set up by the
    shell command setup."""
    return ("unshare", "--mount", "--propagation=private", "sh", "-c",
            f'mount -t tmpfs -o mode=0755 tmpfs /run && {setup} && exec "$@"', "sh", *launcher)


# The notices volume at /run/spotwatch, root's (a mount of its own, as a container's volume).
SHARED_VOLUME = "mkdir /run/spotwatch && mount -t tmpfs -o mode=0755 tmpfs /run/spotwatch"


def namespace_tools() -> None:
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def nobody_with_own_run(shared_dir: Path, bucket: str, imds: ImdsEmulator,
                        setup: str) -> tuple[Workspace, Any]:
    """A daemon as nobody, with a /run of its own set up by the shell command setup, and no
    other place for the notice than /run/spotwatch or its state directory."""
    namespace_tools()
    space = Workspace(shared_dir, shared_dir / "checkpoints", shared_dir / "config.yaml",
                      bucket, imds.url)
    for directory in (space.checkpoints, shared_dir / "state"):
        directory.mkdir()
        os.chown(directory, NOBODY, NOBODY)
    space.write_config()
    space.launcher = own_run(setup, *AS_NOBODY)
    daemon = space.start_daemon(RUNTIME_DIRECTORY="", XDG_RUNTIME_DIR="", HOME="/nonexistent")
    return space, daemon


def test_a_shared_notice_volume_the_daemon_cannot_write_is_named_at_start(
        shared_dir: Path, bucket: str, imds: ImdsEmulator) -> None:
    """The sidecar's notices volume at /run/spotwatch owned by root (0755, a host directory),
    the daemon not root: the notice would go to the state directory, which the trainer never
    reads. Said at start and in status (not healthy), the notice still written there; once
    /run/spotwatch is made the daemon's, the notice moves there, without a restart."""
    space, daemon = nobody_with_own_run(shared_dir, bucket, imds, SHARED_VOLUME)
    state = shared_dir / "state"
    try:
        in_daemon_mounts = ("nsenter", f"--mount=/proc/{daemon.process.pid}/ns/mnt")
        fallback = state / "notice.json"
        why = (f"owned by uid 0 with mode 0755, not writable by uid {NOBODY}: make it writable"
               f" by uid {NOBODY}, or set hooks.notice_file")
        failed = [e for e in daemon.named("hook_failed") if e["hook"] == "notice_file"]
        assert [(e["path"], e["error"]) for e in failed] == [("/run/spotwatch", why)]
        assert str(fallback) in failed[0]["detail"]
        reason = f"the trainer cannot be told of a notice: /run/spotwatch: {why}"
        assert wait_for(lambda: reason in space.status().get("degraded", []))
        assert space.cli("status", "-c", str(space.config_file), "--healthy").returncode == 1
        check = subprocess.run([*in_daemon_mounts, *AS_NOBODY, sys.executable, "-m",
                                "spotwatch.cli", "check", "-c", str(space.config_file)],
                               env={**trainer_env(), "S3_BUCKET_NAME": bucket}, cwd="/",
                               capture_output=True, text=True, timeout=60)
        assert f"warn  notice file      /run/spotwatch: {why} (" in check.stdout, check.stdout
        imds.fire_spot_interruption()  # still written where it can be
        assert wait_for(lambda: interruption_pending(fallback))["kind"] == "spot-interruption"
        subprocess.run([*in_daemon_mounts, "chown", f"{NOBODY}:{NOBODY}", "/run/spotwatch"],
                       check=True)
        assert wait_for(lambda: not space.status().get("degraded"), timeout=30)
        reader = read_notice_as_nobody(*in_daemon_mounts)
        assert reader.returncode == 0, reader.stderr
        assert json.loads(reader.stdout)["kind"] == "spot-interruption", reader.stderr
        assert not fallback.exists()
        assert len(daemon.named("hook_failed")) == 1
    finally:
        daemon.stop()


def _config_for(state: Path, shared_dir: Path) -> Path:
    """A config for `spotwatch run` on shared_dir/state, watching a checkpoint with a file in it."""
    checkpoints = shared_dir / "checkpoints"
    (checkpoints / "step_1").mkdir(parents=True)
    (checkpoints / "step_1" / "model.pt").write_bytes(b"weights")
    config = shared_dir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "aws": {"region": REGION}, "watch": [{"path": str(checkpoints), "prefix": "run1/"}],
        "imds": {"enabled": False}, "state": {"dir": str(state)}, "metrics": {"port": 0}}))
    return config


def _root_run_left_behind(state: Path) -> None:
    """What a root daemon killed with -9 leaves: its ledger with the -wal and -shm beside it,
    root's (0644), every write of it in the WAL."""
    state.mkdir(mode=0o755)
    left = ("import os, pathlib, sys; from spotwatch.sync.ledger import Ledger; "
            "Ledger(pathlib.Path(sys.argv[1])); os._exit(0)")
    subprocess.run([sys.executable, "-c", left, str(state / "ledger.sqlite3")], check=True,
                   timeout=60)
    assert (state / "ledger.sqlite3-wal").exists()


def _run_as_nobody(config: Path, bucket: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", "run", "-c",
                           str(config)], env={**trainer_env(), "S3_BUCKET_NAME": bucket},
                          cwd="/", capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("foreign", ["ledger.sqlite3", "acted_notices.json"])
def test_a_state_directory_holding_files_of_another_user_is_refused(
        shared_dir: Path, s3: Any, bucket: str, foreign: str) -> None:
    """The daemon ran as root (kill -9 left its ledger's WAL files), then the operator chowned
    the directory, its lock and status.json to the daemon's user, not the rest. A ledger it
    may not write (SQLite opens it read-only: every record fails behind a healthy start), or
    an acted_notices.json it may not read (its hooks would act again on a notice they acted
    on), refuse the start: one line naming the file, its owner and the fix, exit 2."""
    state = shared_dir / "state"
    _root_run_left_behind(state)
    if foreign == "acted_notices.json":
        (state / "acted_notices.json").write_text('{"boot_id": null, "ids": []}')
        (state / "acted_notices.json").chmod(0o600)
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
            os.chown(state / name, NOBODY, NOBODY)
    for name in ("lock", "status.json"):
        (state / name).write_text("")
        os.chown(state / name, NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    config = _config_for(state, shared_dir)
    done = _run_as_nobody(config, bucket)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"spotwatch: error: cannot use state directory {state}: {foreign} is owned by uid 0 "
        f"and uid {NOBODY} cannot read and write it; fix: chown -R {NOBODY} {state}")
    assert keys_in(s3, bucket) == set()


def test_a_state_directory_all_of_its_user_starts(shared_dir: Path, s3: Any,
                                                  bucket: str) -> None:
    """The same state, chowned -R as the refusal says: the daemon starts, and records."""
    state = shared_dir / "state"
    _root_run_left_behind(state)
    (state / "acted_notices.json").write_text('{"boot_id": null, "ids": []}')
    (state / "acted_notices.json").chmod(0o600)
    subprocess.run(["chown", "-R", str(NOBODY), str(state)], check=True)
    config = _config_for(state, shared_dir)
    daemon = subprocess.Popen([*AS_NOBODY, sys.executable, "-m", "spotwatch.cli", "run", "-c",
                               str(config)], env={**trainer_env(), "S3_BUCKET_NAME": bucket},
                              cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.stderr is not None
        lines = []
        for line in daemon.stderr:
            lines.append(line)
            if '"daemon_started"' in line:
                break
        assert '"daemon_started"' in lines[-1], "".join(lines)
        daemon.terminate()  # the final flush uploads the checkpoint and records it
        rest = daemon.stderr.read()
        assert daemon.wait(timeout=60) == 0, rest
    finally:
        daemon.kill()
        daemon.wait()
    assert "run1/step_1/model.pt" in keys_in(s3, bucket)
    assert "ledger_write_failed" not in "".join(lines) + rest


def test_a_ledger_opened_read_only_is_refused(shared_dir: Path) -> None:
    """Another user's ledger with its WAL beside it: SQLite opens it read-only and every
    statement of the open passes; the ledger says it cannot be written, at once."""
    state = shared_dir / "state"
    _root_run_left_behind(state)
    opens = ("import pathlib, sys; from spotwatch.sync.ledger import Ledger; "
             "Ledger(pathlib.Path(sys.argv[1]))")
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", opens, str(state / "ledger.sqlite3")],
                          env=trainer_env(), cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"spotwatch.errors.SpotwatchError: cannot open ledger {state / 'ledger.sqlite3'}: "
        f"attempt to write a readonly database (ledger.sqlite3 may not be written by uid "
        f"{NOBODY})")


def test_a_ledger_open_does_not_wait_for_a_daemon_writing_it(tmp_path: Path) -> None:
    """Opening the ledger (restore into the watched directory, prune) while another process
    holds a write transaction on it neither waits for it nor fails."""
    from spotwatch.sync.ledger import Ledger

    path = tmp_path / "ledger.sqlite3"
    writer = Ledger(path)
    with writer.transaction():
        opened = subprocess.run(
            [sys.executable, "-c", "import pathlib, sys; from spotwatch.sync.ledger import "
             "Ledger; Ledger(pathlib.Path(sys.argv[1])).close()", str(path)],
            capture_output=True, text=True, timeout=60)
    writer.close()
    assert opened.returncode == 0, opened.stderr


def test_acted_notices_unreadable_later_is_a_warning(shared_dir: Path) -> None:
    """An acted_notices.json that became another user's after the start's check: the hooks
    may act again, and that is said, not taken silently for no notice acted on."""
    record = shared_dir / "acted_notices.json"
    record.write_text('{"boot_id": "boot", "ids": ["a"]}')
    record.chmod(0o600)
    loads = ("import pathlib, sys; from spotwatch.notices.store import ActedNotices; "
             "acted = ActedNotices(pathlib.Path(sys.argv[1]), 'boot'); acted.load(); "
             "print(sorted(acted.acted))")
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", loads, str(record)],
                          env=trainer_env(), cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *logged, acted = done.stdout.splitlines()  # the log lines, then the print
    assert acted == "[]"
    assert any("hook_record_unreadable" in line and "Permission denied" in line
               for line in logged), done.stdout


def test_a_notice_left_in_a_shared_place_the_daemon_passes_over_is_named(
        shared_dir: Path, bucket: str, imds: ImdsEmulator) -> None:
    """/run/spotwatch root's, holding the notice.json a root daemon wrote before (a
    rebalance), and the daemon now not root: a trainer reads that old notice first, whatever
    this daemon writes elsewhere. Said in the warning and status."""
    space, daemon = nobody_with_own_run(
        shared_dir, bucket, imds, "mkdir -m 0755 /run/spotwatch && echo '{\"kind\": "
        "\"rebalance-recommendation\"}' > /run/spotwatch/notice.json")
    try:
        [failed] = [e for e in daemon.named("hook_failed") if e["hook"] == "notice_file"]
        assert failed["path"] == "/run/spotwatch"
        assert failed["error"].endswith("; the notice.json left there is what a trainer reads")
        assert wait_for(lambda: any("notice.json left there" in reason
                                    for reason in space.status().get("degraded", [])))
        # The operator makes it the daemon's: the old notice is gone with the warning, so no
        # trainer takes it for an interruption under way.
        in_daemon_mounts = ("nsenter", f"--mount=/proc/{daemon.process.pid}/ns/mnt")
        subprocess.run([*in_daemon_mounts, "chown", f"{NOBODY}:{NOBODY}", "/run/spotwatch"],
                       check=True)
        assert wait_for(lambda: not space.status().get("degraded"), timeout=30)
        reader = read_notice_as_nobody(*in_daemon_mounts)
        assert reader.stdout.strip() == "null", reader.stdout
    finally:
        daemon.stop()


def test_a_shared_notice_place_others_may_not_enter_is_named_until_opened(
        shared_dir: Path, bucket: str, imds: ImdsEmulator) -> None:
    """A root daemon, /run/spotwatch there already as 0700 (made under umask 077): it writes
    the notice, 0644, where no trainer of another user reaches it. Said at start, status not
    healthy, until the folder is opened; then a trainer of another user reads the notice."""
    namespace_tools()
    space = Workspace(shared_dir, shared_dir / "checkpoints", shared_dir / "config.yaml",
                      bucket, imds.url)
    space.checkpoints.mkdir()
    space.write_config()
    space.launcher = own_run("mkdir -m 0700 /run/spotwatch")
    daemon = space.start_daemon(RUNTIME_DIRECTORY="", XDG_RUNTIME_DIR="")
    try:
        in_daemon_mounts = ("nsenter", f"--mount=/proc/{daemon.process.pid}/ns/mnt")
        why = ("mode 0700, which other users may not enter: chmod o+x /run/spotwatch, or set "
               "hooks.notice_file")
        failed = [e for e in daemon.named("hook_failed") if e["hook"] == "notice_file"]
        assert [(e["path"], e["error"]) for e in failed] == [("/run/spotwatch", why)]
        reason = f"the trainer cannot be told of a notice: /run/spotwatch: {why}"
        assert wait_for(lambda: reason in space.status().get("degraded", []))
        imds.fire_spot_interruption()
        wait_for(lambda: subprocess.run([*in_daemon_mounts, "test", "-f",
                                         "/run/spotwatch/notice.json"]).returncode == 0)
        unread = read_notice_as_nobody(*in_daemon_mounts)
        assert unread.stdout.strip() == "null" and "Permission denied" in unread.stderr
        subprocess.run([*in_daemon_mounts, "chmod", "0755", "/run/spotwatch"], check=True)
        assert wait_for(lambda: not space.status().get("degraded"), timeout=30)
        reader = read_notice_as_nobody(*in_daemon_mounts)
        assert json.loads(reader.stdout)["kind"] == "spot-interruption", reader.stderr
    finally:
        daemon.stop()



def test_a_trainer_an_unprivileged_daemon_cannot_signal_is_named_at_start(
        shared_dir: Path, bucket: str, imds: ImdsEmulator) -> None:
    """hooks.signal to a trainer of root from a daemon as nobody: said at start and in status
    (old: `health: ok` until the notice, when the signal failed), until the pid file names a
    process it may signal (here: none alive); the signal missed at a notice is held on."""
    space = Workspace(shared_dir, shared_dir / "checkpoints", shared_dir / "config.yaml",
                      bucket, imds.url)
    state = shared_dir / "state"
    for directory in (space.checkpoints, state):
        directory.mkdir()
        os.chown(directory, NOBODY, NOBODY)
    trainer = subprocess.Popen(["sleep", "120"])
    try:
        pid_file = shared_dir / "trainer.pid"
        pid_file.write_text(f"{trainer.pid}\n")
        space.write_config(hooks={"signal": "USR1", "pid_file": str(pid_file),
                                  "notice_file": str(state / "notice.json")})
        space.launcher = AS_NOBODY
        daemon = space.start_daemon(RUNTIME_DIRECTORY="", XDG_RUNTIME_DIR="")
        [failed] = [e for e in daemon.named("hook_failed") if e["hook"] == "signal"]
        assert (failed["pid"], failed["uid"], failed["level"]) == (trainer.pid, 0, "warning")
        assert "CAP_KILL" in failed["detail"] and "trainer's user" in failed["detail"]
        reason = (f"the trainer cannot be told of a notice: hooks.signal SIGUSR1 to pid "
                  f"{trainer.pid} (uid 0): Operation not permitted")
        assert wait_for(lambda: reason in space.status().get("degraded", []))
        assert space.cli("status", "-c", str(space.config_file), "--healthy").returncode == 1
        # At the notice the signal fails: the trainer missed it, which a check cannot undo.
        imds.fire_spot_interruption()
        daemon.wait_for_event("hook_failed", count=2)
        missed = (f"the trainer was not told of the notice: hooks.signal SIGUSR1, pid file "
                  f"{pid_file}: [Errno 1] Operation not permitted")
        assert wait_for(lambda: missed in space.status().get("degraded", []))
        trainer.kill()
        trainer.wait()
        assert wait_for(lambda: reason not in space.status().get("degraded", []), timeout=30)
        daemon.wait_for_event("trainer_signalable")
        assert space.status()["degraded"] == [missed]
        assert daemon.stop() == 0
    finally:
        trainer.kill()


def test_a_plain_directory_of_another_uid_at_the_shared_place_is_no_problem(
        shared_dir: Path, bucket: str, imds: ImdsEmulator) -> None:
    """The image's own /run/spotwatch (10001's), the container run as another uid with no
    notices volume: no trainer shares that directory, and with no notice file in it readers
    go on to the place used. Not a problem, so never an unhealthy container."""
    space, daemon = nobody_with_own_run(shared_dir, bucket, imds,
                                        "mkdir -m 0755 /run/spotwatch")
    try:
        wait_for(lambda: "degraded" in space.status())
        assert space.status()["degraded"] == []
        assert [e for e in daemon.named("hook_failed") if e["hook"] == "notice_file"] == []
    finally:
        daemon.stop()

