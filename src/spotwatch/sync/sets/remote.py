"""Checkpoint sets as they are in S3: their manifests, and whether all their files are there."""

from __future__ import annotations

import structlog

from spotwatch.aws.store import ObjectMissing, ObjectStore, StoreError
from spotwatch.keys import manifest_key, manifest_prefix
from spotwatch.sync.sets.manifest import Manifest, ManifestError

log = structlog.get_logger("spotwatch.sets")


def list_manifests(store: ObjectStore, prefix: str) -> list[Manifest]:
    """Every valid manifest under the configured prefix, newest checkpoint first.

    All of them are read: when a manifest was written says nothing about how new its
    checkpoint is. A malformed one is skipped with a warning and never hides the others.
    """
    keys = [listed.key for listed in store.list_objects(manifest_prefix(prefix))]
    manifests = [m for m in (_read_manifest(store, prefix, key) for key in keys)
                 if m is not None]
    return sorted(manifests, key=lambda m: (m.newest_mtime_ns, m.sealed_at, m.set_name),
                  reverse=True)


def _read_manifest(store: ObjectStore, prefix: str, key: str) -> Manifest | None:
    try:
        body = store.get_bytes(key)
    except ObjectMissing:
        return None  # deleted since the listing (a prune): no set any more
    try:
        manifest = Manifest.from_json(body, prefix)
    except ManifestError as exc:
        log.warning("manifest_skipped", key=key, reason=str(exc))
        return None
    if key != manifest_key(prefix, manifest.set_name):
        log.warning("manifest_skipped", key=key,
                    reason=f"describes set {manifest.set_name!r}, not the one it is named for")
        return None
    return manifest


def is_complete(store: ObjectStore, manifest: Manifest) -> bool:
    """Every file the manifest lists is in the store with the listed size."""
    for entry in manifest.files:
        try:
            head = store.head(entry.key)
        except StoreError:
            return False
        if head.size != entry.size:
            return False
    return True
