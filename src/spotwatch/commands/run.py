"""`spotwatch run`: the preflight checks, then the daemon until it is stopped."""

from __future__ import annotations

import argparse

from spotwatch.aws.preflight import checks_within
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.commands import load
from spotwatch.config import require_notice_file_place
from spotwatch.daemon.loop import Daemon
from spotwatch.daemon.startup import StartChecks


def run(args: argparse.Namespace) -> int:
    """A refusal of the checks ends `run` (SpotwatchError); while S3 is only unreachable the
    daemon waits for them, telling the trainer of notices meanwhile (see Daemon.run)."""
    config, bucket = load(args)
    require_notice_file_place(config)
    client = make_s3_client(resolve_region(config), config.transfer)
    # Bounded as `spotwatch check` is: a run S3 never answers counts as S3 unreachable, and
    # the daemon waits for S3 (status says so) instead of for the SDK's ten minutes.
    checks = StartChecks(lambda: checks_within(config, bucket, s3=client))
    return Daemon(config, bucket, client).run(checks=checks)
