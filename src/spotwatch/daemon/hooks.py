"""Telling training code about a notice: a notice file, a signal, a command."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from spotwatch.config import HookSettings
from spotwatch.daemon.hook_problems import HookProblems, Key
from spotwatch.interruption import (
    NOTICE_FILE_NAME,
    SHARED_RUNTIME_DIR,
    default_notice_file,
    passed_over_notice_dir,
)
from spotwatch.logs import get_logger
from spotwatch.notices.store import ActedNotices, Told, current_boot
from spotwatch.state import StateDir, make_shared_dirs, write_json_atomically

log = get_logger("spotwatch.hooks")

# Readable by the trainer whichever user it runs as (the notice holds nothing secret).
NOTICE_FILE_MODE = 0o644
# How often a notice file that could not be written is checked again while it cannot, and
# the trainer's pid file (hooks.signal) always: the trainer mostly starts after the daemon.
RECHECK_SECONDS = 10.0
# What the check of the notice file's place writes there: a notice's size, about.
PROBE_BYTES = 512
# How much later than its pid file's mtime a process may seem to have started and still be
# the one it names: /proc's boot time has whole seconds, and a pid file on a network file
# system has its server's clock. A pid is reused far later than this.
START_SLACK = 60.0
# The largest pid_t; Linux's pid_max is far below it.
MAX_PID = 2**31 - 1
# The most of a hook command's output the log takes (the file keeps all of it).
OUTPUT_MAX = 64 << 10
NOTICE_FILE = Key("notice_file", missed=False)
SIGNAL = Key("signal", missed=False)
SIGNAL_MISSED = Key("signal", missed=True)
COMMAND_MISSED = Key("command", missed=True)


class NoticeHooks:
    def __init__(self, settings: HookSettings, state: StateDir) -> None:
        self.notice_file = settings.notice_file or default_notice_file(state.path)
        self._settings = settings
        self._state_path = state.path
        self._hook_output = state.hook_output
        self._acted = ActedNotices(state.acted_notices, current_boot())
        # Where and why the trainer may miss a notice, or missed one, as degraded reasons.
        # NOTICE_FILE (the notice file cannot be written, or the default place it reads was
        # passed over) holds until a check made while degraded, or (for the notice file
        # itself) a write, succeeds; SIGNAL (the trainer's process may not be signalled) until
        # a check finds it may be, or it is gone. SIGNAL_MISSED and COMMAND_MISSED (the hook
        # failed at a notice: the trainer missed it) hold until that hook next acts without
        # failing, or no notice is in effect any more (withdraw); a check does not clear
        # them, as it does not tell the trainer what it missed.
        self._problems = HookProblems()
        self._recheck_at = 0.0  # monotonic
        # The notice the trainer is to read (the last written, or to be written), while one
        # is in effect: written again by a check once its place takes it.
        self._notice: dict[str, Any] | None = None

    def degraded_reasons(self) -> list[str]:
        """Asked at every status write; every RECHECK_SECONDS a notice file place found
        wanting is checked again, and so is the trainer's pid file, so that a fix (the
        directory made, space freed, its mode changed, the daemon's user) clears it without
        waiting for a notice or a restart, and a trainer started later is checked too. With a
        notice in effect whose file could not be written, the check is writing it: the
        problem holds until the trainer can read it. (A place found fine is not checked on
        the loop again: one on a network mount that hangs would stall it.)"""
        if time.monotonic() >= self._recheck_at:
            self._recheck_at = time.monotonic() + RECHECK_SECONDS
            held = self._problems.get(NOTICE_FILE)
            if self._notice is not None and held is not None \
                    and held[0] == str(self.notice_file):
                self._write_notice_file(self._notice, said_once=True)
            elif held is not None:
                self._check_writable()
            self._check_signal()
        return self._problems.reasons()

    def start(self) -> Told | None:
        """At daemon start. A notice acted on during this boot is likely still posted, so its
        file stays for the trainer (until AWS withdraws it: the daemon's first listing of the
        item tells); any other notice file is stale. Returns the notice the trainer was last
        told of, as recorded, even if its file is gone."""
        self._acted.load()
        self._check_writable()
        self._check_signal()
        self._recheck_at = time.monotonic() + RECHECK_SECONDS
        if self._acted.acted:
            with suppress(OSError, ValueError):  # none readable: the next notice writes one
                notice = json.loads(self.notice_file.read_text())
                self._notice = notice if isinstance(notice, dict) else None
            return self._acted.told
        self._remove_notice_file()
        return None

    def _check_writable(self) -> None:
        """Invariant 7 needs the notice file written when the notice comes, where the trainer
        reads it: a place the daemon cannot write is named at start (and degrades status),
        while it can still be fixed, not only once the notice is missed. Said once, not at
        every check again."""
        problem = self._place_problem()
        if problem is None:
            if self._problems.clear(NOTICE_FILE):
                log.info("notice_file_writable", path=str(self.notice_file))
            return
        where, error, detail = problem
        if self._problems.hold(NOTICE_FILE, str(where), error):
            log.warning("hook_failed", hook="notice_file", path=str(where), error=error,
                        detail=detail)

    def _check_signal(self) -> None:
        """hooks.signal to a trainer of another user, from a daemon without CAP_KILL, fails
        (EPERM): said at start and degrades status, while it can still be fixed, not only once
        the trainer has missed the signal; said once, not at every check. No pid file, or a
        dead pid, is no problem yet: the trainer may not have started."""
        name, pid_file = self._settings.signal, self._settings.pid_file
        if not name or pid_file is None:
            return
        problem = unsignalable(pid_file)
        if problem is None:
            if self._problems.clear(SIGNAL):
                log.info("trainer_signalable", pid_file=str(pid_file))
            return
        pid, uid = problem
        owner = "" if uid is None else f" (uid {uid})"
        error = os.strerror(errno.EPERM)
        if self._problems.hold(SIGNAL, f"hooks.signal {name} to pid {pid}{owner}", error):
            log.warning("hook_failed", hook="signal", pid=pid, uid=uid, pid_file=str(pid_file),
                        error=error,
                        detail=("run the daemon as root (or with CAP_KILL, as the shipped unit "
                                "has), or as the trainer's user"))

    def _place_problem(self) -> tuple[Path, str, str] | None:
        """(place, error, what to do) when the trainer may miss the notice, else None.
        Without hooks.notice_file, a default place that exists but the daemon may not write
        (the shared volume mounted owned by another user) is one: the notice would go further
        down the list, where a trainer reading that volume never looks. Else the notice
        file's own place (a directory of another user, a read-only file system, outside the
        unit's ReadWritePaths), tried with a file made and removed beside it, as the notice's
        own is."""
        if self._settings.notice_file is None:
            self._follow_default()
            passed = passed_over_place(self._state_path)
            if passed is not None:
                where, why = passed
                return where, why, (f"the notice goes to {self.notice_file} instead, which a "
                                    f"trainer reading {where} never sees")
        try:
            if self.notice_file.is_dir():  # a directory there: the rename onto it fails
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            make_shared_dirs(self.notice_file.parent)
            fd, probe = tempfile.mkstemp(dir=self.notice_file.parent,
                                         prefix=f".{self.notice_file.name}.")
            try:  # bytes as a notice's: an empty file fits on a full file system
                os.write(fd, b" " * PROBE_BYTES)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            return (self.notice_file, exc.strerror or str(exc),
                    "the trainer cannot be told of a notice until this is fixed")
        closed = self._closed_to_others()
        if closed is not None:
            return (*closed, "a trainer of another user cannot read the notice there")
        return None

    def _closed_to_others(self) -> tuple[Path, str] | None:
        """A folder on the way to /run/spotwatch, the default place shared with trainers of
        every user, that other users may not enter (made 0700 under umask 077 before the
        daemon made it): the notice is written, 0644, and no trainer of another user reaches
        it. A place named by hooks.notice_file is the operator's to choose (a trainer's own
        home, say); systemd's RuntimeDirectory elsewhere than /run/spotwatch has the unit's
        mode."""
        if self._settings.notice_file is not None or \
                self.notice_file.parent != SHARED_RUNTIME_DIR:
            return None
        for folder in (self.notice_file.parent, *self.notice_file.parent.parents):
            try:
                mode = folder.stat().st_mode
            except OSError:
                continue
            if not mode & stat.S_IXOTH:
                return folder, (f"mode {stat.S_IMODE(mode):04o}, which other users may not "
                                f"enter: chmod o+x {folder}, or set hooks.notice_file")
        return None

    def _follow_default(self) -> None:
        """A default place whose use changed while the daemon runs (the shared volume's owner
        or mode fixed) is used from then on, and the notice in effect moves there, so that a
        fix needs no restart."""
        wanted = default_notice_file(self._state_path)
        if wanted == self.notice_file:
            return
        left, self.notice_file = self.notice_file, wanted
        log.info("notice_file_moved", path=str(wanted), previous=str(left))
        try:
            notice = json.loads(left.read_text())
        except (OSError, ValueError):  # none in effect (or none readable): nothing to move
            notice = None
        if not isinstance(notice, dict):
            # Nothing in effect: a notice an earlier daemon left at the new place (named while
            # it was passed over) is no notice of this one's, and a trainer reads it first.
            self._remove_notice_file()
            return
        if self._write_notice_file(notice):
            try:
                left.unlink(missing_ok=True)
            except OSError as exc:  # e.g. its folder no longer writable: said, never raised
                log.warning("hook_failed", hook="notice_file", path=str(left),
                            error=exc.strerror, detail="the notice moved; its old copy stays")

    def fire(self, notice: dict[str, Any], told: Told) -> None:
        """Hooks act once per notice id, across restarts too, and again when its deadline
        moves earlier (a maintenance event rescheduled: the trainer must learn it has less
        time); the notice file is (re)written every time, so a trainer always finds it.
        told: the notice as the daemon keeps it, with when the instance is to go, as the next
        notices are compared with (see notices.sources.due_by)."""
        self._notice = notice
        self._write_notice_file(notice)
        if not self._acted.tell(told):
            log.info("hooks_already_acted", id=notice["id"], kind=notice["kind"])
            return
        if self._settings.signal and self._settings.pid_file:
            self._signal_trainer(self._settings.signal, self._settings.pid_file)
        if self._settings.command:
            self._run_command(self._settings.command, notice)

    def withdraw(self) -> None:
        """The trainer's notice was withdrawn (a maintenance event cancelled) and no other is
        in effect: its file goes, as before any notice, and a restart does not bring it back.
        Nothing is signalled or run: a trainer polling the notice file finds none."""
        self._acted.withdraw()
        self._notice = None
        self._remove_notice_file()
        self._problems.clear(SIGNAL_MISSED)  # what the trainer missed is no longer in effect
        self._problems.clear(COMMAND_MISSED)

    def _remove_notice_file(self) -> None:
        try:
            self.notice_file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("hook_failed", hook="notice_file", path=str(self.notice_file),
                        error=exc.strerror)

    def _write_notice_file(self, notice: dict[str, Any], said_once: bool = False) -> bool:
        """said_once: a failure is logged only when it is new (a check's retry), not at
        every try."""
        try:
            make_shared_dirs(self.notice_file.parent)
            write_json_atomically(self.notice_file, notice, mode=NOTICE_FILE_MODE)
        except OSError as exc:
            new = self._problems.hold(NOTICE_FILE, str(self.notice_file),
                                      exc.strerror or str(exc))
            if new or not said_once:
                log.warning("hook_failed", hook="notice_file", path=str(self.notice_file),
                            error=exc.strerror)
            return False
        held = self._problems.get(NOTICE_FILE)
        if held is not None and held[0] == str(self.notice_file):
            self._problems.clear(NOTICE_FILE)  # a passed-over default place is still one
            log.info("notice_file_written", path=str(self.notice_file), id=notice.get("id"))
        return True

    def _signal_trainer(self, name: str, pid_file: Path) -> None:
        try:
            pid = trainer_pid(pid_file.read_text())
            started = process_started_at(pid)
            if started is not None and started > pid_file.stat().st_mtime + START_SLACK:
                # Invariant: only the process that wrote the pid file (or one it named then)
                # is signalled: a pid the trainer left behind, reused by another process
                # since, is not the trainer's, and SIGUSR1's default action kills it.
                raise ProcessLookupError(
                    errno.ESRCH, f"pid {pid} is a process started after the pid file was "
                                 "written: the trainer's is gone, its pid reused")
            os.kill(pid, signal.Signals[name])
        except (OSError, ValueError) as exc:
            log.warning("hook_failed", hook="signal", pid_file=str(pid_file), error=str(exc))
            self._problems.hold(SIGNAL_MISSED, f"hooks.signal {name}, pid file {pid_file}",
                                str(exc))
            return
        log.info("hook_signal_sent", signal=name, pid=pid)
        self._problems.clear(SIGNAL_MISSED)

    def _run_command(self, command: str, notice: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update({f"SPOTWATCH_NOTICE_{key.upper()}": "" if value is None else str(value)
                    for key, value in notice.items()})
        env["SPOTWATCH_NOTICE_FILE"] = str(self.notice_file)
        try:
            # Its output goes to a file, never as raw lines among the log's JSON ones, nor
            # through a pipe: a process it leaves running would die of SIGPIPE at its next
            # write once the daemon is gone. What the command wrote is logged once it ends.
            with self._hook_output.open("ab") as output:
                start = output.tell()
                process = subprocess.Popen(["/bin/sh", "-c", command], env=env,
                                           stdin=subprocess.DEVNULL, stdout=output,
                                           stderr=subprocess.STDOUT)
        except OSError as exc:
            log.warning("hook_failed", hook="command", error=exc.strerror)
            self._problems.hold(COMMAND_MISSED, "hooks.command", exc.strerror or str(exc))
            return
        log.info("hook_command_started", pid=process.pid)

        def reap() -> None:  # the flush must not wait for the command
            code = process.wait()
            _log_output(self._hook_output, start, process.pid)
            if code == 0:
                log.info("hook_command_done", pid=process.pid, exit_code=code)
                self._problems.clear(COMMAND_MISSED)
                return
            # /bin/sh says why on stderr (not found: 127, not executable: 126).
            log.warning("hook_command_done", pid=process.pid, exit_code=code)
            self._problems.hold(COMMAND_MISSED, "hooks.command", f"exit code {code}")

        threading.Thread(target=reap, name="hook-command", daemon=True).start()


def _log_output(path: Path, start: int, pid: int) -> None:
    """The lines the command wrote from `start` on (stdout and stderr), each one event;
    undecodable bytes replaced. Past OUTPUT_MAX bytes, the whole lines before it, then one
    event that says how much more the file holds (never a line cut short unsaid)."""
    try:
        with path.open("rb") as output:
            output.seek(start)
            written = output.read(OUTPUT_MAX + 1)
            total = os.fstat(output.fileno()).st_size - start
    except OSError as exc:
        log.warning("hook_command_output_unread", path=str(path), error=exc.strerror)
        return
    cut = len(written) > OUTPUT_MAX
    if cut:
        written = written[:OUTPUT_MAX]
        whole = written.rfind(b"\n") + 1
        written = written[:whole] if whole else written  # one line longer than all: cut
    for line in written.decode("utf-8", "replace").splitlines():
        log.info("hook_command_output", pid=pid, line=line)
    if cut:
        log.info("hook_command_output_cut", pid=pid, logged_bytes=len(written),
                 bytes=total, path=str(path),
                 detail="the rest of the command's output is in the file")


def trainer_pid(text: str) -> int:
    """The pid a pid file names. Invariant: only one process is ever signalled: kill() takes
    0 as this process group and a negative number as a group or every process."""
    words = text.split()
    if not words:
        raise ValueError("the pid file is empty")
    pid = int(words[0])
    if not 0 < pid <= MAX_PID:
        raise ValueError(f"not a process id: {words[0][:40]!r}")
    return pid


def unsignalable(pid_file: Path) -> tuple[int, int | None] | None:
    """(pid, its real uid if /proc tells) when the pid file names a live process this one
    may not signal; None when it may, or there is none (yet) to signal."""
    try:
        pid = trainer_pid(pid_file.read_text())
        os.kill(pid, 0)  # no signal sent: only whether one may be
    except PermissionError:
        return pid, process_uid(pid)
    except (OSError, ValueError):  # no pid file, a dead pid: the trainer may start later
        return None
    return None


def process_started_at(pid: int) -> float | None:
    """When the process started (wall clock, to the tick), if /proc tells."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text()
                    .splitlines() if line.startswith("btime "))
        # Fields after the command's closing parenthesis start at the third; starttime is
        # the 22nd, in clock ticks since boot.
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def process_uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def passed_over_place(state_dir: Path) -> tuple[Path, str] | None:
    """A default notice place this process passes over though the trainer reads it first
    (see passed_over_notice_dir), with why and what to change; None when there is none.
    For the daemon (at start and in status) and `spotwatch check` alike."""
    directory = passed_over_notice_dir(state_dir)
    if directory is None:
        return None
    try:
        info = os.stat(directory)
    except OSError as exc:
        return directory, exc.strerror or str(exc)
    uid = os.geteuid()
    # A notice left there by a daemon that could write it (as root, before) is what a trainer
    # reads first, whatever this one writes elsewhere: an old rebalance for a spot notice.
    left = (f"; the {NOTICE_FILE_NAME} left there is what a trainer reads"
            if os.path.lexists(directory / NOTICE_FILE_NAME) else "")
    return directory, (f"owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:04o}, "
                       f"not writable by uid {uid}: make it writable by uid {uid}, "
                       f"or set hooks.notice_file{left}")
