"""`spotwatch run`: the preflight checks, then the daemon until it is stopped."""

from __future__ import annotations

import argparse

import structlog

from spotwatch.aws.preflight import failures, run_checks
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.commands import load
from spotwatch.daemon.loop import Daemon
from spotwatch.errors import SpotwatchError


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args)
    log = structlog.get_logger("spotwatch")
    client = make_s3_client(resolve_region(config), config.transfer)
    results = run_checks(config, bucket, client)
    for result in results:
        log.info("check", name=result.name, ok=result.ok, detail=result.detail)
    refused = failures(results)
    if refused:
        raise SpotwatchError(f"refusing to start: {refused[0].name}: {refused[0].detail}")
    return Daemon(config, bucket, client).run()
