"""spotwatch benchmarks against `aws s3 sync` and `s5cmd sync`, same data, same S3 server.

Run through bench/run.sh (it installs the tools). Every scenario talks to one local moto S3
server started here as its own process, so the server's cost is the same for every tool and
the ratios compare the clients. Results go to stdout and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import yaml

from spotwatch.emulator import ImdsEmulator

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
REGION = "us-west-2"
MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    shards: int
    shard_mib: int
    small_files: int
    small_kib: int
    saves: int
    save_mib: int
    idle_files: int
    idle_seconds: float
    latency_samples: int


FULL = Sizes(shards=4, shard_mib=256, small_files=5000, small_kib=64, saves=4, save_mib=256,
             idle_files=100_000, idle_seconds=30, latency_samples=40)
QUICK = Sizes(shards=4, shard_mib=32, small_files=1000, small_kib=64, saves=3, save_mib=64,
              idle_files=10_000, idle_seconds=10, latency_samples=10)


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss_mib: float


# -- infrastructure -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait()


def run(command: list[str], env: dict[str, str]) -> Timed:
    """Run to completion; wall time and the process's own peak RSS (from wait4)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{command[0]} failed: {errors.read().decode()[-2000:]}")
    return Timed(seconds, usage.ru_maxrss / 1024)


def write_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        left = size
        while left:
            block = min(left, 16 * MiB)
            handle.write(os.urandom(block))
            left -= block


class Bench:
    def __init__(self, endpoint: str, work: Path) -> None:
        self.endpoint = endpoint
        self.work = work
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                        AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION, AWS_ENDPOINT_URL=endpoint)
        self.s3: Any = boto3.client("s3", region_name=REGION, endpoint_url=endpoint,
                                    aws_access_key_id="bench", aws_secret_access_key="bench")

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:10]}"
        self.s3.create_bucket(Bucket=name, CreateBucketConfiguration={
            "LocationConstraint": REGION})
        self.s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True})
        return name

    def drop_bucket(self, bucket: str) -> None:
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        self.s3.delete_bucket(Bucket=bucket)

    def count(self, bucket: str, prefix: str) -> int:
        return sum(page.get("KeyCount", 0) for page in self.s3.get_paginator(
            "list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))

    def spotwatch_config(self, source: Path, imds: str | None = None,
                         mode: str = "continuous", concurrency: int | None = None) -> Path:
        config = self.work / f"config-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump({
            "aws": {"region": REGION},
            "watch": [{"path": str(source), "prefix": "data/"}],
            "sync": {"mode": mode},
            "imds": {"enabled": imds is not None, "endpoint": imds},
            "state": {"dir": str(self.work / f"state-{uuid.uuid4().hex[:6]}")},
            "metrics": {"enabled": False},
            "log": {"level": "info", "format": "json"},
            **({"transfer": {"max_concurrency": concurrency}} if concurrency else {}),
        }))
        return config

    # Each tool's "upload this directory" command, as a user would type it.
    def tools(self, source: Path, bucket: str) -> dict[str, list[str]]:
        config = self.spotwatch_config(source)
        fewer = self.spotwatch_config(source, concurrency=10)
        return {
            "spotwatch flush": [str(BIN / "spotwatch"), "flush", "-c", str(config),
                                "--bucket", bucket],
            "spotwatch flush, 10 concurrent": [str(BIN / "spotwatch"), "flush", "-c",
                                               str(fewer), "--bucket", bucket],
            "aws s3 sync": [str(BIN / "aws"), "s3", "sync", str(source), f"s3://{bucket}/data/",
                            "--only-show-errors"],
            "s5cmd sync": [str(BIN / "s5cmd"), "--endpoint-url", self.endpoint, "sync",
                           f"{source}/", f"s3://{bucket}/data/"],
        }


# -- scenarios ------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, Any]:
    """A repeated measurement as the report shows it: the median and the range, plus every
    run in round order, so that the report can compare tools round by round."""
    return {"seconds": statistics.median(seconds), "seconds_min": min(seconds),
            "seconds_max": max(seconds), "runs": len(seconds), "run_seconds": seconds}


TOOLS = ("spotwatch flush", "spotwatch flush, 10 concurrent", "aws s3 sync", "s5cmd sync")


def bulk(bench: Bench, name: str, make: Callable[[Path], int],
         repeats: int) -> list[dict[str, Any]]:
    """(a) upload a directory, and (b) the same sync again with nothing changed.

    Every tool runs `repeats` times, the order rotating each round so that no tool always
    follows the same one; rows keep the median and the spread."""
    source = bench.work / name
    total = make(source)
    # Data at rest, as the other tools assume: spotwatch waits quiet_seconds for a file
    # written moments ago and never seen closed, in case it is still being written.
    for path in source.rglob("*"):
        os.utime(path, (time.time() - 60, time.time() - 60))
    samples: dict[str, list[tuple[Timed, Timed, int]]] = {tool: [] for tool in TOOLS}
    for round_number in range(repeats):
        shift = round_number % len(TOOLS)
        for tool in TOOLS[shift:] + TOOLS[:shift]:
            bucket = bench.new_bucket()
            command = bench.tools(source, bucket)[tool]
            first = run(command, bench.env)
            files = bench.count(bucket, "data/")
            again = run(command, bench.env)
            samples[tool].append((first, again, files))
            print(f"  {name:<12} {tool:<31} {first.seconds:7.2f}s  "
                  f"{total / MiB / first.seconds:7.1f} MiB/s  "
                  f"rss {first.peak_rss_mib:6.1f} MiB  no-op {again.seconds:5.2f}s", flush=True)
            bench.drop_bucket(bucket)
    shutil.rmtree(source)
    rows = []
    for tool, runs in samples.items():
        times = summary([first.seconds for first, _, _ in runs])
        rows.append({"scenario": name, "tool": tool, **times,
                     "mib_per_s": total / MiB / times["seconds"],
                     "rss_mib": max(first.peak_rss_mib for first, _, _ in runs),
                     "noop_seconds": statistics.median(again.seconds for _, again, _ in runs),
                     "objects": min(files for _, _, files in runs)})
    return rows


def make_shards(count: int, mib: int) -> Callable[[Path], int]:
    def make(root: Path) -> int:
        for i in range(count):
            write_file(root / f"shard_{i}.pt", mib * MiB)
        return count * mib * MiB
    return make


def make_small(count: int, kib: int) -> Callable[[Path], int]:
    def make(root: Path) -> int:
        for i in range(count):
            write_file(root / f"part_{i // 100:03d}" / f"f_{i}.bin", kib * 1024)
        return count * kib * 1024
    return make


class DaemonProcess:
    def __init__(self, bench: Bench, config: Path, bucket: str) -> None:
        self.log = bench.work / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            [str(BIN / "spotwatch"), "run", "-c", str(config), "--bucket", bucket],
            env=bench.env, stdout=self._handle, stderr=subprocess.STDOUT)
        self.wait_for("daemon_started")

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_for(self, name: str, count: int = 1, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        raise TimeoutError(name)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self._handle.close()


def timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def save_checkpoint(root: Path, step: int, mib: int) -> None:
    """Like a trainer: two shards into a temporary directory, renamed into place. The
    staging name is one spotwatch's default excludes skip (`*.tmp/*`), as its README asks."""
    staging = root / f"step_{step}.tmp"
    for shard in range(2):
        write_file(staging / f"shard_{shard}.pt", mib * MiB // 2)
    staging.rename(root / f"step_{step}")


def time_to_safety(bench: Bench, sizes: Sizes, repeats: int) -> list[dict[str, Any]]:
    """(c) notice fired just after the last save: how long until everything is in S3.

    The whole scenario runs `repeats` times; rows keep each tool's median and range."""
    samples: dict[str, list[float]] = {}
    total = (sizes.saves + 1) * sizes.save_mib
    for _ in range(repeats):
        for tool, seconds in safety_round(bench, sizes):
            samples.setdefault(tool, []).append(seconds)
            print(f"  time-to-safety {tool:<28} {seconds:7.2f}s", flush=True)
    return [{"tool": tool, **summary(runs), "mib_at_notice": total}
            for tool, runs in samples.items()]


def safety_round(bench: Bench, sizes: Sizes) -> list[tuple[str, float]]:
    rows = []
    with ImdsEmulator() as imds:
        source = bench.work / "training"
        source.mkdir()
        bucket = bench.new_bucket()
        daemon = DaemonProcess(bench, bench.spotwatch_config(source, imds.url), bucket)
        for step in range(1, sizes.saves + 1):
            save_checkpoint(source, step, sizes.save_mib)
            time.sleep(3)  # the training steps between saves
        save_checkpoint(source, sizes.saves + 1, sizes.save_mib)  # the save the notice follows
        fired = time.time()
        imds.fire_spot_interruption()
        done = daemon.wait_for("flush_done")
        rows.append(("spotwatch (daemon running)", timestamp(done) - fired))
        daemon.stop()
        assert bench.count(bucket, "data/step_") == 2 * (sizes.saves + 1)
        bench.drop_bucket(bucket)
        for tool in ("aws s3 sync", "s5cmd sync"):
            bucket = bench.new_bucket()
            took = run(bench.tools(source, bucket)[tool], bench.env)
            rows.append((f"{tool} at notice time", took.seconds))
            bench.drop_bucket(bucket)
        shutil.rmtree(source)
    return rows


def detection_latency(bench: Bench, sizes: Sizes) -> dict[str, float]:
    """(d) from the notice appearing in IMDS to the daemon logging it, default poll interval."""
    latencies = []
    with ImdsEmulator() as imds:
        source = bench.work / "latency"
        source.mkdir()
        bucket = bench.new_bucket()
        config = bench.spotwatch_config(source, imds.url)
        raw = yaml.safe_load(config.read_text())
        del raw["imds"]["enabled"]  # keep every imds default but the endpoint
        config.write_text(yaml.safe_dump(raw))
        daemon = DaemonProcess(bench, config, bucket)
        rng = random.Random(7)
        for sample in range(1, sizes.latency_samples + 1):
            time.sleep(rng.uniform(0.3, 1.3))  # fire at a random point of the poll cycle
            fired = time.time()
            # A distinct action time per sample, so each is a new notice.
            imds.fire_spot_interruption(in_seconds=120 + 2 * sample)
            latencies.append(timestamp(daemon.wait_for("notice_detected", sample)) - fired)
        daemon.stop()
        bench.drop_bucket(bucket)
    latencies.sort()
    result = {"samples": len(latencies), "p50": statistics.median(latencies),
              "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
              "max": latencies[-1], "poll_interval": 1.0}
    print(f"  detection latency p50 {result['p50']:.3f}s p99 {result['p99']:.3f}s "
          f"max {result['max']:.3f}s", flush=True)
    return result


def idle_usage(bench: Bench, sizes: Sizes) -> dict[str, float]:
    """(e) CPU and memory of a daemon watching many files that are all in S3 already."""
    source = bench.work / "idle"
    for i in range(sizes.idle_files):
        path = source / f"d_{i // 100:04d}" / f"f_{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 64)
    bucket = bench.new_bucket()
    config = bench.spotwatch_config(source)
    first = run([str(BIN / "spotwatch"), "flush", "-c", str(config), "--bucket", bucket],
                bench.env)
    print(f"  idle: first flush of {sizes.idle_files} files took {first.seconds:.1f}s",
          flush=True)
    daemon = DaemonProcess(bench, config, bucket)
    daemon.wait_for("startup_scan_done")
    time.sleep(5)
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{daemon.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    start_cpu, start = cpu_seconds(), time.monotonic()
    time.sleep(sizes.idle_seconds)
    cpu = (cpu_seconds() - start_cpu) / (time.monotonic() - start)
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    memory = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
              if line.startswith(("VmRSS", "VmHWM"))}
    daemon.stop()
    bench.drop_bucket(bucket)
    shutil.rmtree(source)
    result = {"files": sizes.idle_files, "cpu_percent": 100 * cpu,
              "rss_mib": memory["VmRSS"], "peak_rss_mib": memory["VmHWM"],
              "first_flush_seconds": first.seconds}
    print(f"  idle with {sizes.idle_files} files: cpu {result['cpu_percent']:.2f}% "
          f"rss {result['rss_mib']:.1f} MiB (peak {result['peak_rss_mib']:.1f})", flush=True)
    return result


# -- report ---------------------------------------------------------------------------------


def paired_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Their time over ours, taken round by round and then the median: the machine's speed
    drifts over minutes, and tools run in the same round saw the same machine. The range of
    the per-round ratios follows in brackets."""
    pairs = list(zip(ours.get("run_seconds", []), theirs.get("run_seconds", []), strict=False))
    if len(pairs) < 2:
        return f"{theirs['seconds'] / ours['seconds']:.2f}x"
    ratios = [t / o for o, t in pairs]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def ratio(rows: list[dict[str, Any]], scenario: str, other: str, field: str) -> str:
    by_tool = {r["tool"]: r for r in rows if r["scenario"] == scenario}
    ours, theirs = by_tool["spotwatch flush"], by_tool[other]
    if field == "seconds":
        return paired_ratio(ours, theirs)
    return f"{theirs[field] / ours[field]:.2f}x"


def spread(row: dict[str, Any]) -> str:
    if "runs" not in row:
        return "1 run"
    return f"{row['seconds_min']:.2f}-{row['seconds_max']:.2f} ({row['runs']} runs)"


def report(results: dict[str, Any]) -> str:
    produced = results.get("produced_by", {})
    scenarios_by_command: dict[str, list[str]] = {}
    for name, command in produced.items():
        scenarios_by_command.setdefault(command, []).append(name)
    if len(scenarios_by_command) == 1:
        commands = f"`{next(iter(scenarios_by_command))}`"
    else:
        commands = "; ".join(f"{', '.join(names)}: `{command}`"
                             for command, names in scenarios_by_command.items())
    lines = ["# Benchmark results", "", f"On {results['machine']}. Produced by {commands}.",
             "Every tool uploads the same data to the same local moto S3 server (its own "
             "process); ratios are the other tool's time divided by spotwatch's, so above 1.0 "
             "means spotwatch is faster. Each tool runs with its defaults: spotwatch 16 MiB "
             "parts from 64 MiB, 20 requests at once (tuned for S3 on a large instance); "
             "aws-cli 8 MiB parts, 10 at once; s5cmd 50 MiB parts, 256 workers. The row "
             "'spotwatch flush, 10 concurrent' shows what fewer requests at once gain here, "
             "where client and a one-process Python server share two cores (on S3 itself more "
             "requests at once hide more latency); the ratios use spotwatch's defaults. "
             "On this shared 2-core machine the speed of the whole "
             "machine drifts by up to a third from minute to minute, so in (a), (b) and (c) "
             "the tools run in rounds, one after the other (in rotating order in (a)/(b)), "
             "several rounds each. The tables give each tool's median and range; a ratio is "
             "the median of the per-round ratios (tools in one round saw the same machine), "
             "with their range in brackets. The server and the client share the two cores: "
             "with many small files the one-process server is the limit for every tool, and a "
             "client that spends less CPU per file leaves more of the machine to the server.",
             ""]
    lines += ["## (a) bulk upload and (b) no-op sync", "",
              "| data | tool | seconds (median) | range | MiB/s | peak RSS MiB | "
              "no-op seconds |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["bulk"]:
        lines.append(f"| {r['scenario']} | {r['tool']} | {r['seconds']:.2f} | {spread(r)} | "
                     f"{r['mib_per_s']:.1f} | {r['rss_mib']:.1f} | {r['noop_seconds']:.2f} |")
    lines += ["", "| data | vs aws s3 sync | vs s5cmd (target ≥ 1.0) | no-op vs aws | "
              "no-op vs s5cmd |", "| --- | ---: | ---: | ---: | ---: |"]
    for scenario in dict.fromkeys(r["scenario"] for r in results["bulk"]):
        rows = results["bulk"]
        lines.append(
            f"| {scenario} | {ratio(rows, scenario, 'aws s3 sync', 'seconds')} | "
            f"{ratio(rows, scenario, 's5cmd sync', 'seconds')} | "
            f"{ratio(rows, scenario, 'aws s3 sync', 'noop_seconds')} | "
            f"{ratio(rows, scenario, 's5cmd sync', 'noop_seconds')} |")
    safety = results["time_to_safety"]
    ours = safety[0]
    lines += ["", "## (c) time to safety", "",
              f"A trainer saves {safety[0]['mib_at_notice']} MiB of checkpoints in all; the "
              "notice comes right after the last save. spotwatch has been running all along; "
              "the others start at the notice.", "",
              "| tool | seconds from notice to all durable (median) | range | "
              "ratio (target ≥ 3x vs aws) |",
              "| --- | ---: | ---: | ---: |"]
    for row in safety:
        shown = "1.00x" if row is ours else paired_ratio(ours, row)
        lines.append(f"| {row['tool']} | {row['seconds']:.2f} | {spread(row)} | {shown} |")
    latency = results["detection_latency"]
    lines += ["", "## (d) notice detection latency", "",
              f"{latency['samples']} notices at random moments, default poll interval "
              f"{latency['poll_interval']} s (target p99 ≤ {latency['poll_interval'] + 0.2} s):",
              "", f"p50 {latency['p50']:.3f} s, p99 {latency['p99']:.3f} s, "
              f"max {latency['max']:.3f} s"]
    idle = results["idle"]
    lines += ["", "## (e) idle daemon", "",
              f"Watching {idle['files']} files already in S3 (targets < 1% CPU, < 80 MB RSS): "
              f"CPU {idle['cpu_percent']:.2f}%, RSS {idle['rss_mib']:.1f} MiB "
              f"(peak {idle['peak_rss_mib']:.1f} MiB during the startup scan). The first "
              f"`spotwatch flush` of those files took {idle['first_flush_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data")
    parser.add_argument("--only", choices=["bulk", "safety", "latency", "idle"], nargs="*")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="runs of each tool in (a)/(b) and (c); the median is reported")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    command = "bash bench/run.sh" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "") + (
        f" --repeat {args.repeat}" if args.repeat != 3 else "")
    saved = HERE / "results.json"
    if args.report_only:
        (HERE / "RESULTS.md").write_text(report(json.loads(saved.read_text())))
        return 0
    sizes = QUICK if args.quick else FULL
    wanted = set(args.only or ["bulk", "safety", "latency", "idle"])
    # --only reruns some scenarios and keeps the others' last results.
    results: dict[str, Any] = json.loads(saved.read_text()) if args.only and saved.exists() \
        else {}
    results["machine"] = f"{os.cpu_count()} cores, {platform.platform()}"
    produced = results.setdefault("produced_by", {})
    with tempfile.TemporaryDirectory(prefix="spotwatch-bench-") as temp, s3_server() as url:
        bench = Bench(url, Path(temp))
        if "bulk" in wanted:
            print("(a)/(b) bulk upload and no-op sync", flush=True)
            produced["(a)/(b)"] = command
            results["bulk"] = (
                bulk(bench, f"{sizes.shards}x{sizes.shard_mib}MiB",
                     make_shards(sizes.shards, sizes.shard_mib), args.repeat)
                + bulk(bench, f"{sizes.small_files}x{sizes.small_kib}KiB",
                       make_small(sizes.small_files, sizes.small_kib), args.repeat))
        if "safety" in wanted:
            print("(c) time to safety", flush=True)
            produced["(c)"] = command
            results["time_to_safety"] = time_to_safety(bench, sizes, args.repeat)
        if "latency" in wanted:
            print("(d) detection latency", flush=True)
            produced["(d)"] = command
            results["detection_latency"] = detection_latency(bench, sizes)
        if "idle" in wanted:
            print("(e) idle daemon", flush=True)
            produced["(e)"] = command
            results["idle"] = idle_usage(bench, sizes)
    saved.write_text(json.dumps(results, indent=1))
    if {"bulk", "time_to_safety", "detection_latency", "idle"} <= results.keys():
        (HERE / "RESULTS.md").write_text(report(results))
        print(f"written {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
