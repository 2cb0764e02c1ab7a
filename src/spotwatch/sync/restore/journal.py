"""What the ledger records of a set restored into the watched directory."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from spotwatch.keys import object_key
from spotwatch.model import FileVersion
from spotwatch.sync.downloads import FileToFetch
from spotwatch.sync.ledger import Ledger, SavedSet
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry


def _record(ledger: Ledger, bucket: str, entry: ManifestEntry, target: Path,
            sealed_at: float) -> None:
    """As uploaded when its set was sealed: status's last upload is one this host made, or
    the newest set's (a restore uploads nothing)."""
    ledger.record(bucket, entry.key, target, FileVersion(entry.size, entry.mtime_ns),
                  entry.checksum, entry.part_size, entry.checksum_algorithm, entry.etag,
                  uploaded_at=sealed_at)


class SetJournal:
    """What the ledger records of a set restored into the watched directory (place_all's
    Journal), put back as it was when the set does not land whole.

    Invariant: every file of a set restored into the watched directory is in the ledger as
    the object it came from, also one that was there already (a kept checkpoint volume, a
    fresh state directory): the daemon uploads none of them again, nor seals the set anew
    (on a job, its part would list every node's files, and a part of a job of another size
    would take the place of this rank's). No row stays for a file a failed restore took back:
    delete mirroring (sync.delete) would delete its object from S3."""

    def __init__(self, ledger: Ledger, bucket: str, manifest: Manifest,
                 todo: Sequence[tuple[FileToFetch, Path]], unrecorded: Collection[str],
                 there: Sequence[tuple[ManifestEntry, Path]]) -> None:
        self._ledger = ledger
        self._bucket = bucket
        self._set_key = object_key(manifest.prefix, manifest.set_name)
        self._sealed_at = manifest.sealed_at
        self._todo = todo
        self._unrecorded = unrecorded
        self._there = there
        self._saved: SavedSet | None = None

    def begin(self) -> None:
        self._saved = self._ledger.saved_set(self._bucket, self._set_key)
        # Settled before the first rename: a restore killed between two (kill -9, a power
        # loss) leaves part of the set in place, and a daemon starting then must not seal
        # that part over the manifest it came from.
        self._ledger.set_settled(self._bucket, self._set_key, True)

    def placing(self, index: int) -> None:
        file, target = self._todo[index]
        if file.entry.path not in self._unrecorded:  # before the rename: a daemon skips it
            _record(self._ledger, self._bucket, file.entry, target, self._sealed_at)

    def end(self) -> None:
        with self._ledger.transaction():
            for entry, target in self._there:
                _record(self._ledger, self._bucket, entry, target, self._sealed_at)

    def revert(self) -> None:
        if self._saved is not None:
            self._ledger.put_back(self._saved)
