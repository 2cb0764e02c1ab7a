"""`spotwatch check`: the preflight checks, one line each; exit 1 if any failed."""

from __future__ import annotations

import argparse

from spotwatch.aws.preflight import CheckResult, checks_within, failures
from spotwatch.commands import load
from spotwatch.config import Config, require_notice_file_place
from spotwatch.console import print_line
from spotwatch.daemon.hooks import passed_over_place
from spotwatch.interruption import default_notice_file
from spotwatch.state import StateDir
from spotwatch.sync.tracker import listing_error


def run(args: argparse.Namespace) -> int:
    # Loaded as `run` loads it: what `run` refuses at start (a watched path that is a file, a
    # job's node without a rank) is refused here with the same line and exit code.
    config, bucket = load(args)
    require_notice_file_place(config)
    # Where `run` keeps its ledger: refused as `run` would refuse it, and never made here.
    StateDir(config.state_dir).check_usable()
    results = checks_within(config, bucket) + _unreadable_watches(config) + _notice_place(config)
    for result in results:
        print_line(f"{result.symbol}  {result.name:<16} {result.detail}")
    return 1 if failures(results) else 0


def _unreadable_watches(config: Config) -> list[CheckResult]:
    """A watched directory this user may not read: the daemon starts, but uploads none of its
    files (dir_unreadable) and a flush exits 1."""
    return [CheckResult("watch dir", False, f"{watch.path}: cannot read it: {error.strerror} "
                        "(none of its files would be uploaded)")
            for watch in config.watch if (error := listing_error(watch.path)) is not None]


def _notice_place(config: Config) -> list[CheckResult]:
    """A default notice place the trainer reads but this user may not write, as the daemon
    says at start. A warning: the daemon may run as another user (root under systemd) than
    the one running the check."""
    passed = None if config.hooks.notice_file else passed_over_place(config.state_dir)
    if passed is None:
        return []
    where, why = passed
    instead = default_notice_file(config.state_dir)
    return [CheckResult("notice file", False, f"{where}: {why} (a daemon of this uid writes "
                        f"the notice to {instead}, which a trainer reading {where} never "
                        "sees)", fatal=False)]
