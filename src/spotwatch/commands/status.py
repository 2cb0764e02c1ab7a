"""`spotwatch status`: what the daemon last reported, plus what the ledger holds."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from spotwatch.bucket import NO_BUCKET, NamedBucket, NoBucket
from spotwatch.commands import load_optional_bucket
from spotwatch.commands.daemon_dir import daemons_state_dir
from spotwatch.config import Config
from spotwatch.console import names, one_line, print_text
from spotwatch.errors import ConfigError
from spotwatch.state import StateDir, lock_holder
from spotwatch.sync.ledger import Ledger

if TYPE_CHECKING:
    from spotwatch.sync.scan_rule import NotInS3


def run(args: argparse.Namespace) -> int:
    config, named = load_optional_bucket(args)
    report = gather_status(config, named)
    if args.healthy:
        return 0 if report["healthy"] else 1
    print_text(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0


def gather_status(config: Config, named: NamedBucket | None) -> dict[str, Any]:
    """named: None when no bucket is named to this command; the running daemon's then (its
    report names it), else a NoBucket error."""
    state = daemons_state_dir(config)
    bucket = named.name if named is not None else None
    report: dict[str, Any] = {"bucket": bucket, "state_dir": str(state.path)}
    holder = lock_holder(state)
    read_status = cache(state.read_status)  # status.json read once, wherever it is asked for
    current = _report_of(holder, read_status() if holder else None)
    report["daemon_report_unreadable"] = current is not None and not _readable(current)
    if report["daemon_report_unreadable"]:
        current = None
    if bucket is None:
        # With no spotwatch running, the last one's report names the bucket (the unit gives
        # it to the daemon alone): what a crash left behind is shown all the same.
        last = read_status() if holder is None else None
        bucket = report["bucket"] = _daemons_bucket(current or last)
    refuse_another_bucket(named, current)
    flushing_once = current is not None and current.get("role") == "flush"
    report["daemon_pid"] = None if flushing_once else holder
    report["flush_pid"] = holder if flushing_once else None
    report["daemon"] = None if flushing_once else current
    report["flush"] = current if flushing_once else None  # its pending work, shown as such
    ledger = Ledger(state.ledger, only_reading=True) if state.ledger.is_file() else None
    try:
        # With no spotwatch holding the state directory, its last report may predate files
        # written since (a kill between two reports): what is on disk is counted too.
        report["left_by_last_run"] = (
            _left_by(read_status(), _on_disk(config, ledger, bucket)) if holder is None
            else None)
        summary = ledger.summary(bucket) if ledger is not None else None
    finally:
        if ledger is not None:
            ledger.close()
    report["uploaded_objects"] = summary.objects if summary else 0
    report["uploaded_bytes"] = summary.bytes if summary else 0
    report["last_upload_at"] = summary.last_upload if summary else None
    report["healthy"] = is_healthy(report)  # the one verdict --healthy, the text and JSON give
    return report


def refuse_another_bucket(named: NamedBucket | None, current: dict[str, Any] | None) -> None:
    """Invariant: status and flush speak of one bucket. Named one the running spotwatch (the
    state lock's holder, `current` its report) does not upload to, they would mix its report
    with another bucket's uploads, or hand a flush meant for that bucket to it: a usage
    error instead, saying where the bucket was named."""
    running = current.get("bucket") if current is not None else None
    if named is None or not isinstance(running, str) or not running or running == named.name:
        return
    pid = current.get("pid") if current else None
    raise ConfigError(f"the bucket named here ({named.name}, from {named.source}) is not the "
                      f"one the running spotwatch (pid {pid}) uploads to ({running}): name "
                      "its bucket, or none")


def running_report(state: StateDir) -> dict[str, Any] | None:
    """The report of the process holding the state directory's lock, if any."""
    holder = lock_holder(state)
    return _report_of(holder, state.read_status() if holder else None)


def _daemons_bucket(current: dict[str, Any] | None) -> str:
    named = current.get("bucket") if current is not None else None
    if isinstance(named, str) and named:
        return named
    raise NoBucket(f"{NO_BUCKET} (no running daemon reports one, nor did the last one)")


def _report_of(holder: int | None, status: dict[str, Any] | None) -> dict[str, Any] | None:
    """Invariant: status.json counts only as the word of the process holding the state lock.
    A file left by a daemon that was killed is not current while its successor starts."""
    return status if holder is not None and status and status.get("pid") == holder else None


# 9999-12-31 23:59:59 UTC, the last second a date can show.
LATEST_TIMESTAMP = 253402300799


class _Notice(msgspec.Struct):
    kind: str
    detected_at: str
    deadline: str | None = None
    cancelled_at: str | None = None  # AWS withdrew it (a maintenance event cancelled)


class _Flush(msgspec.Struct):
    files: int
    bytes: int
    seconds: float
    reason: str
    timed_out: bool = False
    cut_short_by_stop: bool = False
    pending_files: int = 0
    failed: int = 0
    still_written: int = 0


class _Report(msgspec.Struct):
    """What this command reads of status.json; other fields may come and go."""

    updated_at: Annotated[float, msgspec.Meta(ge=0, le=LATEST_TIMESTAMP)]
    pending_files: int
    pending_bytes: int
    uploading: int
    unsettled_files: int
    retrying_files: int = 0
    failing_files: int = 0
    failing_named: list[str] = []
    failing_because: str | None = None
    role: str = "run"
    degraded: list[str] = []
    metrics_url: str | None = None
    last_notice: _Notice | None = None
    notices_in_effect: list[_Notice] = []
    last_flush: _Flush | None = None
    flushing: bool = False
    incomplete_sets: list[str] = []
    unsealed_sets: list[str] = []
    # The whole counts; the lists above name the first STATUS_NAMED_SETS_MAX (absent from a
    # report written before the lists were bounded: then the lists are whole).
    incomplete_set_count: int | None = None
    unsealed_set_count: int | None = None


class _Waiting(msgspec.Struct):
    reason: str
    since: float
    attempts: int


class _WaitingReport(msgspec.Struct):
    """A daemon whose start waits for S3 to pass the preflight checks: no engine runs yet."""

    updated_at: Annotated[float, msgspec.Meta(ge=0, le=LATEST_TIMESTAMP)]
    waiting_for_s3: _Waiting
    role: str = "run"
    degraded: list[str] = []
    last_notice: _Notice | None = None
    notices_in_effect: list[_Notice] = []
    metrics_url: str | None = None


# How many files a status with no daemon running looks at, at most: a health check must not
# stat a huge tree (past it the count is a lower bound, and says so).
STATUS_COUNT_MAX_FILES = 100_000


def _on_disk(config: Config, ledger: Ledger | None, bucket: str) -> NotInS3:
    # Imported here: a status with a daemon running (a health check) needs no tracker.
    from spotwatch.sync.scan_rule import count_not_in_s3

    return count_not_in_s3(config, ledger, bucket, STATUS_COUNT_MAX_FILES)


def _left_by(status: dict[str, Any] | None, on_disk: NotInS3) -> dict[str, Any] | None:
    """What a spotwatch no longer running left not durable (a stop cut short by
    sync.stop_timeout, a kill): files and sets the next start uploads and seals. Invariant 8:
    files_not_in_s3 (= pending_files + unsettled_files) is the larger of what its last report
    said and what is on disk now and not in the ledger as it is (its report may predate files
    written since). None when both say nothing is left."""
    left = _reported(status)
    readable = bool(status) and _readable(status or {})
    unsettled = 0 if left is None else int(left.get("unsettled_files", 0))
    reported = 0 if left is None else int(left.get("pending_files", 0)) + unsettled
    short = not on_disk.complete or bool(on_disk.unreadable_dirs)  # a lower bound
    if left is None and not on_disk.files and not short:
        return None
    by_disk = on_disk.files > reported or (left is not None and "not_counted" in left)
    result: dict[str, Any] = {
        "pending_files": 0, "unsettled_files": 0, "unsealed_sets": [], "unsealed_set_count": 0,
        "reported_at": (status or {}).get("updated_at") if readable else None,
        **(left or {}),
        "files_not_in_s3": max(on_disk.files, reported), "at_least": short,
        "reported_files": None if not readable or "waiting_for_s3" in (status or {})
        else reported,
        "counted": "on disk now" if by_disk else "last report", "on_disk": asdict(on_disk)}
    if by_disk:
        result["pending_files"] = on_disk.files - min(unsettled, on_disk.files)
        result["unsettled_files"] = min(unsettled, on_disk.files)
    return result


def _reported(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a daemon no longer running last reported as not durable yet. None when it left
    nothing, or its report cannot be read."""
    if not status or not _readable(status):
        return None
    if "waiting_for_s3" in status:
        # It stopped before its checks passed: it never counted what the watched directories
        # hold that is not in S3, which is not knowing, not nothing.
        return {"not_counted": True, "waiting_for_s3": status["waiting_for_s3"],
                "reported_at": status.get("updated_at")}
    pending = int(status.get("pending_files") or 0)
    # A file still being written when the daemon went: the next start uploads it too.
    unsettled = int(status.get("unsettled_files") or 0)
    unsealed = list(status.get("unsealed_sets") or [])
    unsealed_count = set_count(status, "unsealed")
    if not pending and not unsettled and not unsealed_count:
        return None
    return {"pending_files": pending, "unsettled_files": unsettled, "unsealed_sets": unsealed,
            "unsealed_set_count": unsealed_count, "reported_at": status.get("updated_at")}


def set_count(status: dict[str, Any], kind: str) -> int:
    """How many sets status.json reports as `kind` (incomplete or unsealed): its count, or
    the length of its list where it has no count."""
    count = status.get(f"{kind}_set_count")
    return int(count) if isinstance(count, int) else len(status.get(f"{kind}_sets") or [])


def _readable(status: dict[str, Any]) -> bool:
    """Invariant: status shows only a report it can read. One written by another version of
    the daemon, or damaged, is said to be so (and not healthy), never a traceback."""
    shape = _WaitingReport if "waiting_for_s3" in status else _Report
    try:
        msgspec.convert(status, shape)
    except msgspec.ValidationError:
        return False
    return True


# The daemon rewrites its status every second; this much silence means it is stuck.
HEALTHY_WITHIN_SECONDS = 30.0


def is_healthy(report: dict[str, Any]) -> bool:
    """A daemon runs, reported recently, and is not degraded (S3 failing or IMDS unreachable
    for a while: the same verdict as /healthz), nor holding a set it cannot seal."""
    daemon = report.get("daemon")
    if not report.get("daemon_pid") or not daemon or daemon.get("degraded"):
        return False
    return not stalled(daemon) and not daemon.get("incomplete_sets")


def stalled(daemon: dict[str, Any]) -> bool:
    """The daemon holding the lock has not rewritten its status for too long."""
    return time.time() - float(daemon.get("updated_at", 0)) >= HEALTHY_WITHIN_SECONDS


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    when = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{when} ({time.time() - timestamp:.0f}s ago)"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _from_peer(notice: dict[str, Any]) -> str:
    return f" from node {notice.get('peer_rank')}" if notice.get("source") == "peer" else ""


def _health(daemon: dict[str, Any]) -> str:
    if stalled(daemon):
        return f"stalled: no report since {_ago(float(daemon.get('updated_at', 0)))}"
    degraded = daemon.get("degraded")
    if degraded:
        return "degraded: " + "; ".join(degraded)
    # Invariant: never "ok" while a set cannot be sealed (its checkpoint is not protected).
    incomplete = set_count(daemon, "incomplete")
    return f"not ok: {incomplete} sets incomplete (see below)" if incomplete else "ok"


def _notice_line(notice: dict[str, Any] | None) -> str:
    if not notice:
        return "none"
    cancelled = (f", cancelled at {notice['cancelled_at']}: no longer in effect"
                 if notice.get("cancelled_at") else "")
    deadline = (f"deadline {notice['deadline']}" if notice.get("deadline")
                else "no deadline given")
    return (f"{notice['kind']}{_from_peer(notice)} at {notice['detected_at']} ({deadline}"
            f"{cancelled})")


def _notice_lines(daemon: dict[str, Any]) -> list[str]:
    """The daemon's last_notice is the notice in effect due first, if any (see
    Daemon.notice_report); the others in effect follow, so none is hidden."""
    lines = ["last notice:  " + _notice_line(daemon.get("last_notice"))]
    others = (daemon.get("notices_in_effect") or [])[1:]
    if others:
        lines.append("also in effect: " + "; ".join(_notice_line(other) for other in others))
    return lines


def _flush_line(flush: dict[str, Any]) -> str:
    """Invariant: a flush that timed out, was cut short or left files behind never reads as a
    success."""
    left = []
    if flush.get("cut_short_by_stop"):
        left.append(f"cut short by the daemon's stop with {flush.get('pending_files', 0)} "
                    "files not durable when it ended")
    elif flush.get("timed_out"):
        left.append(f"timed out with {flush.get('pending_files', 0)} files not durable when "
                    "it ended")
    margin = flush.get("deadline_margin_seconds")
    if margin is not None and margin < 0 and not left and flush.get("files"):
        # Every file durable, but after the deadline: on the instance, too late. A flush
        # with nothing to upload (a maintenance window already begun) left nothing late.
        left.append(f"finished {-margin:g}s after its deadline")
    if flush.get("failed"):
        left.append(f"{flush['failed']} files failing")
    if flush.get("still_written"):
        left.append(f"{flush['still_written']} files still being written not waited for")
    outcome = f": INCOMPLETE, {names(left)}" if left else ""
    return (f"{flush['files']} files, {_size(flush['bytes'])} in {flush['seconds']}s "
            f"({flush['reason']}){outcome}")


def _pending_line(process: dict[str, Any]) -> str:
    """What the daemon, or a one-shot flush, has not made durable yet; the files failing by
    name, with why the first failed."""
    failing = process.get("failing_named") or []
    because = process.get("failing_because")
    named = (f"; failing: {names(failing)}"
             f"{', ...' if process.get('failing_files', 0) > len(failing) else ''}"
             f"{f' (the first: {because})' if because else ''}" if failing else "")
    return (f"pending:      {process['pending_files']} files, "
            f"{_size(process['pending_bytes'])} ({process['uploading']} uploading, "
            f"{process.get('retrying_files', 0)} waiting to retry, of which "
            f"{process.get('failing_files', 0)} failing); "
            f"{process['unsettled_files']} still being written{named}")


def _left_lines(left: dict[str, Any]) -> list[str]:
    """What a spotwatch no longer running left not in S3: the larger count, saying where it
    comes from (its last report, or the files on disk now), and what could not be counted."""
    unsealed = left["unsealed_sets"]
    sets = (f", {left['unsealed_set_count']} sets without their manifest: "
            f"{names(unsealed[:5])}" if left["unsealed_set_count"] else "")
    if left["counted"] == "last report":
        lines = [f"left behind:  {left['pending_files']} files not in S3 when it last reported "
                 f"({_ago(left['reported_at'])}) and {left['unsettled_files']} still being "
                 f"written{sets}; the next start uploads them"]
    else:
        on_disk = left["on_disk"]
        stopped = ("" if on_disk["complete"]
                   else f", stopped after {STATUS_COUNT_MAX_FILES} files looked at")
        if left.get("not_counted"):
            said = (f"; it last reported ({_ago(left['reported_at'])}) waiting for S3 at "
                    "start, before it counted the watched files")
        elif left["reported_files"] is None:
            said = "; no readable report of the last run"
        else:
            said = (f"; its last report ({_ago(left['reported_at'])}) counted "
                    f"{left['reported_files']}")
        lines = [f"left behind:  {'at least ' if left['at_least'] else ''}"
                 f"{left['files_not_in_s3']} files, {_size(on_disk['bytes'])} not in S3 "
                 f"(counted on disk now{stopped}){said}{sets}; the next start uploads them"]
    unreadable = left["on_disk"]["unreadable_dirs"]
    if unreadable:
        lines.append(f"unreadable:   {len(unreadable)} directories status may not read (their "
                     f"files are not counted above): {names(unreadable[:5])}")
    return lines


def render_status(report: dict[str, Any]) -> str:
    lines = [f"bucket:       {report['bucket']}"]
    daemon = report.get("daemon")
    if report.get("daemon_pid") and daemon and daemon.get("waiting_for_s3"):
        waiting = daemon["waiting_for_s3"]
        lines.append(f"daemon:       running (pid {report['daemon_pid']}), waiting for S3: "
                     f"unreachable at start, preflight checks pending since "
                     f"{_ago(waiting['since'])}; notices still reach the trainer, nothing "
                     f"uploads until the checks pass")
        lines.append("health:       " + _health(daemon))
        lines += _notice_lines(daemon)
    elif report.get("daemon_pid") and daemon:
        lines.append(f"daemon:       running (pid {report['daemon_pid']})")
        lines.append(_pending_line(daemon))
        lines.append("health:       " + _health(daemon))
        for problem in daemon.get("problems") or []:
            lines.append(f"PROBLEM:      {problem}")
        if daemon.get("metrics_url"):
            lines.append(f"metrics:      {daemon['metrics_url']}/metrics")
        lines += _notice_lines(daemon)
        incomplete = daemon.get("incomplete_sets") or []
        if incomplete:
            lines.append(f"incomplete:   {set_count(daemon, 'incomplete')} sets without a "
                         f"manifest (a file is not in S3): {names(incomplete[:5])}")
        unreadable = daemon.get("unreadable_dirs") or []
        if unreadable:
            lines.append(f"unreadable:   {len(unreadable)} directories spotwatch may not read "
                         f"(their files are not uploaded): {names(unreadable[:5])}")
        missing = daemon.get("missing_dirs") or []
        if missing:
            lines.append(f"missing:      {len(missing)} watched directories not there (not "
                         f"made or mounted yet): {names(missing[:5])}")
        unsealed = daemon.get("unsealed_sets") or []
        if unsealed:
            lines.append(f"unsealed:     {set_count(daemon, 'unsealed')} sets waiting for "
                         f"their manifest (restore gives their last sealed version, if any): "
                         f"{names(unsealed[:5])}")
        held = daemon.get("sealing_held")
        if isinstance(held, str):
            lines.append(f"sealing held: no part is sealed until then: {held}")
        if daemon.get("flushing"):  # last flush is the one before: never "done" meanwhile
            lines.append("flush:        running (pending files go newest set first)")
        flush = daemon.get("last_flush")
        if flush:
            lines.append("last flush:   " + _flush_line(flush))
    elif report.get("daemon_report_unreadable"):
        lines.append(f"daemon:       running (pid {report['daemon_pid']}), but its status.json "
                     f"is not one this version reads (another spotwatch version?)")
    elif report.get("flush_pid"):
        lines.append(f"daemon:       not running (a one-shot flush, pid {report['flush_pid']}, "
                     f"holds the state directory)")
        flush = report.get("flush")
        if flush and not flush.get("waiting_for_s3"):  # a readable report: the pending counts
            lines.append(_pending_line(flush))
    elif report.get("daemon_pid"):
        lines.append(f"daemon:       starting (pid {report['daemon_pid']}, no report yet)")
    else:
        lines.append("daemon:       not running")
        left = report.get("left_by_last_run")
        if left:
            lines += _left_lines(left)
    # From this state directory's ledger: the files watched here that are in S3 (uploaded,
    # restored or found sealed there), not everything under the prefix, which others share.
    lines.append(f"in S3:        {report['uploaded_objects']} objects, "
                 f"{_size(report['uploaded_bytes'])}, of the files watched here")
    lines.append(f"last upload:  {_ago(report['last_upload_at'])}")
    return "\n".join(one_line(line) for line in lines)  # a name never splits a line
