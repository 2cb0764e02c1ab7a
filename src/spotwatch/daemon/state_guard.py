"""Keeps the running daemon's hold on its state directory: the lock on the file now at
<state>/lock, whatever removed the directory meanwhile (rm -rf, tmpfiles cleaning /tmp)."""

from __future__ import annotations

import time

from spotwatch.errors import SpotwatchError
from spotwatch.logs import get_logger
from spotwatch.state import StateDir, StateLock

log = get_logger("spotwatch.daemon")

CHECK_EVERY_SECONDS = 1.0


class StateGuard:
    """Invariant: one daemon per state directory, while it runs (see StateLock). A lock file
    removed or replaced under the running daemon would let a second daemon, or a one-shot
    `spotwatch flush`, start beside it (both uploading and sealing the same keys, either
    pruning) and `spotwatch status` call it not running. So, every CHECK_EVERY_SECONDS, the
    daemon checks that the file at <state>/lock is the one it locked; if not, it makes the
    directory again (as at start) and locks the new file, without waiting. Held by another
    process meanwhile: an error naming it, a degraded reason while it lasts, and this daemon
    goes on uploading (nothing is dropped), taking the lock as soon as it is free.

    What the removed directory held is gone: the ledger of uploaded files (the daemon goes on
    with the copy it has open, unlinked, until it exits), the notices acted on, the node id."""

    def __init__(self, state: StateDir, lock: StateLock) -> None:
        self._state = state
        self._lock = lock
        self._due = time.monotonic() + CHECK_EVERY_SECONDS
        self._lost: str | None = None  # why the lock is not held, as logged

    @property
    def held(self) -> bool:
        """Whether the last check found the lock held: only then is status.json this
        daemon's to write (it counts as the word of the lock's holder)."""
        return self._lost is None

    def degraded_reason(self) -> str | None:
        return self._lost

    def check_when_due(self) -> None:
        if time.monotonic() >= self._due:
            self.check()
            self._due = time.monotonic() + CHECK_EVERY_SECONDS

    def check(self) -> None:
        if self._lock.is_current():
            return
        path = self._state.path
        try:
            self._state.make()  # with the permissions it is made with at start
            holder = self._lock.retake()
        except (OSError, SpotwatchError) as exc:
            error = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._lose(f"state_dir_unusable: state directory {path} was removed and cannot be "
                       f"made again ({error}): nothing keeps a second spotwatch from starting",
                       "state_dir_unusable", error=error)
            return
        if holder is not None:
            self._lose(f"state_dir_taken: another spotwatch (pid {holder}) holds state "
                       f"directory {path}, made again after it was removed; this daemon goes "
                       "on uploading", "state_dir_taken",
                       holder_pid=int(holder) if holder.isdigit() else holder)
            return
        self._lost = None
        log.warning("state_dir_recreated", path=str(path),
                    detail="the state directory or its lock file was removed while the daemon "
                    "ran; its lock is held again, on a new file. What the directory held is "
                    "gone: the ledger of uploaded files (this daemon uses its open copy until "
                    "it exits), so after a restart files already in S3 may be uploaded again")

    def _lose(self, reason: str, event: str, **fields: object) -> None:
        if reason != self._lost:  # once per cause, not every check
            log.error(event, path=str(self._state.path), **fields,
                      detail="a second spotwatch may upload and seal the same keys beside this "
                      "daemon; the lock is tried again every check and held once it can be")
        self._lost = reason
