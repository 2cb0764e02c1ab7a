"""`spotwatch flush`: upload everything pending, then exit.

While a daemon runs, ask it (SIGUSR1) and wait for its flush; otherwise flush in this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.aws.preflight import CHECK_SECONDS, check_destination, within
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.bucket import NO_BUCKET, NoBucket
from spotwatch.commands import load_optional_bucket
from spotwatch.commands.daemon_dir import daemons_state_dir
from spotwatch.commands.status import (
    HEALTHY_WITHIN_SECONDS,
    refuse_another_bucket,
    running_report,
    stalled,
)
from spotwatch.config import Config
from spotwatch.console import names, print_error
from spotwatch.daemon.loop import Daemon
from spotwatch.daemon.startup import Verdict
from spotwatch.errors import SpotwatchError
from spotwatch.logs import get_logger
from spotwatch.model import Outcome, UploadResult
from spotwatch.progress import ProgressBar
from spotwatch.state import StateDir, StateLock, lock_holder
from spotwatch.sync.engine import SyncEngine

POLL_SECONDS = 0.2


def run(args: argparse.Namespace) -> int:
    # A flush through the running daemon needs no bucket (the systemd unit names it to the
    # daemon alone); a flush of its own does.
    # A flush of its own waits for S3 up to sync.stop_timeout from here, the checks before it
    # included: a shutdown script budgets its time by it.
    began = time.monotonic()
    config, named = load_optional_bucket(args, uploads=True)
    bucket = named.name if named is not None else None
    # Invariant: a one-shot flush outlives another `spotwatch flush` asking it (SIGUSR1, which
    # would end it): that one waits for this flush's record as it would for a daemon's.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    state = daemons_state_dir(config)
    refuse_another_bucket(named, running_report(state))
    delegated = request_daemon_flush(state)
    if delegated is not None:
        return report_left_behind(delegated, "the daemon's flush")
    if bucket is None:
        raise NoBucket(NO_BUCKET)
    client = make_s3_client(resolve_region(config), config.transfer)
    _refuse_destination(config, bucket, client)
    bar = ProgressBar("flushing", 0)
    # No terminal: no bar, so no per-chunk callbacks or byte sums either.
    daemon = Daemon(config, bucket, client)
    outcome = daemon.flush_once(BarWatcher(bar) if bar.enabled else None,
                                until=began + config.sync.stop_timeout)
    get_logger("spotwatch").info(
        "flush_summary", files=outcome.files, bytes=outcome.bytes, failed=outcome.failed)
    return max(outcome.exit_code, report_left_behind(daemon.flushes.last or {}, "the flush"))


def _refuse_destination(config: Config, bucket: str, client: Any) -> None:
    """Invariant: a one-shot flush uploads only where `spotwatch run` would: a bucket in
    another region or a public one is refused before anything is uploaded. S3 not answering
    is no refusal: the flush's own retries meet it, and say so."""
    expected = resolve_region(config)
    try:
        # Within the flush's own time at most: S3 taking requests and never answering would
        # hold a GetBucketLocation for the SDK's ten minutes, past any deadline.
        answered, results = within(min(CHECK_SECONDS, config.sync.stop_timeout),
                                   lambda: check_destination(client, bucket, config, expected))
    except (BotoCoreError, ClientError):
        return
    if not answered or results is None:
        return
    refused = Verdict(results).refusal
    if refused is not None:
        raise SpotwatchError(f"refusing to flush: {refused.name}: {refused.detail}")


# What a flush's record names that it could not protect at all, and how the error line says it.
_UNPROTECTED = (
    ("missing_dirs", "watched directories not there (not made or mounted yet)"),
    ("unreadable_dirs", "directories spotwatch may not read, their files not uploaded"),
    ("refused_files", "files whose names S3 cannot take, their sets left without a manifest"),
    ("incomplete_sets", "sets left without a manifest, a file they need not in S3"),
)


def report_left_behind(record: dict[str, Any], whose: str) -> int:
    """1, with one line saying all of it, when the flush was cut short, left failing files or
    files still being written behind, or could not protect some at all; else 0. Invariant: an
    exit 1 of `spotwatch flush` always says why, whether this process or the daemon flushed."""
    reasons = []
    if record.get("timed_out") and (record.get("cut_short_by_stop")
                                    or record.get("reason") == "shutdown"):  # older daemons
        reasons.append(f"{whose} was cut short by the daemon's stop (sync.stop_timeout) with "
                       f"{record.get('pending_files', 0)} files not yet durable in S3")
    elif record.get("timed_out"):
        reasons.append(f"{whose} reached its time limit (a notice's deadline, else "
                       f"sync.stop_timeout from its start) with {record.get('pending_files', 0)}"
                       f" files not yet durable in S3 (still uploading: is S3 answering?)")
    if record.get("failed"):
        because = record.get("failed_because")
        reasons.append(f"{whose} left {record['failed']} failing files: "
                       f"{names(record.get('failed_files', []))}"
                       + (f" (the first failed with: {because})"
                          if isinstance(because, str) else ""))
    reasons += [f"{record.get(f'{kind}_count', len(record[kind]))} {what}: "
                f"{names(record[kind])}"
                for kind, what in _UNPROTECTED if record.get(kind)]
    if record.get("still_written"):
        reasons.append(f"{whose} stopped waiting for {record['still_written']} files still "
                       f"being written: {names(record.get('still_written_files', []))}")
    if not reasons:
        return 0
    print_error("; ".join(reasons))
    return 1


class BarWatcher:
    """Shows a one-shot flush's bytes and files on a progress bar."""

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar

    def attach(self, engine: SyncEngine) -> None:
        engine.uploader.on_progress = self._bar
        engine.add_observer(self._file_done)

    def _file_done(self, result: UploadResult) -> None:
        if result.outcome is Outcome.DONE:
            self._bar.file_done()

    def update(self, engine: SyncEngine) -> None:
        self._bar.grow_to(engine.totals.bytes + engine.outstanding_bytes())

    def close(self) -> None:
        self._bar.close()


def request_daemon_flush(state: StateDir) -> dict[str, Any] | None:
    """None when no daemon holds the state directory; else, once its flush has finished,
    the daemon's record of it (`failed` counts the files it left behind)."""
    pid = lock_holder(state)
    if pid is None:
        return None
    if pid <= 0:
        raise SpotwatchError(f"state directory {state.path} is locked by an unknown process")
    asked_at = time.time()
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise SpotwatchError(f"not allowed to signal the running daemon (pid {pid})") from None
    progress = ProgressBar("daemon flushing", 0)
    peak = shown = 0
    while True:
        time.sleep(POLL_SECONDS)
        status = state.read_status() or {}
        last_flush: dict[str, Any] = status.get("last_flush") or {}
        finished = last_flush.get("finished_at")
        if finished and datetime.fromisoformat(finished).timestamp() >= asked_at:
            progress.close()
            return last_flush
        # The daemon reports what is left; the bar shows how much of the most seen is done.
        outstanding = int(status.get("outstanding_bytes") or 0)
        peak = max(peak, outstanding)
        progress.grow_to(peak)
        progress(peak - outstanding - shown)
        shown = peak - outstanding
        if StateLock(state).holder() is None:
            raise SpotwatchError(f"the daemon (pid {pid}) stopped before its flush finished")
        _give_up_if_stalled(status, pid)
        _give_up_if_waiting_for_s3(status, pid)


def _give_up_if_stalled(status: dict[str, Any], pid: int) -> None:
    """Invariant: a flush waits for a daemon only while it reports. One that reported and
    then went silent (stuck, stopped, or unable to write its state directory) would be waited
    for forever; `spotwatch status` calls it stalled, and so does this, with exit 1. A daemon
    still starting has not reported yet and is waited for."""
    if status.get("pid") == pid and stalled(status):
        raise SpotwatchError(f"the daemon (pid {pid}) has not reported for "
                             f"{HEALTHY_WITHIN_SECONDS:.0f}s (stalled): its flush cannot be "
                             f"waited for")


def _give_up_if_waiting_for_s3(status: dict[str, Any], pid: int) -> None:
    """Invariant: a flush does not wait without a word, nor for good, for a daemon whose start
    waits for S3 to become reachable: the flush asked of it starts only once the preflight
    checks pass. Exit 1, with why; the daemon keeps the request and flushes then."""
    waiting = status.get("waiting_for_s3") if status.get("pid") == pid else None
    if isinstance(waiting, dict):
        raise SpotwatchError(f"the daemon (pid {pid}) is waiting for S3, unreachable since it "
                             f"started ({waiting.get('reason')}): it flushes once S3 answers "
                             "and its preflight checks pass, nothing is durable now")
