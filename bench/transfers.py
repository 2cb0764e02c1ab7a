"""Transfer scenarios: bulk upload and restore on the object store, and the S3 simulation.

Every tool runs once per round, in an order that rotates from round to round, on the same
data and the same server; rows keep each run so that ratios can be taken round by round.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import (
    DOWNLOADERS,
    P4D_TARGET_GBPS,
    RESTORE_ON_P4D,
    SPOTWATCH,
    SPOTWATCH_CRT,
    Clients,
    Store,
)
from measure import (
    GiB,
    MiB,
    Usage,
    backdate,
    rotated,
    run,
    set_aside,
    summary,
    tree_bytes,
    write_random_file,
)

SET_NAME = "step_1"  # the data's top directory: one checkpoint set for spotwatch restore
SET_ASIDE = "set-aside"  # the files of earlier rounds, emptied (see measure.set_aside)


@dataclass(frozen=True)
class Shape:
    name: str
    files: int
    file_bytes: int

    @property
    def total(self) -> int:
        return self.files * self.file_bytes

    def make(self, root: Path) -> Path:
        """Writes the data under root/SET_NAME; many files are spread over directories of
        100, as a sharded checkpoint or a dataset cache would be."""
        for i in range(self.files):
            folder = f"part_{i // 100:03d}/" if self.files > 100 else ""
            write_random_file(root / SET_NAME / f"{folder}f_{i}.bin", self.file_bytes)
        backdate(root)
        return root


def usage_row(runs: Sequence[Usage], total: int, files: int) -> dict[str, Any]:
    """A tool's repeated measurement as the report shows it: medians, per GiB, per 1,000
    files, the peak RSS over all runs, and every run's time and CPU in round order."""
    seconds = summary([u.seconds for u in runs])
    cpu = summary([u.cpu_seconds for u in runs])
    return {"seconds": seconds, "cpu_seconds": cpu,
            "mib_per_s": total / MiB / seconds["median"],
            "cpu_per_gib": cpu["median"] / (total / GiB),
            "cpu_per_1000_files": cpu["median"] / (files / 1000),
            "peak_rss_mib": max(u.peak_rss_mib for u in runs)}


def bulk(store: Store, clients: Clients, shape: Shape, tools: Sequence[str],
         rounds: int) -> dict[str, Any]:
    """Upload (then the same sync again, with nothing changed) with every tool, and download
    spotwatch's upload with both downloaders, in rotating order each round."""
    source = shape.make(clients.work / shape.name)
    uploads: dict[str, list[Usage]] = {tool: [] for tool in tools}
    noops: dict[str, list[Usage]] = {tool: [] for tool in tools}
    downloads: dict[str, list[Usage]] = {tool: [] for tool in DOWNLOADERS}
    for round_number in range(rounds):
        kept = None
        for tool in rotated(tools, round_number):
            bucket = store.new_bucket()
            command = clients.upload(tool, source, bucket)
            uploads[tool].append(run(command))
            check_objects(store, bucket, tool, shape.files)
            noops[tool].append(run(command))
            show(shape.name, tool, uploads[tool][-1], shape.total,
                 f"no-op {noops[tool][-1].seconds:.2f}s")
            if tool == SPOTWATCH:
                kept = bucket
            else:
                store.drop_bucket(bucket)
        assert kept is not None, "spotwatch's upload is what both downloaders fetch"
        download_round(clients, source, kept, shape, round_number, downloads)
        store.drop_bucket(kept)
    set_aside(source, clients.work / SET_ASIDE)
    return {"shape": shape.name, "files": shape.files, "bytes": shape.total,
            "upload": {t: {**usage_row(r, shape.total, shape.files),
                           "noop_seconds": summary([u.seconds for u in noops[t]])}
                       for t, r in uploads.items()},
            "download": download_rows(downloads, shape)}


def download_round(clients: Clients, source: Path, bucket: str, shape: Shape,
                   round_number: int, downloads: dict[str, list[Usage]]) -> None:
    """Every downloader fetches the set once, in this round's order."""
    for tool in rotated(list(downloads), round_number):
        downloads[tool].append(download(clients, tool, source, bucket, shape))
        show(shape.name, tool, downloads[tool][-1], shape.total)


def download_rows(downloads: dict[str, list[Usage]], shape: Shape) -> dict[str, Any]:
    return {t: usage_row(r, shape.total, shape.files) for t, r in downloads.items()}


def restore_at_scale(store: Store, clients: Clients, shape: Shape, tools: Sequence[str],
                     rounds: int, downloading: Clients | None = None,
                     downloaders: Sequence[str] = DOWNLOADERS) -> dict[str, Any]:
    """Downloads only, of a set larger than (a)'s, where each tool's start-up weighs little:
    spotwatch uploads it once, then the downloaders fetch it in rotating order each round
    (through `downloading`'s endpoint, the simulation say; else the store's)."""
    source = shape.make(clients.work / shape.name)
    bucket = store.new_bucket()
    uploader = SPOTWATCH_CRT if SPOTWATCH_CRT in tools else SPOTWATCH
    run(clients.upload(uploader, source, bucket))
    check_objects(store, bucket, uploader, shape.files)
    downloads: dict[str, list[Usage]] = {tool: [] for tool in downloaders}
    for round_number in range(rounds):
        download_round(downloading or clients, source, bucket, shape, round_number, downloads)
    store.drop_bucket(bucket)
    set_aside(source, clients.work / SET_ASIDE)
    return {"shape": shape.name, "files": shape.files, "bytes": shape.total,
            "download": download_rows(downloads, shape)}


def check_objects(store: Store, bucket: str, tool: str, files: int) -> None:
    found = store.count(bucket, f"data/{SET_NAME}/")
    if found != files:
        raise RuntimeError(f"{tool} left {found} objects of {files} in S3")


def download(clients: Clients, tool: str, source: Path, bucket: str, shape: Shape) -> Usage:
    """One download of the set into a fresh directory, checked to be whole."""
    destination = clients.work / f"restored-{tool.replace(' ', '-')}"
    # restore reads the set's manifest, no state
    config = clients.spotwatch_config(
        source, target_gbps=P4D_TARGET_GBPS if tool == RESTORE_ON_P4D else None)
    used = run(clients.download(tool, config, bucket, SET_NAME, destination))
    if tree_bytes(destination / SET_NAME) != (shape.files, shape.total):
        raise RuntimeError(f"{tool} did not download the whole set")
    set_aside(destination, clients.work / SET_ASIDE)
    return used


def show(name: str, tool: str, used: Usage, total: int, extra: str = "") -> None:
    print(f"  {name:<14} {tool:<20} {used.seconds:7.2f}s {total / MiB / used.seconds:8.1f} MiB/s"
          f"  cpu {used.cpu_seconds:6.2f}s  rss {used.peak_rss_mib:6.1f} MiB  {extra}",
          flush=True)


# -- the S3 simulation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    rate_mib: float  # per connection and direction
    latency_ms: float  # before each response's first byte
    seconds_per_file: float  # one file takes this long on one connection at full rate
    levels: tuple[int, ...]  # connections (each tool's concurrency setting)

    @property
    def file_bytes(self) -> int:
        return int(self.rate_mib * MiB * self.seconds_per_file)


def scaling_data(root: Path, simulation: Simulation) -> dict[int, Path]:
    """For n connections, n files, so that every tool can keep all n busy and a perfect one
    takes `seconds_per_file`: the largest level's files are written once and the smaller
    levels hard-link the first n of them."""
    largest = Shape("largest", max(simulation.levels), simulation.file_bytes)
    files = sorted((largest.make(root / "all") / SET_NAME).iterdir())
    sources = {}
    for level in simulation.levels:
        source = root / f"n{level}"
        (source / SET_NAME).mkdir(parents=True)
        for path in files[:level]:
            os.link(path, source / SET_NAME / path.name)
        sources[level] = source
    return sources


def scaling(store: Store, clients: Clients, simulation: Simulation, tools: Sequence[str],
            rounds: int) -> dict[str, Any]:
    """Throughput of every tool set to n connections, for each n, through the simulation."""
    sources = scaling_data(clients.work / "scaling", simulation)
    runs: dict[str, dict[int, list[Usage]]] = {t: {n: [] for n in sources} for t in tools}
    for round_number in range(rounds):
        for level, source in sources.items():
            for tool in rotated(tools, round_number):
                bucket = store.new_bucket()
                used = run(clients.upload(tool, source, bucket, concurrency=level))
                check_objects(store, bucket, tool, level)
                store.drop_bucket(bucket)
                runs[tool][level].append(used)
                print(f"  {level:>3} connections {tool:<20} {used.seconds:7.2f}s "
                         f"{level * simulation.file_bytes / MiB / used.seconds:8.1f} MiB/s "
                      f"cpu {used.cpu_seconds:6.2f}s", flush=True)
    shutil.rmtree(clients.work / "scaling")
    return {"rate_mib": simulation.rate_mib, "latency_ms": simulation.latency_ms,
            "file_mib": simulation.file_bytes / MiB, "levels": list(sources),
            "tools": {tool: {str(n): usage_row(r, n * simulation.file_bytes, n)
                             for n, r in by_level.items()} for tool, by_level in runs.items()}}
