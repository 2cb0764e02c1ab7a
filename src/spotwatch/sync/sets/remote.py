"""Checkpoint sets as they are in S3: their manifests, and whether all their files are there."""

from __future__ import annotations

from typing import Any

import structlog
from botocore.exceptions import ClientError

from spotwatch.keys import manifest_key, manifest_prefix
from spotwatch.sync.sets.manifest import Manifest, ManifestError

log = structlog.get_logger("spotwatch.sets")


def list_manifests(s3: Any, bucket: str, prefix: str) -> list[Manifest]:
    """Every valid manifest under the configured prefix, newest checkpoint first.

    All of them are read: when a manifest was written says nothing about how new its
    checkpoint is. A malformed one is skipped with a warning and never hides the others.
    """
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=manifest_prefix(prefix)):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    manifests = [m for m in (_read_manifest(s3, bucket, prefix, key) for key in keys)
                 if m is not None]
    return sorted(manifests, key=lambda m: (m.newest_mtime_ns, m.sealed_at, m.set_name),
                  reverse=True)


def _read_manifest(s3: Any, bucket: str, prefix: str, key: str) -> Manifest | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
            return None  # deleted since the listing (a prune): no set any more
        raise
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


def is_complete(s3: Any, bucket: str, manifest: Manifest) -> bool:
    """Every file the manifest lists is in S3 with the listed size."""
    for entry in manifest.files:
        try:
            head = s3.head_object(Bucket=bucket, Key=entry.key)
        except ClientError:
            return False
        if head["ContentLength"] != entry.size:
            return False
    return True
