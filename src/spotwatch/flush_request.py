"""`spotwatch flush` while a daemon runs: ask the daemon (SIGUSR1) and wait for its flush."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

from spotwatch.errors import SpotwatchError
from spotwatch.progress import ProgressBar
from spotwatch.state import StateDir, StateLock

POLL_SECONDS = 0.2


def request_daemon_flush(state: StateDir) -> bool:
    """False when no daemon holds the state directory; True once its flush has finished."""
    pid = StateLock(state).holder() if state.path.is_dir() else None
    if pid is None:
        return False
    if pid <= 0:
        raise SpotwatchError(f"state directory {state.path} is locked by an unknown process")
    asked_at = time.time()
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise SpotwatchError(f"not allowed to signal the running daemon (pid {pid})") from None
    progress = ProgressBar("daemon flushing", 0)
    peak = shown = 0
    while True:
        time.sleep(POLL_SECONDS)
        status = state.read_status() or {}
        finished = (status.get("last_flush") or {}).get("finished_at")
        if finished and datetime.fromisoformat(finished).timestamp() >= asked_at:
            progress.close()
            return True
        # The daemon reports what is left; the bar shows how much of the most seen is done.
        outstanding = int(status.get("outstanding_bytes") or 0)
        peak = max(peak, outstanding)
        progress.grow_to(peak)
        progress(peak - outstanding - shown)
        shown = peak - outstanding
        if StateLock(state).holder() is None:
            raise SpotwatchError(f"the daemon (pid {pid}) stopped before its flush finished")
