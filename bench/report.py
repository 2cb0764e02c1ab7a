"""bench/RESULTS.md from bench/results.json."""

from __future__ import annotations

from typing import Any

from clients import (
    CRT_GBPS_PER_CONNECTION,
    P4D_TARGET_GBPS,
    RESTORE,
    RESTORE_ON_P4D,
    S5CMD_CP,
    SPOTWATCH,
    SPOTWATCH_CRT,
)
from measure import paired_ratio
from projection import CHECKPOINTS_GIB, NIC_MB_S, S3_CONNECTION_MB_S


def spread(summary: dict[str, Any]) -> str:
    return f"{summary['min']:.2f}-{summary['max']:.2f} ({len(summary['runs'])} runs)"


def ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Median over rounds of theirs / ours, with the range; above 1.0 spotwatch is ahead."""
    found = paired_ratio(ours["runs"], theirs["runs"])
    return f"{found['median']:.2f}x ({found['min']:.2f}-{found['max']:.2f})"


def header(results: dict[str, Any]) -> list[str]:
    commands: dict[str, list[str]] = {}
    for section, command in results.get("produced_by", {}).items():
        commands.setdefault(command, []).append(section)
    produced = (f"`{next(iter(commands))}`" if len(commands) == 1 else "; ".join(
        f"{', '.join(sections)}: `{command}`" for command, sections in commands.items()))
    versions = ", ".join(results["versions"].values())
    lines = [f"Produced by {produced}", "", "# Benchmark results", "",
             f"On {results['machine']}; {versions}.", "",
             "Every tool talks to the same local SeaweedFS (`weed mini`, a real object store "
             "with an S3 API, its own process) in the same run, on the same data. Tools run "
             "in rounds, one after the other, in an order that rotates each round; a table "
             "gives the median and range over rounds, and a ratio is the median of the "
             "per-round ratios (tools in one round saw the same machine), range in brackets. "
             "Ratios are the other tool's value over spotwatch's: above 1.0 spotwatch is "
             "faster or uses less. CPU-seconds are user + sys of the client's whole process "
             "tree (os.wait4); peak RSS is its largest process. Server and clients share the "
             "machine's cores. Every download goes into a new directory, and the files of "
             "earlier rounds are emptied and kept until the run ends, not deleted: on ext4 "
             "without a journal (as here) every file created passes over the inodes deleted "
             "in the last minute, which made file creation, not the tools, what a restore "
             "of many files measured."]
    for tool, reason in results.get("skipped", {}).items():
        lines += ["", f"Row `{tool}` skipped: {reason}"]
    return lines


def usage_cells(row: dict[str, Any]) -> str:
    return (f"{row['seconds']['median']:.2f} | {spread(row['seconds'])} | "
            f"{row['mib_per_s']:.1f} | {row['cpu_seconds']['median']:.2f} | "
            f"{row['cpu_per_gib']:.2f} | {row['cpu_per_1000_files']:.2f} | "
            f"{row['peak_rss_mib']:.0f}")


USAGE_COLUMNS = ("seconds (median) | range | MiB/s | CPU-s | CPU-s per GiB | "
                 "CPU-s per 1,000 files | peak RSS MiB")


def bulk_section(shapes: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## (a) bulk upload, no-op sync, restore", "",
             f"| data | tool | {USAGE_COLUMNS} | no-op seconds |",
             "| --- | --- |" + " ---: |" * 8]
    for shape in shapes:
        for tool, row in shape["upload"].items():
            lines.append(f"| {shape['shape']} | {tool} | {usage_cells(row)} | "
                         f"{row['noop_seconds']['median']:.2f} |")
    lines += ["", "Against each of spotwatch's transfer clients (`crt` is the one "
              "`transfer.client: auto` takes; target: time ≥ 1.0x s5cmd, CPU per file ≥ 1.0x "
              "s5cmd's):", "", "| data | spotwatch | tool | time ratio | CPU ratio |",
              "| --- | --- | --- | ---: | ---: |"]
    for shape in shapes:
        for baseline in (SPOTWATCH_CRT, SPOTWATCH):
            ours = shape["upload"].get(baseline)
            if ours is None:
                continue
            for tool, row in shape["upload"].items():
                if tool not in (SPOTWATCH, SPOTWATCH_CRT):
                    lines.append(f"| {shape['shape']} | {baseline} | {tool} | "
                                 f"{ratio(ours['seconds'], row['seconds'])} | "
                                 f"{ratio(ours['cpu_seconds'], row['cpu_seconds'])} |")
    lines += ["", "Download of the set spotwatch uploaded, `spotwatch restore` against "
              "`s5cmd cp` with its defaults (target: ratio ≥ 1.0):", ""]
    return lines + restore_table(shapes)


def restore_table(shapes: list[dict[str, Any]]) -> list[str]:
    lines = [f"| data | tool | {USAGE_COLUMNS} | ratio |", "| --- | --- |" + " ---: |" * 8]
    for shape in shapes:
        ours = shape["download"][RESTORE]
        for tool, row in shape["download"].items():
            shown = "1.00x" if tool == RESTORE else ratio(ours["seconds"], row["seconds"])
            lines.append(f"| {shape['shape']} | {tool} | {usage_cells(row)} | {shown} |")
    return lines


def restore_section(shapes: list[dict[str, Any]]) -> list[str]:
    return ["", "Restore of larger sets (uploaded once, then only downloaded), where each tool's "
            "start-up weighs little against the transfer. On this virtual machine the host takes "
            "freed memory back (free page reporting), and writing a GiB into the page cache cost "
            "from 0.2 to over 2 system CPU-seconds depending on how much of it had to be faulted "
            "in again; the longer a download runs, the more of it does. Each time includes "
            "the tool's start-up: spotwatch's (the Python interpreter, botocore and the CRT, "
            "timed by `python bench/startup.py`) is a fixed cost that s5cmd, one Go binary, "
            "hardly pays, and it weighs most on the smallest sets:", "",
            *restore_table(shapes)]


def scaling_section(scaling: dict[str, Any]) -> list[str]:
    rate = scaling["rate_mib"]
    tools = list(scaling["tools"])
    lines = ["", "## (b) scaled S3: throughput against connections", "",
             f"A proxy in front of SeaweedFS (bench/s3sim.py) paces every connection to "
             f"{rate:g} MiB/s each way and holds each response {scaling['latency_ms']:g} ms "
             f"before its first byte: S3's shape (about {S3_CONNECTION_MB_S:g} MB/s per "
             "connection, throughput growing with connections) scaled down to this machine. "
             f"With n connections each tool uploads n files of {scaling['file_mib']:g} MiB, "
             "set to n requests at once (spotwatch `transfer.max_concurrency`, aws "
             "`max_concurrent_requests`, s5cmd `--numworkers`; the CRT opens a connection per "
             f"{CRT_GBPS_PER_CONNECTION:g} Gbit/s of `transfer.target_throughput`, set to n x "
             f"{CRT_GBPS_PER_CONNECTION:g}); 'ideal' is n x the pace. "
             "Wall time includes each tool's start-up. MiB/s (median over rounds), then "
             "CPU-seconds per GiB:", "",
             "| connections | ideal | " + " | ".join(tools) + " | "
             + " | ".join(f"{t} CPU-s/GiB" for t in tools) + " |",
             "| ---: | ---: |" + " ---: |" * (2 * len(tools))]
    for level in scaling["levels"]:
        rows = [scaling["tools"][t][str(level)] for t in tools]
        lines.append(f"| {level} | {level * rate:g} | "
                     + " | ".join(f"{r['mib_per_s']:.1f}" for r in rows) + " | "
                     + " | ".join(f"{r['cpu_per_gib']:.2f}" for r in rows) + " |")
    return lines


def simulated_restore_section(restores: dict[str, Any]) -> list[str]:
    lines = ["", "## (g) scaled S3: restore", "",
             f"Restore through (b)'s proxy ({restores['rate_mib']:g} MiB/s per connection, "
             f"{restores['latency_ms']:g} ms before each response), every tool with its "
             "defaults: there a small file's GET is a round trip, and how many a tool keeps "
             "under way, not its CPU, sets the pace, as on S3. This machine has no instance "
             "type, so spotwatch's defaults are those of a 10 Gbit/s target: 20 ranged GETs "
             "of large objects at once (and, for a restore, 128 CRT connections for small "
             f"ones). '{RESTORE_ON_P4D}' is spotwatch with the {P4D_TARGET_GBPS:g} Gbit/s the "
             "CRT takes on a p4d or p5 (`transfer.target_throughput`): 256 ranged GETs at "
             "once. Its ratio, like every row's, is against the default restore, so below "
             "1.0 it is the faster:", "",
             *restore_table(restores["shapes"])]
    against = []
    for shape in restores["shapes"]:
        rows = shape["download"]
        if {RESTORE_ON_P4D, S5CMD_CP} <= rows.keys():
            found = ratio(rows[RESTORE_ON_P4D]["seconds"], rows[S5CMD_CP]["seconds"])
            against.append(f"{shape['shape']} {found}")
    if against:
        lines += ["", f"`{S5CMD_CP}` against '{RESTORE_ON_P4D}' (above 1.0 spotwatch is "
                  "ahead): " + "; ".join(against) + "."]
    return lines


def projection_section(projections: list[dict[str, Any]]) -> list[str]:
    names = list(CHECKPOINTS_GIB)
    lines = ["", "## (c) projected on a p4d/p5", "",
             f"Each simulated connection scaled back up to {S3_CONNECTION_MB_S:g} MB/s, times "
             "the connections, times the share of them the tool kept busy in (b) (interpolated "
             f"between measured levels), at most the {NIC_MB_S / 1000:g} GB/s (400 Gbit/s) "
             "the CRT targets on p4d and p5. Where this 2-core machine rather than the tool "
             "was the limit in (b), the projection is a lower bound. 'Cores' is the client "
             "CPU that rate needs at the CPU-seconds per GiB measured at the most connections in "
             "(b). To make the "
             "70B state durable within 100 s takes about 8.4 GB/s.", "",
             "| tool | connections | share busy | MB/s | cores | "
             + " | ".join(f"{n} ({CHECKPOINTS_GIB[n]} GiB), s" for n in names) + " |",
             "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(names)]
    for projection in projections:
        for which in ("default", "best"):
            row = projection[which]
            label = "default" if which == "default" else "best measured"
            lines.append(f"| {projection['tool']} ({label}) | {row['connections']} | "
                         f"{row['efficiency']:.0%} | {row['mb_per_s']:.0f} | "
                         f"{row['cores_needed']:.1f} | "
                         + " | ".join(f"{row['seconds'][n]:.0f}" for n in names) + " |")
    return lines


def safety_section(safety: list[dict[str, Any]]) -> list[str]:
    ours = safety[0]["seconds"]
    lines = ["", "## (d) time to safety", "",
             f"A trainer saves {safety[0]['mib_at_notice']} MiB of checkpoints in all; the "
             "notice comes right after the last save. spotwatch has been running all along; "
             "the others start at the notice.", "",
             "| tool | seconds from notice to all durable (median) | range | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for row in safety:
        shown = "1.00x" if row is safety[0] else ratio(ours, row["seconds"])
        lines.append(f"| {row['tool']} | {row['seconds']['median']:.2f} | "
                     f"{spread(row['seconds'])} | {shown} |")
    return lines


def latency_section(latency: dict[str, Any]) -> list[str]:
    return ["", "## (e) notice detection latency", "",
            f"{latency['samples']} notices at random moments, default poll interval "
            f"{latency['poll_interval']} s (target p99 ≤ {latency['poll_interval'] + 0.2} s): "
            f"p50 {latency['p50']:.3f} s, p99 {latency['p99']:.3f} s, "
            f"max {latency['max']:.3f} s"
            + (" (with under 100 samples, p99 is the largest)" if latency["samples"] < 100
               else "")]


def idle_section(idle: dict[str, Any]) -> list[str]:
    return ["", "## (f) idle daemon", "",
            f"Watching {idle['files']} files already in S3 (targets < 1% CPU, < 80 MB RSS): "
            f"CPU {idle['cpu_percent']:.2f}%, RSS {idle['rss_mib']:.1f} MiB "
            f"(peak {idle['peak_rss_mib']:.1f} MiB during the startup scan). The first "
            f"`spotwatch flush` of those files took {idle['first_flush_seconds']:.1f} s."]


def report(results: dict[str, Any]) -> str:
    lines = header(results)
    if "bulk" in results:
        lines += bulk_section(results["bulk"])
    if "restore" in results:
        lines += restore_section(results["restore"])
    if "scaling" in results:
        lines += scaling_section(results["scaling"])
        lines += projection_section(results["projection"])
    if "simulated_restore" in results:
        lines += simulated_restore_section(results["simulated_restore"])
    if "time_to_safety" in results:
        lines += safety_section(results["time_to_safety"])
    if "detection_latency" in results:
        lines += latency_section(results["detection_latency"])
    if "idle" in results:
        lines += idle_section(results["idle"])
    return "\n".join([*lines, ""])

