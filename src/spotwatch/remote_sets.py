"""Checkpoint sets as they are in S3: their manifests, and whether all their files are there."""

from __future__ import annotations

from typing import Any

import structlog
from botocore.exceptions import ClientError

from spotwatch.checkpoint_sets import Manifest, manifest_prefix

log = structlog.get_logger("spotwatch.sets")


def list_manifests(s3: Any, bucket: str, prefix: str, limit: int | None = None) -> list[Manifest]:
    """The manifests under the prefix, newest checkpoint first; at most `limit` of the most
    recently written are read."""
    listed: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=manifest_prefix(prefix)):
        listed.extend(page.get("Contents", []))
    listed.sort(key=lambda item: item["LastModified"], reverse=True)
    manifests = []
    for item in listed[:limit]:
        body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        try:
            manifests.append(Manifest.from_json(body.decode()))
        except (ValueError, KeyError, TypeError):
            log.warning("manifest_unreadable", key=item["Key"])
    return sorted(manifests, key=lambda m: m.newest_mtime_ns, reverse=True)


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
