"""`spotwatch demo`: a real interruption rehearsal on this machine.

An embedded S3-compatible server (moto) and the IMDS emulator stand in for AWS; the daemon
watches a temporary checkpoint directory while a simulated trainer saves checkpoints; a spot
interruption is fired through the emulator's HTTP control API; the trainer reacts with an
emergency checkpoint; at the end every checkpoint is downloaded and compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.aws.preflight import PUBLIC_ACCESS_FLAGS
from spotwatch.config import (
    AwsSettings,
    Config,
    HookSettings,
    ImdsSettings,
    LogSettings,
    StateSettings,
    SyncSettings,
    WatchDir,
)
from spotwatch.daemon.loop import Daemon
from spotwatch.emulator import ImdsEmulator
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.interruption import interruption_pending
from spotwatch.keys import manifest_key
from spotwatch.logs import configure_logging

BUCKET = "spotwatch-demo"
REGION = "us-west-2"
PREFIX = "demo-run/"
# What the environment may say that would take the rehearsal off its own S3 and IMDS: a
# profile or endpoint for another S3, IMDS turned off (set on many laptops), stray credentials.
DEMO_IGNORES = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED",
                "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
                "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
LOOPBACK = "127.0.0.1,localhost"
CHECKPOINT_FILES = {"model.pt": 24 * 1024 * 1024, "optimizer.pt": 12 * 1024 * 1024,
                    "trainer_state.json": 2048}
STEPS_BEFORE_NOTICE = 3
SECONDS_BETWEEN_CHECKPOINTS = 1.5


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, name: str, text: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.marks.setdefault(name, now)
            print(f"  t+{now - self.started:6.2f}s  {text}", flush=True)

    def between(self, first: str, second: str) -> float:
        return self.marks[second] - self.marks[first]


def _save(directory: Path, step: int, timeline: Timeline, label: str) -> None:
    """Save one checkpoint set the way frameworks do: temp files renamed into place."""
    target = directory / f"step_{step:05d}"
    target.mkdir(parents=True, exist_ok=True)
    for name, size in CHECKPOINT_FILES.items():
        temp = target / f"{name}.tmp"
        temp.write_bytes(os.urandom(size))
        os.replace(temp, target / name)
    timeline.mark(f"saved-{step}", f"trainer saved {label} {target.name}/ "
                  f"({sum(CHECKPOINT_FILES.values()) / 2**20:.0f} MiB)")


def _trainer(directory: Path, notice_file: Path, imds_url: str, timeline: Timeline,
             done: threading.Event) -> None:
    step = 0
    for index in range(STEPS_BEFORE_NOTICE):
        if index:
            time.sleep(SECONDS_BETWEEN_CHECKPOINTS)
        step += 100
        _save(directory, step, timeline, "checkpoint")
        (directory / "scratch.tmp").write_bytes(os.urandom(4096))  # excluded by the filters
    # The worst moment: AWS marks the instance just after a save, before it is uploaded.
    requests.post(f"{imds_url}/_emulator/spot", json={"action": "terminate", "in_seconds": 120},
                  timeout=5)
    timeline.mark("fired", "AWS (emulated) issued spot/instance-action: terminate in 120 s")
    while interruption_pending(notice_file) is None:
        time.sleep(0.05)
    timeline.mark("trainer-saw", "trainer saw spotwatch.interruption_pending(): "
                  "saving an emergency checkpoint")
    _save(directory, step + 37, timeline, "emergency checkpoint")
    done.set()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify(s3: Any, directory: Path) -> tuple[int, int, list[str]]:
    """Every local checkpoint file must be in S3 with identical bytes, every set must have its
    manifest, and no excluded file may be there."""
    problems = []
    local = {PREFIX + p.relative_to(directory).as_posix(): p
             for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}
    sets = {p.name for p in directory.iterdir() if p.is_dir()}
    manifests = {manifest_key(PREFIX, name) for name in sets}
    remote = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    for key, path in sorted(local.items()):
        if key not in remote:
            problems.append(f"missing in S3: {key}")
            continue
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if _sha256(body) != _sha256(path.read_bytes()):
            problems.append(f"content differs: {key}")
    problems += [f"set without a manifest: {key}" for key in sorted(manifests - remote)]
    problems += [f"should not be uploaded: {key}"
                 for key in sorted(remote - set(local) - manifests)]
    return len(local), len(sets), problems


def run(args: argparse.Namespace) -> int:
    return run_demo()


def run_demo() -> int:
    try:  # the demo extra: not needed by the daemon itself
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ConfigError(f"the demo needs extra packages: pip install 'spotwatch[demo]' ({exc})"
                          ) from None
    print("spotwatch demo: rehearsing a spot interruption against embedded S3 and IMDS\n")
    configure_logging("warning", "console")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the embedded server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # The embedded server is the only S3 this process talks to.
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="demo",
                      AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION=REGION,
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    for name in DEMO_IGNORES:
        os.environ.pop(name, None)
    # Its S3 and IMDS are on loopback: never through a proxy the environment names.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, (os.environ.get(name), LOOPBACK)))
    try:
        with ImdsEmulator() as imds, tempfile.TemporaryDirectory(prefix="spotwatch-demo-") as tmp:
            return _rehearse(Path(tmp), imds)
    except (BotoCoreError, ClientError) as exc:
        raise SpotwatchError(f"the demo cannot reach its embedded S3: {exc}") from None
    finally:
        server.stop()


def _rehearse(root: Path, imds: ImdsEmulator) -> int:
    s3: Any = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_public_access_block(Bucket=BUCKET, PublicAccessBlockConfiguration={
        flag: True for flag in PUBLIC_ACCESS_FLAGS})
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    config = Config(
        aws=AwsSettings(region=REGION),
        watch=(WatchDir(checkpoints, prefix=PREFIX),),
        sync=SyncSettings(settle_seconds=0.2),
        imds=ImdsSettings(endpoint=imds.url),
        log=LogSettings(level="warning", format="console"),
        # The rehearsal keeps its notice to itself, never in a real daemon's runtime dir.
        hooks=HookSettings(notice_file=root / "state" / "notice.json"),
        state=StateSettings(dir=root / "state"),
    )
    print(f"  S3 (embedded):   {os.environ['AWS_ENDPOINT_URL']}  bucket {BUCKET}")
    print(f"  IMDS (emulated): {imds.url}  polled every {config.imds.poll_interval:g} s")
    print(f"  watching:        {checkpoints}\n")
    timeline = Timeline()
    daemon = Daemon(config, BUCKET)

    def listen(event: str, data: dict[str, Any]) -> None:
        if event == "notice_detected" and data["kind"] == "spot-interruption":
            timeline.mark("detected", f"spotwatch detected the notice (deadline "
                          f"{data['deadline']}) and started the flush")
        elif event == "flush_done" and data["reason"] == "spot-interruption":
            timeline.mark("flushed", f"flush done: {data['files']} files, "
                          f"{data['bytes'] / 2**20:.0f} MiB made durable in {data['seconds']} s")

    daemon.listeners.append(listen)
    exit_code: list[int] = []
    runner = threading.Thread(target=lambda: exit_code.append(daemon.run(handle_signals=False)),
                              name="daemon")
    runner.start()
    trainer_done = threading.Event()
    trainer = threading.Thread(target=_trainer, args=(checkpoints, daemon.hooks.notice_file,
                                                      imds.url, timeline, trainer_done))
    trainer.start()
    trainer.join(timeout=120)
    newest_set = max(p.name for p in checkpoints.iterdir() if p.is_dir())
    if _wait_for_object(s3, manifest_key(PREFIX, newest_set), seconds=60):
        timeline.mark("newest", f"{newest_set}/ sealed: its manifest is written after all its "
                      "files were durable in S3")
    deadline = time.monotonic() + 60
    while "flushed" not in timeline.marks and time.monotonic() < deadline:
        time.sleep(0.05)
    if {"newest", "flushed"} <= timeline.marks.keys():
        timeline.mark("safe", "every checkpoint set, the emergency one included, is safe in S3")
    daemon.request_stop()
    runner.join(timeout=60)
    return _report(s3, checkpoints, timeline, exit_code)


# Each step of the rehearsal, and what it says when the step never came.
_STEPS = (("detected", "spotwatch never detected the emulated spot notice"),
          ("trainer-saw", "the trainer was never told of the notice"),
          ("newest", "the newest checkpoint set was not sealed within 60 s"),
          ("flushed", "the notice's flush did not finish within 60 s"))


def _missed(marks: dict[str, float], exit_code: list[int]) -> list[str]:
    """Why the rehearsal failed where no object is at fault: the steps that never came, and
    a daemon that ended badly."""
    missed = [said for step, said in _STEPS if step not in marks]
    if exit_code != [0]:
        missed.append(f"the daemon exited with {exit_code[0]}" if exit_code
                      else "the daemon did not stop within 60 s")
    return missed


def _wait_for_object(s3: Any, key: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            s3.head_object(Bucket=BUCKET, Key=key)
            return True
        except ClientError:
            time.sleep(0.05)
    return False


def _report(s3: Any, checkpoints: Path, timeline: Timeline, exit_code: list[int]) -> int:
    count, sets, problems = _verify(s3, checkpoints)
    print()
    marks = timeline.marks
    if {"fired", "detected"} <= marks.keys():
        print(f"  detection latency:      {timeline.between('fired', 'detected'):.2f} s")
    if {"fired", "safe"} <= marks.keys():
        print(f"  time to safety:         {timeline.between('fired', 'safe'):.2f} s "
              f"(of the 120 s notice)")
    print(f"  verification:           {count} checkpoint files compared by SHA-256 "
          f"with the objects in S3; {sets} sets with manifests")
    problems += _missed(marks, exit_code)
    for problem in problems:
        print(f"    FAIL {problem}")
    ok = not problems and "safe" in marks
    print(f"\n{'PASS' if ok else 'FAIL'}: " + ("no checkpoint work lost" if ok else
                                               "see the failures above"))
    return 0 if ok else 1
