"""`spotwatch restore`: download the newest complete checkpoint set, never an incomplete one.

A set counts only when its manifest is valid for the configured prefix and every file it lists
is in S3 with the listed size. Every file is downloaded under a temporary name and checked
against the manifest's size and checksum; only when all files of the set check out are they
renamed into place, with their original mtime, so a rerun skips what is already there and the
daemon does not upload them again. The files of a set download concurrently
(transfer.max_concurrency at a time), each checked against its manifest entry as its bytes
arrive where the store can (aws.ranged_get, the CRT), else read back once written. A set
whose bytes do not match is corrupt: its downloads are removed and the next older complete set
is restored instead, with a warning.

On a multi-node job a set counts only when it is complete for the whole job (sync.sets.parts):
the whole set is restored, or with --node-rank only the files that node's part lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from spotwatch.aws.crt_store import make_store
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.checksums import ChecksumUnavailable, ContentMismatch, expected, file_matches
from spotwatch.config import Config, JobSettings, WatchDir
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.model import FileVersion
from spotwatch.progress import ProgressBar
from spotwatch.state import StateDir
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import is_complete, list_job_sets, list_manifests

log = structlog.get_logger("spotwatch.restore")

TEMP_SUFFIX = ".spotwatch-restore"


@dataclass(frozen=True)
class RestoreReport:
    set_name: str
    destination: Path
    downloaded: int
    skipped: int
    bytes: int
    passed_over: tuple[str, ...] = field(default=())  # newer sets, incomplete or corrupt


class SetCorrupt(Exception):
    """A file of the set does not match its manifest entry."""


def _target(destination: Path, entry: ManifestEntry) -> Path:
    target = (destination / entry.path).resolve()
    if destination.resolve() not in target.parents:  # e.g. through a symlink in destination
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


def _destination(to: Path | None, watch: WatchDir) -> Path:
    """The directory to restore into; refused when it, or what would hold it, is no directory."""
    destination = (to or watch.path).absolute()
    existing = next((p for p in (destination, *destination.parents) if os.path.lexists(p)),
                    None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"cannot restore into {destination}: {existing} is not a directory")
    return destination


@dataclass(frozen=True)
class Candidate:
    """A set restore may choose. `whole` must be complete in S3; `fetch` is what is
    downloaded and verified: the whole set, or one node's part of a job's set. problem: why
    the set cannot be restored at all (a job's set missing a node's part)."""

    whole: Manifest
    fetch: Manifest
    problem: str | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> Candidate:
        return cls(manifest, manifest)


def restore(config: Config, bucket: str, to: Path | None = None, set_name: str | None = None,
            prefix: str | None = None, node_rank: int | None = None) -> RestoreReport:
    """node_rank: on a job, only that node's part of the set (the set must still be complete
    for the whole job)."""
    watch = _choose_watch(config, prefix)
    destination = _destination(to, watch)
    store = make_store(make_s3_client(resolve_region(config), config.transfer), bucket,
                       config.transfer)
    try:
        candidates = restore_candidates(store, watch.prefix, config.job, node_rank)
    except StoreError as exc:
        raise SpotwatchError(f"cannot read s3://{bucket}/{watch.prefix}: {exc}") from None
    if set_name is not None:
        candidates = [c for c in candidates if c.whole.set_name == set_name]
    # Restored into the watched directory, the files are already in S3: record them.
    ledger = Ledger(StateDir(config.state_dir).ledger) if destination == watch.path else None
    try:
        report = restore_newest(store, candidates, destination,
                                config.transfer.checksum_algorithm, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    if report is None:
        wanted = f"set {set_name!r}" if set_name else "checkpoint set"
        raise SpotwatchError(f"no complete {wanted} under s3://{bucket}/{watch.prefix}")
    return report


def restore_candidates(store: ObjectStore, prefix: str, job: JobSettings,
                       node_rank: int | None) -> list[Candidate]:
    """The sets under the prefix, newest first: a job's sets by their parts, else by their
    manifests."""
    if job.id is None or job.nodes is None:
        return [Candidate.of(manifest) for manifest in list_manifests(store, prefix)]
    candidates = []
    for job_set in list_job_sets(store, prefix, job.id, job.nodes):
        whole = job_set.whole
        problem = job_set.problem()
        fetch = whole if node_rank is None or problem else job_set.parts[node_rank]
        candidates.append(Candidate(whole, fetch, problem))
    return candidates


def restore_newest(store: ObjectStore, sets: Sequence[Manifest | Candidate], destination: Path,
                   preferred: str, ledger: Ledger | None) -> RestoreReport | None:
    """Restore the first set, newest first, that is complete and whose bytes all verify;
    preferred: the configured checksum algorithm."""
    passed_over: list[str] = []
    for candidate in sets:
        if isinstance(candidate, Manifest):
            candidate = Candidate.of(candidate)
        manifest = candidate.fetch
        try:
            if candidate.problem is not None:
                log.warning("set_incomplete", set=manifest.set_name, reason=candidate.problem)
                passed_over.append(manifest.set_name)
                continue
            if not is_complete(store, candidate.whole):
                log.warning("set_incomplete", set=manifest.set_name,
                            reason="a listed object is missing or has another size")
                passed_over.append(manifest.set_name)
                continue
            report = _download(store, manifest, destination, preferred, ledger)
        except SetCorrupt as exc:
            log.warning("set_corrupt", set=manifest.set_name, reason=str(exc),
                        action="trying the next older set")
            passed_over.append(manifest.set_name)
            continue
        except (StoreError, OSError, LedgerError) as exc:
            raise SpotwatchError(f"restore of {manifest.set_name} failed: {exc}") from None
        except ChecksumUnavailable as exc:
            raise SpotwatchError(f"cannot verify {manifest.set_name}: {exc}") from None
        return replace(report, passed_over=tuple(passed_over))
    return None


def _verify(path: Path, entry: ManifestEntry, part_size: int | None, preferred: str) -> str | None:
    """Why the file is not the one the entry describes, or None when it is."""
    if entry.checksum is None:
        return "the manifest has no checksum to verify it by"
    if path.stat().st_size != entry.size:
        return "size differs from the manifest"
    if not file_matches(path, entry.checksum, part_size, preferred):
        return "checksum differs from the manifest"
    return None


def _part_size(store: ObjectStore, entry: ManifestEntry) -> int | None:
    """The part size a composite checksum is over: from the manifest, else (manifests written
    before it was recorded) the length of the object's first part."""
    if entry.part_size is not None or entry.checksum is None or "-" not in entry.checksum:
        return entry.part_size
    size = store.head(entry.key, part_number=1).size
    return size if size > 0 else None


def _already_there(target: Path, entry: ManifestEntry, part_size: int | None,
                   preferred: str) -> bool:
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    return ((stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)
            and _verify(target, entry, part_size, preferred) is None)


@contextmanager
def _temporaries() -> Iterator[list[Path]]:
    """Temporary downloads, removed unless the caller renamed them into place."""
    temps: list[Path] = []
    try:
        yield temps
    finally:
        for temp in temps:
            with suppress(FileNotFoundError):
                temp.unlink()


def _download(store: ObjectStore, manifest: Manifest, destination: Path, preferred: str,
              ledger: Ledger | None) -> RestoreReport:
    todo: list[tuple[ManifestEntry, Path, int | None]] = []
    skipped = 0
    for entry in manifest.files:
        target = _target(destination, entry)
        part_size = _part_size(store, entry)
        if _already_there(target, entry, part_size, preferred):
            skipped += 1
        else:
            todo.append((entry, target, part_size))
    for folder in {target.parent for _, target, _ in todo}:  # once each, not once per file
        folder.mkdir(parents=True, exist_ok=True)
    progress = ProgressBar(f"restoring {manifest.set_name}", sum(e.size for e, _, _ in todo))
    try:
        with _temporaries() as temps:
            _fetch_all(store, todo, preferred, progress, temps)
            # Every file of the set checked out: only now does anything land in place.
            for (entry, target, _), temp in zip(todo, temps, strict=True):
                if ledger is not None:  # before the rename, so a running daemon skips it
                    ledger.record(store.bucket, entry.key, target,
                                  FileVersion(entry.size, entry.mtime_ns), entry.checksum,
                                  entry.part_size)
                os.replace(temp, target)
    finally:
        progress.close()
    return RestoreReport(manifest.set_name, destination, len(todo), skipped,
                         sum(e.size for e, _, _ in todo))


def _fetch_all(store: ObjectStore, todo: list[tuple[ManifestEntry, Path, int | None]],
               preferred: str, progress: ProgressBar, temps: list[Path]) -> None:
    """Download and verify every file of todo, store.max_concurrency at a time, each verified
    on the worker that downloaded it so hashing overlaps the network; temps gets the verified
    downloads in todo's order.

    On the first failure the downloads not yet started are cancelled and those under way are
    awaited, so that every temporary written, finished or not, is in temps (for the caller to
    remove) before the failure propagates.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, store.max_concurrency),
                              thread_name_prefix="restore")
    futures = [pool.submit(_fetch_verified, store, entry, target, part_size, preferred,
                           progress) for entry, target, part_size in todo]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)  # no worker still writing once the temporaries are removed
        temps.extend(future.result() for future in futures if _succeeded(future))
    failure = next((future.exception() for future in futures
                    if not future.cancelled() and future.exception() is not None), None)
    if failure is not None:
        raise failure


def _succeeded(future: Future[Path]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _fetch_verified(store: ObjectStore, entry: ManifestEntry, target: Path,
                    part_size: int | None, preferred: str, progress: ProgressBar) -> Path:
    """Download one file next to its target; SetCorrupt unless it matches its entry."""
    temp = target.with_name(f".{target.name}{TEMP_SUFFIX}")
    try:
        check = expected(entry.checksum, part_size, preferred) if entry.checksum else None
        try:
            checked = store.download(entry.key, temp, entry.size, progress, check)
        except ContentMismatch as exc:
            raise SetCorrupt(str(exc)) from None
        # Checked on the way, the bytes match the manifest's size and checksum; else read back.
        problem = None if checked else _verify(temp, entry, part_size, preferred)
        if problem is not None:
            raise SetCorrupt(f"{entry.key}: {problem}")
        os.utime(temp, ns=(entry.mtime_ns, entry.mtime_ns))
    except BaseException:
        with suppress(FileNotFoundError):
            temp.unlink()
        raise
    return temp
