"""`spotwatch restore`: the restore itself is spotwatch.sync.restore; this reports it."""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from spotwatch.commands import load
from spotwatch.config import JobSettings
from spotwatch.console import names, print_line
from spotwatch.errors import ConfigError
from spotwatch.keys import is_reserved, is_utf8, set_name_of
from spotwatch.logs import printable_path
from spotwatch.sync.restore.run import restore
from spotwatch.sync.sets.manifest import LinkEntry


def run(args: argparse.Namespace) -> int:
    if args.set_name is not None and not is_utf8(args.set_name):
        raise ConfigError(f"--set {printable_path(args.set_name)}: the name is not valid UTF-8, "
                          "and such names are never uploaded, so no set has it")
    if args.set_name is not None and not is_set_name(args.set_name):
        raise ConfigError(f"--set takes the name of one checkpoint set (a top-level file or "
                          f"directory name such as step_1000), got {args.set_name!r}")
    config, bucket = load(args, uploads=False)
    if args.node_rank is not None:
        _check_node_rank(args.node_rank, config.job)
    with _stopped_as_by_ctrl_c():
        report = restore(config, bucket, args.to, args.set_name, args.prefix, args.node_rank)
    passed_over = (f"; newer sets passed over: {names(report.passed_over)}"
                   if report.passed_over else "")
    passed_over += (f"; not tried, their manifest cannot be read: {names(report.unreadable)}"
                    if report.unreadable else "")
    companions = (f"; with {names(report.companions)} beside it"
                  if report.companions else "")
    companions += "".join(f"; {name} not restored beside it (incomplete or corrupt in S3)"
                          for name in report.companions_skipped)
    repointed = "".join(f"; {change.companion} now names {change.new} (was {change.old})"
                        for change in report.repointed)
    links = "".join(f"; link {link.path} -> {link.target}" for link in report.links)
    links += "".join(f"; {link.path} restored as {_restored_as(link)} (its link -> "
                     f"{link.target} leads to nothing restored)" for link in report.as_files)
    links += "".join(f"; link {link.path} -> {link.target} not made (see the warning)"
                     for link in report.not_made)
    if report.replaced:
        newer = (f", {len(report.replaced_newer)} of them changed after the set was sealed: "
                 f"{names(report.replaced_newer[:5])}" if report.replaced_newer else "")
        links += f"; {len(report.replaced)} local files that differed replaced{newer}"
    if report.not_in_set:
        links += (f"; {len(report.not_in_set)} files in its directory that it does not list, "
                  f"left as they were: {names(report.not_in_set[:5])}")
    if report.higher_steps:
        links += (f"; higher steps of its series, dated older: {names(report.higher_steps)} "
                  f"(--set {shlex.quote(report.higher_steps[0])} restores it)")
    print_line(f"restored {report.set_name} into {report.destination}: {report.downloaded} "
               f"files downloaded ({report.bytes / 2**20:.1f} MiB), {report.skipped} already "
               f"present{companions}{repointed}{links}{passed_over}")
    return 0


def _restored_as(link: LinkEntry) -> str:
    """What a link restored without its target became (RestoreReport.as_files)."""
    return "a file" if link.file is not None else f"a directory of {len(link.files)} files"


@contextmanager
def _stopped_as_by_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (a supervisor's stop, `timeout`, a closed session) end a restore as
    Ctrl-C does: its downloads stop, and its temporaries and the folders made for them are
    removed; their default action ended the process on the spot and left partial downloads
    beside the targets."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt()

    stopping = (signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.signal(number, stop) for number in stopping}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _check_node_rank(rank: int, job: JobSettings) -> None:
    if job.nodes is None:
        raise ConfigError("--node-rank needs a multi-node job config (job.id and job.nodes, "
                          "or SPOTWATCH_JOB_ID and SPOTWATCH_JOB_NODES)")
    if not 0 <= rank < job.nodes:
        raise ConfigError(f"--node-rank must be between 0 and {job.nodes - 1} "
                          f"(job.nodes is {job.nodes}), got {rank}")


def is_set_name(name: str) -> bool:
    """One path component below a watched directory, outside spotwatch's own key space."""
    return name not in ("", ".", "..") and set_name_of(name) == name and not is_reserved(name)
