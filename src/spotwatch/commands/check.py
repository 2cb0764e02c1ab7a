"""`spotwatch check`: the preflight checks, one line each; exit 1 if any failed."""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from spotwatch.aws.preflight import CheckResult, failures, run_checks, write_probe_key
from spotwatch.commands import load
from spotwatch.config import Config, require_notice_file_place
from spotwatch.console import print_line
from spotwatch.daemon.hooks import passed_over_place
from spotwatch.interruption import default_notice_file
from spotwatch.state import StateDir

# How long `spotwatch check` waits for its S3 checks.
CHECK_SECONDS = 30.0


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args, uploads=False)
    require_notice_file_place(config)
    # Where `run` keeps its ledger: refused as `run` would refuse it, and never made here.
    StateDir(config.state_dir).check_usable()
    results = _checks_within(config, bucket, CHECK_SECONDS) + _notice_place(config)
    for result in results:
        print_line(f"{result.symbol}  {result.name:<16} {result.detail}")
    return 1 if failures(results) else 0


def _checks_within(config: Config, bucket: str, seconds: float) -> list[CheckResult]:
    """The checks, or those that answered within `seconds` and one failure that says what
    did not: S3 taking requests and never answering would hold each check for the SDK's
    timeouts and retries, minutes in all, and a preflight must answer. The checks left
    running end with the process."""
    answer: Future[list[CheckResult]] = Future()
    found: list[CheckResult] = []

    def checks() -> None:
        try:
            answer.set_result(run_checks(config, bucket, found=found))
        except BaseException as exc:  # raised again below, on the command's thread
            answer.set_exception(exc)

    threading.Thread(target=checks, name="checks", daemon=True).start()
    try:
        return answer.result(timeout=seconds)
    except FutureTimeout:
        answered = list(found)
    detail = f"S3 did not answer within {seconds:g} s (s3://{bucket})"
    names = {result.name for result in answered}
    if "encryption" in names and "write" not in names:
        # check_write runs next: its probe object may be written and never deleted.
        detail += (f"; the write check's probe object may be left at "
                   f"s3://{bucket}/{write_probe_key(config)}")
    return [*answered, CheckResult("bucket", False, detail, unreachable=True)]


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
