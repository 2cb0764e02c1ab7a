"""From the scaled simulation to a GPU instance: spotwatch's throughput on a p4d/p5.

The simulation paces each connection at `rate_mib`; S3 carries about 85-90 MB/s on one. If a
tool keeps the same share of its n connections busy at full scale as it did here (its
efficiency: measured throughput over n x rate), it reaches n x 87.5 MB/s x efficiency, at
most what the instance's network carries. Where this machine rather than the tool was the
limit, the efficiency, and so the projection, is a lower bound.
"""

from __future__ import annotations

from typing import Any

from clients import CRT_GBPS_PER_CONNECTION, SPOTWATCH_CRT
from spotwatch.config import TransferSettings

S3_CONNECTION_MB_S = 87.5  # MB/s (10^6) that one S3 connection carries, 85-90
NIC_GBPS = 400  # p4d and p5: the CRT's built-in target, 400 Gbit/s
NIC_MB_S = NIC_GBPS * 1e9 / 8 / 1e6
CHECKPOINTS_GIB = {"7B full training state": 78, "70B full training state": 782}
GiB = 2**30


def efficiency(row: dict[str, Any], connections: int, rate_mib: float) -> float:
    return float(row["mib_per_s"]) / (connections * rate_mib)


def interpolated(by_level: dict[int, float], level: int) -> float:
    """Linear between the measured levels around `level`; the nearest one outside them."""
    levels = sorted(by_level)
    if level <= levels[0]:
        return by_level[levels[0]]
    if level >= levels[-1]:
        return by_level[levels[-1]]
    upper = next(n for n in levels if n >= level)
    lower = max(n for n in levels if n <= level)
    if upper == lower:
        return by_level[level]
    share = (level - lower) / (upper - lower)
    return by_level[lower] + share * (by_level[upper] - by_level[lower])


def at_scale(connections: int, share_busy: float, cpu_per_gib: float) -> dict[str, Any]:
    mb_s = min(NIC_MB_S, connections * S3_CONNECTION_MB_S * share_busy)
    gib_s = mb_s * 1e6 / GiB
    return {"connections": connections, "efficiency": share_busy, "mb_per_s": mb_s,
            "cores_needed": cpu_per_gib * gib_s,
            "seconds": {name: size / gib_s for name, size in CHECKPOINTS_GIB.items()}}


def project(scaling: dict[str, Any], tool: str) -> dict[str, Any]:
    """`tool` on a p4d/p5 at its default connections and at the best level measured.
    CPU per GiB comes from the largest level, where start-up weighs least."""
    rows = {int(n): row for n, row in scaling["tools"][tool].items()}
    share = {n: efficiency(row, n, scaling["rate_mib"]) for n, row in rows.items()}
    cpu_per_gib = float(rows[max(rows)]["cpu_per_gib"])
    # By default the CRT sizes itself for the instance's target (1,000 connections on a p4d);
    # the classic client runs max_concurrency requests.
    default = (round(NIC_GBPS / CRT_GBPS_PER_CONNECTION) if tool == SPOTWATCH_CRT
               else TransferSettings().max_concurrency)
    best = max(rows, key=lambda n: n * share[n])
    return {"tool": tool,
            "default": at_scale(default, interpolated(share, default), cpu_per_gib),
            "best": at_scale(best, share[best], cpu_per_gib)}
