"""Running one client command and measuring it; medians and paired ratios over rounds."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

LAUNCHER = Path(__file__).resolve().parent / "launch.py"
MiB = 2**20
GiB = 2**30
T = TypeVar("T")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Usage:
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float


class ToolFailed(RuntimeError):
    pass


def run(command: Command) -> Usage:
    """Run to completion: wall time, CPU (user + sys) and peak RSS of the client.

    The command starts from bench/launch.py, a small process that measures it: CPU covers
    the tool with every descendant it waited for (a tool that runs helpers is measured
    whole); peak RSS is the largest single process of that tree, within about 8 MiB (the
    launcher's own size, which the high-water mark inherits)."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), str(write_end), *command.argv],
            env=command.env, stdout=subprocess.DEVNULL, stderr=errors, pass_fds=(write_end,))
        os.close(write_end)
        with os.fdopen(read_end) as report:
            measured = report.read().split()
        if process.wait() != 0 or len(measured) != 3:
            errors.seek(0)
            raise ToolFailed(f"{' '.join(command.argv[:3])} exited {process.returncode}: "
                             f"{errors.read().decode(errors='replace')[-2000:]}")
    seconds, cpu_seconds, maxrss_kib = map(float, measured)
    return Usage(seconds, cpu_seconds, maxrss_kib / 1024)


def rotated(items: Sequence[T], round_number: int) -> list[T]:
    """Round r starts at item r: no tool always runs first, or always after the same one."""
    shift = round_number % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": list(values)}


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, float]:
    """Theirs over ours, round by round, then the median: the shared machine's speed drifts
    over minutes, and tools run in the same round saw the same machine."""
    ratios = [t / o for o, t in zip(ours, theirs, strict=True) if o > 0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def write_random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        left = size
        while left:
            block = min(left, 16 * MiB)
            handle.write(os.urandom(block))
            left -= block


def tree_bytes(root: Path) -> tuple[int, int]:
    """Files and bytes under `root`."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def set_aside(root: Path, kept: Path) -> None:
    """Frees a download's bytes but keeps its files until the run ends (the caller's temporary
    directory goes then): moved under `kept`, each emptied. Deleting them between rounds made
    the next download's file creation the thing measured: ext4 without a journal (this
    machine's) passes over every inode deleted in the last minute on each create, so 2,000
    files took 0.9-2.7 s to restore, for either tool, depending on what was deleted before."""
    kept.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=kept))
    for path in root.rglob("*"):
        if path.is_file():
            os.truncate(path, 0)
    root.rename(aside / root.name)


def backdate(root: Path, seconds: float = 60) -> None:
    """Data at rest, as the other tools assume: spotwatch waits quiet_seconds for a file
    written moments ago and never seen closed, in case it is still being written."""
    moment = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (moment, moment))
