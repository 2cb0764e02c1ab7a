"""`spotwatch check`: the preflight checks, one line each; exit 1 if any failed."""

from __future__ import annotations

import argparse

from spotwatch.aws.preflight import failures, run_checks
from spotwatch.commands import load
from spotwatch.config import require_notice_file_place
from spotwatch.console import print_line
from spotwatch.state import StateDir


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args, uploads=False)
    require_notice_file_place(config)
    StateDir(config.state_dir).ensure()  # where `run` keeps its ledger: refused as it would be
    results = run_checks(config, bucket)
    for result in results:
        print_line(f"{result.symbol}  {result.name:<16} {result.detail}")
    return 1 if failures(results) else 0
