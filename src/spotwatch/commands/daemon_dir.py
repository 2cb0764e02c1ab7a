"""Which state directory a running daemon holds, for the commands that speak to it (status,
flush) from another user's shell."""

from __future__ import annotations

import os
from pathlib import Path

from spotwatch.config import Config
from spotwatch.errors import SpotwatchError
from spotwatch.state import StateDir, default_state_dir, lock_holder

# Where a daemon run as root keeps its state (the shipped unit's StateDirectory too).
SYSTEM_STATE_DIR = Path("/var/lib/spotwatch")


def daemons_state_dir(config: Config) -> StateDir:
    """The configured state directory; but for a user who configured none (their own default)
    and runs no daemon there, the system one where a daemon holds it: a trainer running as
    another user than the root daemon of the systemd unit otherwise saw no daemon, and its
    `spotwatch flush` flushed on its own beside the daemon, with a ledger of its own.

    Invariant: never silently another directory than the daemon's. One this user may not
    look into is an error naming it (sudo, or a state.dir both may read), not "not running"."""
    own = StateDir(config.state_dir)
    if (os.geteuid() == 0 or config.state_dir != default_state_dir()
            or config.state_dir == SYSTEM_STATE_DIR or lock_holder(own) is not None):
        return own
    system = StateDir(SYSTEM_STATE_DIR)
    try:
        return system if lock_holder(system) is not None else own
    except SpotwatchError:
        raise SpotwatchError(
            f"no spotwatch daemon in {own.path}, and {SYSTEM_STATE_DIR}, where one run as root "
            "(the systemd unit) keeps its state, cannot be read by this user: run this as "
            "root (sudo), or give the daemon and this user a state.dir both may read") from None
