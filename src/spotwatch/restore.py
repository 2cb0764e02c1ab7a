"""`spotwatch restore`: download the newest complete checkpoint set, never an incomplete one.

A set counts only when its manifest exists and every file it lists is in S3 with the listed
size. Files land under a temporary name and are renamed into place with their original mtime,
so a rerun skips what is already there and the daemon does not upload them again.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.checkpoint_sets import Manifest, ManifestEntry, manifest_prefix
from spotwatch.config import Config, WatchDir
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.ledger import FileVersion, Ledger
from spotwatch.state import StateDir
from spotwatch.uploader import make_s3_client, transfer_config

log = structlog.get_logger("spotwatch.restore")

# Manifests are read newest-written first; older ones can only be older checkpoints.
MANIFESTS_TO_READ = 50


@dataclass(frozen=True)
class RestoreReport:
    set_name: str
    destination: Path
    downloaded: int
    skipped: int
    bytes: int


class _Progress:
    """One line on a terminal, rewritten as bytes arrive; silent otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self._label = label
        self._total = max(total, 1)
        self._done = 0
        self._lock = threading.Lock()
        self._enabled = sys.stderr.isatty()

    def __call__(self, amount: int) -> None:
        with self._lock:
            self._done += amount
            if self._enabled:
                percent = 100 * self._done / self._total
                print(f"\r{self._label}: {self._done / 2**20:8.1f} / "
                      f"{self._total / 2**20:.1f} MiB ({percent:5.1f}%)",
                      end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._enabled:
            print(file=sys.stderr)


def _manifests(s3: Any, bucket: str, prefix: str) -> list[Manifest]:
    listed: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=manifest_prefix(prefix)):
        listed.extend(page.get("Contents", []))
    listed.sort(key=lambda item: item["LastModified"], reverse=True)
    manifests = []
    for item in listed[:MANIFESTS_TO_READ]:
        body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        try:
            manifests.append(Manifest.from_json(body.decode()))
        except (ValueError, KeyError, TypeError):
            log.warning("manifest_unreadable", key=item["Key"])
    return sorted(manifests, key=lambda m: m.newest_mtime_ns, reverse=True)


def _is_complete(s3: Any, bucket: str, manifest: Manifest) -> bool:
    for entry in manifest.files:
        try:
            head = s3.head_object(Bucket=bucket, Key=entry.key)
        except ClientError:
            return False
        if head["ContentLength"] != entry.size:
            return False
    return True


def _target(destination: Path, entry: ManifestEntry) -> Path:
    target = (destination / entry.path).resolve()
    if destination.resolve() not in target.parents:
        raise SpotwatchError(f"manifest path escapes the destination: {entry.path!r}")
    return target


def _choose_watch(config: Config, prefix: str | None) -> WatchDir:
    if prefix is not None:
        for watch in config.watch:
            if watch.prefix == prefix:
                return watch
        raise ConfigError(f"no watched directory has prefix {prefix!r}")
    if len(config.watch) > 1:
        raise ConfigError("several watched directories: choose one with --prefix")
    return config.watch[0]


def restore(config: Config, bucket: str, to: Path | None = None, set_name: str | None = None,
            prefix: str | None = None) -> RestoreReport:
    watch = _choose_watch(config, prefix)
    destination = (to or watch.path).absolute()
    s3 = make_s3_client(config.region, config.transfer)
    try:
        manifests = _manifests(s3, bucket, watch.prefix)
        if set_name is not None:
            manifests = [m for m in manifests if m.set_name == set_name]
        chosen = next((m for m in manifests if _is_complete(s3, bucket, m)), None)
    except (BotoCoreError, ClientError) as exc:
        raise SpotwatchError(f"cannot read s3://{bucket}/{watch.prefix}: {exc}") from None
    if chosen is None:
        wanted = f"set {set_name!r}" if set_name else "checkpoint set"
        raise SpotwatchError(f"no complete {wanted} under s3://{bucket}/{watch.prefix}")
    # Restored into the watched directory, the files are already in S3: record them.
    ledger = Ledger(StateDir(config.state_dir).ledger) if destination == watch.path else None
    try:
        return _download(s3, bucket, chosen, destination, config, ledger)
    finally:
        if ledger is not None:
            ledger.close()


def _download(s3: Any, bucket: str, manifest: Manifest, destination: Path, config: Config,
              ledger: Ledger | None) -> RestoreReport:
    todo: list[tuple[ManifestEntry, Path]] = []
    skipped = 0
    for entry in manifest.files:
        target = _target(destination, entry)
        try:
            stat = target.stat()
            if (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns):
                skipped += 1
                continue
        except FileNotFoundError:
            pass
        todo.append((entry, target))
    progress = _Progress(f"restoring {manifest.set_name}", sum(e.size for e, _ in todo))
    tuning = transfer_config(config.transfer)
    try:
        for entry, target in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.spotwatch-restore")
            s3.download_file(bucket, entry.key, str(temp), Config=tuning, Callback=progress)
            os.utime(temp, ns=(entry.mtime_ns, entry.mtime_ns))
            if ledger is not None:  # before the rename, so a running daemon skips it
                ledger.record(bucket, entry.key, target, FileVersion(entry.size, entry.mtime_ns),
                              entry.checksum)
            os.replace(temp, target)
    except (BotoCoreError, ClientError, OSError) as exc:
        raise SpotwatchError(f"restore of {manifest.set_name} failed: {exc}") from None
    finally:
        progress.close()
    return RestoreReport(manifest.set_name, destination, len(todo), skipped,
                         sum(e.size for e, _ in todo))
