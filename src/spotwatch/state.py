"""The state directory: ledger, status file and the lock that keeps one daemon per directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path
from stat import S_ISDIR
from typing import Any

from spotwatch.errors import ConfigError, SpotwatchError

# What `spotwatch check` writes into an existing state directory to see it takes writes.
PROBE_BYTES = 4096
# Errors that no retry mends: the directory is not this user's to write, or on a read-only
# mount. A restart (systemd's Restart=, a container's restart policy) would only repeat them,
# so they are config errors (exit 2, which the unit's RestartPreventExitStatus stops on).
_NOT_OURS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def default_state_dir() -> Path:
    """systemd's StateDirectory, else /var/lib/spotwatch for root, else the user's state dir."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/spotwatch")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spotwatch"


def write_json_atomically(target: Path, data: dict[str, Any], mode: int | None = None) -> None:
    """Readers never see a half-written file: write beside it, then rename over it.

    The file keeps mkstemp's 0600 unless a mode is given; that mode is set on the open file,
    so neither the umask nor a reader racing the rename ever sees another one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)  # e.g. a full disk: leave no debris behind
        raise


def make_shared_dirs(directory: Path) -> None:
    """Create directory and its missing parents traversable by every user (0755 whatever the
    umask, e.g. the unit's 0027), so another user's process can reach a file inside.
    Directories that already exist keep the mode their owner gave them."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        created.chmod(0o755)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.sqlite3"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def acted_notices(self) -> Path:
        return self.path / "acted_notices.json"

    @property
    def node_id(self) -> Path:
        return self.path / "node-id"

    @property
    def hook_output(self) -> Path:
        """What hooks.command and the processes it leaves write (appended)."""
        return self.path / "hook-command.log"

    def node_identity(self) -> str:
        """Who this node is to its job's peers: the host name and an id kept in the state
        directory, `<host>/<id>`. The id, not the host, tells apart two daemons on one host
        (other state directories); kept, it survives a daemon restart (no clash with its own
        earlier heartbeat); a replacement instance starts with a new disk and so a new id.
        Unwritable: an id for this run only (a restart then waits for its old claim to go
        stale)."""
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"
        try:
            kept = self.node_id.read_text().strip()
        except OSError:
            kept = ""
        if not re.fullmatch(r"[0-9a-f]{16}", kept):
            kept = secrets.token_hex(8)
            with contextlib.suppress(OSError):
                self.node_id.write_text(kept + "\n")
        return f"{host}/{kept}"

    @property
    def written_files(self) -> tuple[Path, ...]:
        """Every file a daemon reads and writes here (SQLite's -wal and -shm beside the
        ledger)."""
        ledger = self.ledger
        return (self.path / "lock", ledger, ledger.with_name(ledger.name + "-wal"),
                ledger.with_name(ledger.name + "-shm"), self.status, self.acted_notices,
                self.node_id, self.hook_output)

    def ensure(self) -> None:
        """Made if missing, writable by this process, and holding no file of its that this
        process cannot read and write: else one line naming it.

        Invariant: a daemon starts only on state it can keep. A file of another user (a run as
        root before, or its kill -9 leaving root's WAL files) would fail every write behind a
        healthy start: SQLite opens such a ledger read-only, an unreadable acted_notices.json
        would let hooks act again on a notice they acted on."""
        self.make()
        self._refuse_foreign_files()

    def check_usable(self) -> None:
        """As ensure(), making nothing (`spotwatch check`): a missing directory must be one
        this process could make. Made by a check as root before the unit's first start, it
        would be root's, with root's mode."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            if os.path.lexists(self.path):  # a link to nothing: `run` cannot make it either
                raise self.refused("create", _error(errno.EEXIST)) from None
            self._refuse_uncreatable()
            return
        except OSError as exc:  # a folder above it closed to this user, say
            raise self.refused("create", exc) from None
        if not S_ISDIR(found.st_mode):
            raise self.refused("create", _error(errno.EEXIST))
        self._refuse_unwritable()
        self._refuse_full()
        self._refuse_foreign_files()

    def _refuse_full(self) -> None:
        """A page written and removed again: a full disk (or quota) refuses `run`'s first
        write, the lock, so the check refuses it too; access() says nothing of space."""
        try:
            with tempfile.TemporaryFile(dir=self.path, prefix=".spotwatch-check-") as probe:
                probe.write(b"\0" * PROBE_BYTES)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            raise self.refused("write", exc) from None

    def _refuse_foreign_files(self) -> None:
        for path in self.written_files:
            if not _readable_and_writable(path):
                uid = os.geteuid()
                raise ConfigError(
                    f"cannot use state directory {self.path}: {path.name} is owned by uid "
                    f"{_owner(path)} and uid {uid} cannot read and write it; fix: chown -R "
                    f"{uid} {self.path}")

    def make(self) -> None:
        """Made if missing, and writable by this process: else one line naming it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.refused("create", exc) from None
        self._refuse_unwritable()

    def _refuse_unwritable(self, directory: Path | None = None, verb: str = "write") -> None:
        directory = directory or self.path
        if not os.access(directory, os.W_OK | os.X_OK):  # says EROFS for a read-only mount too
            error = OSError(errno.EROFS if _read_only(directory) else errno.EACCES, "")
            raise self.refused(verb, error)

    def _refuse_uncreatable(self) -> None:
        """The nearest existing directory above a missing state directory must take it."""
        for above in self.path.absolute().parents:
            try:
                found = os.stat(above)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self.refused("create", exc) from None
            if not S_ISDIR(found.st_mode):
                raise self.refused("create", _error(errno.ENOTDIR))
            self._refuse_unwritable(above, "create")
            return

    def refused(self, verb: str, exc: OSError) -> SpotwatchError:
        """The one line for a state directory this process cannot use: a config error when
        it never will be (see _NOT_OURS), naming the key that moves it."""
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        line = f"cannot {verb} state directory {self.path}: {reason}"
        if exc.errno not in _NOT_OURS:
            return SpotwatchError(line)
        return ConfigError(f"{line} (uid {os.geteuid()}; make it writable by this user, or "
                           "set state.dir)")

    def read_status(self) -> dict[str, Any] | None:
        """The daemon's last report; None when there is none. One this user may not read is
        an error naming it, never taken for a daemon that has not reported yet."""
        try:
            text = self.status.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpotwatchError(f"cannot read status file {self.status}: {exc.strerror}"
                                 ) from None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


class StateLock:
    """An exclusive flock on <state>/lock, released when the process exits.

    Invariant: one daemon per state directory, while it runs. The flock holds it only while
    <state>/lock is the file locked: the directory removed (rm -rf, tmpfiles cleaning /tmp) or
    the file replaced, the next process finds no lock, or a new one, and takes it. So the
    running daemon checks that the file is still its own (is_current) and otherwise locks the
    new one (retake): daemon/state_guard.py."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._path = state.path / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            holder = self._take()
        except OSError as exc:  # e.g. a volume mounted for the state that another user owns
            raise self._state.refused("write", exc) from None
        if holder is not None:
            raise SpotwatchError(
                f"another spotwatch (pid {holder}) is using state directory {self._path.parent}")

    def retake(self) -> str | None:
        """Lock the file now at <state>/lock (made if missing), without waiting: None once it
        is held, else the pid of the process holding it ("?": unknown). The lock held so far
        (on a removed or replaced file) is let go only once the new one is held. OSError: the
        file cannot be made."""
        return self._take()

    def _take(self) -> str | None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            return holder
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self.release()
        self._fd = fd
        return None

    def is_current(self) -> bool:
        """Whether the file at <state>/lock is the one this process holds locked (the same
        device and inode): False once it was removed or replaced, or when none is held."""
        if self._fd is None:
            return False
        try:
            on_disk = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:  # e.g. the directory made unsearchable: nothing to tell, nor to fix
            return True
        held = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def holder(self) -> int | None:
        """The pid of the process holding the lock, or None when nobody does."""
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a state directory this user may not read
            raise SpotwatchError(f"cannot read state directory {self._path.parent}: "
                                 f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_holder(state: StateDir) -> int | None:
    """The pid holding the state directory's lock (-1: one not written down); None when
    nobody does, or there is no such directory."""
    return StateLock(state).holder() if state.path.is_dir() else None


def _error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _readable_and_writable(path: Path) -> bool:
    """True for a file that is missing (made when needed) or this process may read and write."""
    try:
        return os.access(path, os.R_OK | os.W_OK) or not path.exists()
    except OSError:  # e.g. a name too long: the write itself will say
        return True


def _owner(path: Path) -> int | str:
    try:
        return path.stat().st_uid
    except OSError:
        return "?"
