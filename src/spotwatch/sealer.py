"""Writes a checkpoint set's manifest once every file of the set is durable and nothing of it
is still pending, uploading or being written."""

from __future__ import annotations

import os
import time
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from pathlib import Path

import structlog

from spotwatch.checkpoint_sets import Manifest, ManifestEntry, manifest_key
from spotwatch.ledger import Ledger
from spotwatch.planner import SetRef
from spotwatch.uploader import Uploader

log = structlog.get_logger("spotwatch.sets")

RETRY_SECONDS = 2.0
MAX_ATTEMPTS = 3


class SetSealer:
    """Manifest uploads run on the uploader's threads, so the daemon's loop never waits for
    one; a set that gains a file while its manifest is on the way is sealed again after."""

    def __init__(self, ledger: Ledger, uploader: Uploader) -> None:
        self._ledger = ledger
        self._uploader = uploader
        self._dirty: dict[SetRef, int] = {}  # set -> generation, bumped by every new file
        self._sending: dict[SetRef, tuple[int, Future[None], Manifest, str]] = {}
        self._attempts: dict[SetRef, int] = {}
        self._not_before: dict[SetRef, float] = {}

    def __bool__(self) -> bool:
        return bool(self._dirty)

    def unsealed(self) -> set[str]:
        """Keys of the sets still waiting for their manifest."""
        return {set_ref.key for set_ref in self._dirty}

    def mark_dirty(self, set_ref: SetRef) -> None:
        self._dirty[set_ref] = self._dirty.get(set_ref, 0) + 1

    def seal_ready(self, busy_set_keys: AbstractSet[str]) -> None:
        self._collect_sent()
        now = time.monotonic()
        for set_ref, generation in list(self._dirty.items()):
            if (set_ref in self._sending or set_ref.key in busy_set_keys
                    or self._not_before.get(set_ref, 0) > now):
                continue
            entries = self._current_entries(set_ref)
            if not entries:
                self._done(set_ref)  # nothing of the set is left locally: no manifest
                continue
            manifest = Manifest.build(set_ref.name, set_ref.prefix, entries)
            key = manifest_key(set_ref.prefix, set_ref.name)
            future = self._uploader.put_small_async(key, manifest.to_json().encode(),
                                                    "application/json")
            self._sending[set_ref] = (generation, future, manifest, key)

    def _collect_sent(self) -> None:
        for set_ref, (generation, future, manifest, key) in list(self._sending.items()):
            if not future.done():
                continue
            del self._sending[set_ref]
            error = future.exception()
            if error is None:
                log.info("set_complete", set=set_ref.key, files=len(manifest.files),
                         bytes=manifest.bytes, manifest=key)
                if self._dirty.get(set_ref) == generation:
                    self._done(set_ref)
                continue
            attempts = self._attempts[set_ref] = self._attempts.get(set_ref, 0) + 1
            if attempts >= MAX_ATTEMPTS:
                log.error("set_manifest_failed", set=set_ref.key, error=str(error),
                          attempts=attempts)
                self._done(set_ref)
                continue
            self._not_before[set_ref] = time.monotonic() + RETRY_SECONDS
            log.warning("set_manifest_retry", set=set_ref.key, error=str(error))

    def _done(self, set_ref: SetRef) -> None:
        self._dirty.pop(set_ref, None)
        self._attempts.pop(set_ref, None)
        self._not_before.pop(set_ref, None)

    def _current_entries(self, set_ref: SetRef) -> list[ManifestEntry]:
        """The set's uploaded files that still match the local files (deleted ones drop out)."""
        entries = []
        for key, path, size, mtime_ns, checksum in self._ledger.objects_in_set(
                self._uploader.bucket, set_ref.key):
            try:
                stat = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
                continue  # changed since: its new version will mark the set again
            relative = Path(path).relative_to(set_ref.root).as_posix()
            entries.append(ManifestEntry(key, relative, size, mtime_ns, checksum))
        return entries
