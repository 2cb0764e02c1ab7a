"""Checkpoint sets and their manifests.

A checkpoint set is the first path component below a watched directory: a subdirectory such as
``step_1000/`` with everything in it, or a single top-level file. Once every file of a set is
durable in S3, a manifest listing them is written last, under ``<prefix>.spotwatch/manifests/``;
`restore` only ever trusts a set that has a manifest whose files all exist.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

MANIFEST_DIR = ".spotwatch/manifests/"
WRITE_PROBE = ".spotwatch/probe-"  # `spotwatch check` writes and deletes <prefix>probe-<host>
MANIFEST_FORMAT = 1
S3_KEY_MAX_BYTES = 1024


def object_key(prefix: str, relative_path: str) -> str:
    """The key of a file below a watched directory; refuses anything that would leave the
    prefix (an absolute path or a '..' component), whatever produced the path."""
    if relative_path.startswith("/") or ".." in relative_path.split("/"):
        raise ValueError(f"path escapes the watched directory: {relative_path!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + relative_path


def storable_key(prefix: str, relative_path: str) -> str:
    """The key of a file below a watched directory, once sure that S3 can store both it and
    its set's manifest; ValueError saying why not otherwise.

    Invariant: a name S3 cannot take never reaches the ledger or S3. Such a name is one with
    bytes that are not UTF-8 (Python keeps them as surrogate escapes, which neither SQLite nor
    S3 accepts), or whose key or set manifest key exceeds S3's 1,024 bytes of UTF-8.
    """
    key = object_key(prefix, relative_path)
    for what, candidate in (("key", key),
                            ("set manifest key", manifest_key(prefix, set_name_of(relative_path)))):
        try:
            size = len(candidate.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("name is not valid UTF-8") from None
        if size > S3_KEY_MAX_BYTES:
            raise ValueError(f"{what} would be {size} bytes, S3 takes at most {S3_KEY_MAX_BYTES}")
    return key


def set_name_of(relative_path: str) -> str:
    return relative_path.split("/", 1)[0]


def manifest_prefix(prefix: str) -> str:
    return object_key(prefix, MANIFEST_DIR)


def manifest_key(prefix: str, set_name: str) -> str:
    return manifest_prefix(prefix) + f"{set_name}.json"


def belongs_to_set(key: str, set_key: str) -> bool:
    return key == set_key or key.startswith(set_key + "/")


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    path: str  # relative to the watched directory
    size: int
    mtime_ns: int
    checksum: str | None


@dataclass(frozen=True)
class Manifest:
    set_name: str
    prefix: str
    files: tuple[ManifestEntry, ...]
    sealed_at: float

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def newest_mtime_ns(self) -> int:
        return max((f.mtime_ns for f in self.files), default=0)

    def to_json(self) -> str:
        # Not indented: json's C encoder only runs without indent, and a set may hold
        # thousands of files. vars() rather than asdict(): the entries hold no nested data.
        return json.dumps({
            "format": MANIFEST_FORMAT,
            "set": self.set_name,
            "prefix": self.prefix,
            "files": [vars(f) for f in self.files],
            "bytes": self.bytes,
            "newest_mtime_ns": self.newest_mtime_ns,
            "sealed_at": self.sealed_at,
        })

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        files = tuple(ManifestEntry(**entry) for entry in data["files"])
        return cls(data["set"], data["prefix"], files, float(data["sealed_at"]))

    @classmethod
    def build(cls, set_name: str, prefix: str, files: list[ManifestEntry]) -> Manifest:
        return cls(set_name, prefix, tuple(sorted(files, key=lambda f: f.key)), time.time())
