"""`spotwatch restore`: download the newest complete checkpoint set, never an incomplete one.

A set counts only when its manifest exists and every file it lists is in S3 with the listed
size. Files land under a temporary name and are renamed into place with their original mtime,
so a rerun skips what is already there and the daemon does not upload them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.checkpoint_sets import Manifest, ManifestEntry, object_key
from spotwatch.config import Config, WatchDir
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.ledger import FileVersion, Ledger, LedgerError
from spotwatch.progress import ProgressBar
from spotwatch.region import resolve_region
from spotwatch.remote_sets import is_complete, list_manifests
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


def _target(destination: Path, manifest: Manifest, entry: ManifestEntry) -> Path:
    if not entry.key.startswith(object_key(manifest.prefix, "")):
        raise SpotwatchError(f"manifest {manifest.set_name!r} lists a key outside its prefix: "
                             f"{entry.key!r}")
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
    s3 = make_s3_client(resolve_region(config), config.transfer)
    try:
        manifests = list_manifests(s3, bucket, watch.prefix, MANIFESTS_TO_READ)
        if set_name is not None:
            manifests = [m for m in manifests if m.set_name == set_name]
        chosen = next((m for m in manifests if is_complete(s3, bucket, m)), None)
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
        target = _target(destination, manifest, entry)
        try:
            stat = target.stat()
            if (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns):
                skipped += 1
                continue
        except FileNotFoundError:
            pass
        todo.append((entry, target))
    progress = ProgressBar(f"restoring {manifest.set_name}", sum(e.size for e, _ in todo))
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
    except (BotoCoreError, ClientError, OSError, LedgerError) as exc:
        raise SpotwatchError(f"restore of {manifest.set_name} failed: {exc}") from None
    finally:
        progress.close()
    return RestoreReport(manifest.set_name, destination, len(todo), skipped,
                         sum(e.size for e, _ in todo))
