"""How many files the process may hold open, raised as far as it may go.

A restore on a p4d or p5 keeps about a thousand of the CRT's connections open (its 400 Gbit/s
target), each a file descriptor; the soft limit a login shell or systemd gives (1,024) made it
fail with AWS_ERROR_MAX_FDS_EXCEEDED. The hard limit is there to be used (`s5cmd`, a Go
program, runs with its soft limit raised to it), so every command starts by raising its own.
The processes it starts (the trainer's hooks) inherit the raised limit, as they would under
systemd's LimitNOFILE.
"""

from __future__ import annotations

import resource

# Raised no higher than this, even when the hard limit is unlimited: enough for any restore,
# and Linux refuses more than fs.nr_open (1,048,576 by default) anyway.
MOST_OPEN_FILES = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (at most MOST_OPEN_FILES); returns
    the soft limit now in force. A limit that cannot be raised is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MOST_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # above fs.nr_open, or a sandbox that refuses
            return soft
        return wanted
    return open_files_limit()


def open_files_limit() -> int:
    """The soft limit on open files in force (MOST_OPEN_FILES for unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MOST_OPEN_FILES if soft == resource.RLIM_INFINITY else soft
