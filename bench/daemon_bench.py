"""Daemon scenarios: time to safety after a notice, notice detection latency, the idle daemon.

spotwatch runs as `spotwatch run` against the IMDS emulator and the object store; the other
tools, which have no daemon, start at the notice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from clients import AWS, S5CMD, Clients, Store
from measure import MiB, run, summary, write_random_file
from seaweed import BIN, REGION
from spotwatch.emulator import ImdsEmulator


@dataclass(frozen=True)
class DaemonSizes:
    saves: int
    save_mib: int
    idle_files: int
    idle_seconds: float
    latency_samples: int


class DaemonProcess:
    def __init__(self, clients: Clients, config: Path, bucket: str) -> None:
        self.log = clients.work / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            [str(BIN / "spotwatch"), "run", "-c", str(config), "--bucket", bucket],
            env=clients.env, stdout=self._handle, stderr=subprocess.STDOUT)
        try:
            self.wait_for("daemon_started")
        except BaseException:  # a daemon that never started is not left running the run out
            self.process.kill()
            self.process.wait()
            self._handle.close()
            raise

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
        raise TimeoutError(f"no {name} in {timeout:g} s:\n{self.log.read_text()[-3000:]}")

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
        write_random_file(staging / f"shard_{shard}.pt", mib * MiB // 2)
    staging.rename(root / f"step_{step}")


def time_to_safety(store: Store, clients: Clients, sizes: DaemonSizes,
                   repeats: int) -> list[dict[str, Any]]:
    """(d) notice fired just after the last save: how long until everything is in S3.

    The whole scenario runs `repeats` times; rows keep each tool's median and range."""
    samples: dict[str, list[float]] = {}
    total = (sizes.saves + 1) * sizes.save_mib
    for _ in range(repeats):
        for tool, seconds in safety_round(store, clients, sizes):
            samples.setdefault(tool, []).append(seconds)
            print(f"  time-to-safety {tool:<28} {seconds:7.2f}s", flush=True)
    return [{"tool": tool, "seconds": summary(runs), "mib_at_notice": total}
            for tool, runs in samples.items()]


def safety_round(store: Store, clients: Clients,
                 sizes: DaemonSizes) -> list[tuple[str, float]]:
    rows = []
    shards = 2 * (sizes.saves + 1)  # save_checkpoint's two per save
    with ImdsEmulator(region=REGION) as imds:
        source = clients.work / "training"
        source.mkdir()
        bucket = store.new_bucket()
        daemon = DaemonProcess(clients, clients.spotwatch_config(source, imds=imds.url), bucket)
        for step in range(1, sizes.saves + 1):
            save_checkpoint(source, step, sizes.save_mib)
            time.sleep(3)  # the training steps between saves
        save_checkpoint(source, sizes.saves + 1, sizes.save_mib)  # the save the notice follows
        fired = time.time()
        imds.fire_spot_interruption()
        done = daemon.wait_for("flush_done")
        # Counted before the stop, whose final flush would upload what this flush missed.
        in_s3 = store.count(bucket, "data/step_")
        daemon.stop()
        if in_s3 != shards:
            raise RuntimeError(f"spotwatch's flush_done came with {in_s3} of {shards} shards")
        rows.append(("spotwatch (daemon running)", timestamp(done) - fired))
        store.drop_bucket(bucket)
        for tool in (AWS, S5CMD):
            bucket = store.new_bucket()
            took = run(clients.upload(tool, source, bucket))
            if (in_s3 := store.count(bucket, "data/step_")) != shards:
                raise RuntimeError(f"{tool} left {in_s3} of {shards} shards in S3")
            rows.append((f"{tool} at notice time", took.seconds))
            store.drop_bucket(bucket)
        shutil.rmtree(source)
    return rows


def detection_latency(store: Store, clients: Clients, sizes: DaemonSizes) -> dict[str, float]:
    """(e) from the notice appearing in IMDS to the daemon logging it, default poll interval."""
    latencies = []
    with ImdsEmulator(region=REGION) as imds:
        source = clients.work / "latency"
        source.mkdir()
        bucket = store.new_bucket()
        config = clients.spotwatch_config(source, imds=imds.url)
        raw = yaml.safe_load(config.read_text())
        del raw["imds"]["enabled"]  # keep every imds default but the endpoint
        config.write_text(yaml.safe_dump(raw))
        daemon = DaemonProcess(clients, config, bucket)
        rng = random.Random(7)
        for sample in range(1, sizes.latency_samples + 1):
            time.sleep(rng.uniform(0.3, 1.3))  # fire at a random point of the poll cycle
            fired = time.time()
            # A distinct action time per sample, so each is a new notice.
            imds.fire_spot_interruption(in_seconds=120 + 2 * sample)
            latencies.append(timestamp(daemon.wait_for("notice_detected", sample)) - fired)
        daemon.stop()
        store.drop_bucket(bucket)
    latencies.sort()
    result = {"samples": len(latencies), "p50": statistics.median(latencies),
              "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
              "max": latencies[-1], "poll_interval": 1.0}
    print(f"  detection latency p50 {result['p50']:.3f}s p99 {result['p99']:.3f}s "
          f"max {result['max']:.3f}s", flush=True)
    return result


def idle_usage(store: Store, clients: Clients, sizes: DaemonSizes) -> dict[str, float]:
    """(f) CPU and memory of a daemon watching many files that are all in S3 already."""
    source = clients.work / "idle"
    for i in range(sizes.idle_files):
        path = source / f"d_{i // 100:04d}" / f"f_{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 64)
    bucket = store.new_bucket()
    config = clients.spotwatch_config(source)
    first = run(clients.spotwatch("flush", config, bucket))
    print(f"  idle: first flush of {sizes.idle_files} files took {first.seconds:.1f}s",
          flush=True)
    daemon = DaemonProcess(clients, config, bucket)
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
    store.drop_bucket(bucket)
    shutil.rmtree(source)
    result = {"files": sizes.idle_files, "cpu_percent": 100 * cpu,
              "rss_mib": memory["VmRSS"], "peak_rss_mib": memory["VmHWM"],
              "first_flush_seconds": first.seconds}
    print(f"  idle with {sizes.idle_files} files: cpu {result['cpu_percent']:.2f}% "
          f"rss {result['rss_mib']:.1f} MiB (peak {result['peak_rss_mib']:.1f})", flush=True)
    return result
