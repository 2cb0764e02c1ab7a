"""Checkpoint sets and their manifests.

A checkpoint set is the first path component below a watched directory: a subdirectory such as
``step_1000/`` with everything in it, or a single top-level file. Once every file of a set is
durable in S3, a manifest listing them is written last, under ``<prefix>.spotwatch/manifests/``;
`restore` only ever trusts a set that has a manifest whose files all exist. A symlink of the
set that leads inside the watched directory has no object: the manifest lists it under
``links`` (written only when there is one, so a set without links has the manifest it always
had), with the link's text as written. A link in a set directory that leads to a file of
another set (a step saved with `embed.pt -> ../step_100/embed.pt` for a file that did not
change) also lists that file's entry (``file``): the set needs that object as much as its own,
for completeness, restore and retention alike (LinkEntry.file). One that leads to a directory of
another set (`tokenizer -> ../step_100/tokenizer`) lists the entries of that directory's files
alike (``files``, written only when there is one), each at its path as seen through the link.

A manifest read back from S3 is untrusted input: `Manifest.from_json` accepts it only when
every field has its type and every file lies inside the set, under the prefix the reader
configured (not one written in the manifest), and every link leads inside the tree restored
(keys.link_destination). Anything else raises ManifestError.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from spotwatch.checksums import ALGORITHMS
from spotwatch.keys import is_reserved, link_destination, object_key, set_name_of

MANIFEST_FORMAT = 1
# Sizes and times are 64-bit signed integers on disk, in SQLite and for os.utime.
INT64_RANGE = range(-(2**63), 2**63)


class ManifestError(ValueError):
    """A manifest that is not valid JSON of the expected shape, or names files it may not."""


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    path: str  # relative to the watched directory
    size: int
    mtime_ns: int
    checksum: str | None
    part_size: int | None = None  # multipart uploads: the part size their checksum is over
    checksum_algorithm: str | None = None  # what made the checksum (None: not recorded)
    # The ETag S3 gave the upload (None: not recorded, as in manifests written before): an
    # object replaced since has another, whatever its size (retention's check, remote.is_intact).
    etag: str | None = None


@dataclass(frozen=True)
class LinkEntry:
    """A symlink of the set: no object, only its text (see sync.links).

    file: where the link, in a set directory, leads to a file of another set, that file's
    entry as it was when the set was sealed (None: a link within its set, a pointer link
    such as `last.ckpt`, or a manifest written before). The set is complete only while that
    object is in S3 as the entry says, and restore can verify and fetch it from the entry
    alone, whether or not its own set is still there.

    files: where the link leads to a directory of another set, the entries of every regular
    file below it as they were when the set was sealed, each at its path as seen through the
    link (`step_200/tokenizer/vocab.json`) with the key of the other set's object; needed as
    `file` is. Empty for any other link, or a directory without files."""

    path: str  # relative to the watched directory
    target: str  # as the link holds it: relative to the link's own directory
    file: ManifestEntry | None = None
    files: tuple[ManifestEntry, ...] = ()

    @property
    def linked(self) -> tuple[ManifestEntry, ...]:
        """The files of another set the link makes part of its set, each at its path as seen
        through the link: where restore puts their bytes when the link cannot be made."""
        return self.files if self.file is None else (replace(self.file, path=self.path),)

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "target": self.target}
        # Each only when there is one: older readers see any other link as before.
        if self.file is not None:
            data["file"] = vars(self.file)
        if self.files:
            data["files"] = [vars(entry) for entry in self.files]
        return data


@dataclass(frozen=True)
class Manifest:
    set_name: str
    prefix: str
    files: tuple[ManifestEntry, ...]
    sealed_at: float
    links: tuple[LinkEntry, ...] = ()

    @property
    def linked_files(self) -> tuple[ManifestEntry, ...]:
        """The files of other sets that links of this set lead to (LinkEntry.file and .files),
        each at its own path, as that set lists it."""
        space = len(object_key(self.prefix, ""))
        return tuple(replace(entry, path=entry.key[space:])
                     for link in self.links for entry in link.linked)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def newest_mtime_ns(self) -> int:
        return max((f.mtime_ns for f in self.files), default=0)

    def to_json(self) -> str:
        # Not indented: json's C encoder only runs without indent, and a set may hold
        # thousands of files.
        return json.dumps(self.as_data())

    def as_data(self) -> dict[str, Any]:
        # vars() rather than asdict(): the entries hold no nested data.
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "set": self.set_name,
            "prefix": self.prefix,
            "files": [vars(f) for f in self.files],
            "bytes": self.bytes,
            "newest_mtime_ns": self.newest_mtime_ns,
            "sealed_at": self.sealed_at,
        }
        if self.links:
            data["links"] = [link.as_data() for link in self.links]
        return data

    @classmethod
    def from_json(cls, text: str | builtins.bytes, prefix: str) -> Manifest:
        """The manifest of a set under `prefix` (the configured one); ManifestError unless
        every field has its type, every path is a clean relative path inside the set, every
        key is exactly `prefix` + path, and every link leads inside the tree."""
        return cls.from_data(json_object(text), prefix)

    @classmethod
    def from_data(cls, data: dict[str, Any], prefix: str) -> Manifest:
        """from_json, on the JSON object already decoded."""
        if field_of(data, "format", int) != MANIFEST_FORMAT:
            raise ManifestError(f"unknown manifest format {data['format']!r}")
        set_name = field_of(data, "set", str)
        if (set_name != set_name_of(set_name) or not _is_clean_path(set_name)
                or is_reserved(set_name)):
            raise ManifestError(f"invalid set name {set_name!r}")
        # 'run1' and 'run1/' name one key space (object_key adds the '/'): a config that
        # gained or lost the slash since must still find every set sealed before.
        if object_key(field_of(data, "prefix", str), "") != object_key(prefix, ""):
            raise ManifestError(f"written for prefix {data['prefix']!r}, not {prefix!r}")
        raw_files = field_of(data, "files", list)
        links = tuple(_link(raw, prefix, set_name)
                      for raw in _optional_field(data, "links", list) or ())
        if not raw_files and not links:
            raise ManifestError("lists no files")
        files = tuple(_entry(raw, prefix, set_name) for raw in raw_files)
        refuse_clashing_paths([f.path for f in files] + [link.path for link in links])
        return cls(set_name, prefix, files, time_field(data, "sealed_at"), links)

    @classmethod
    def build(cls, set_name: str, prefix: str, files: list[ManifestEntry],
              links: list[LinkEntry] | None = None) -> Manifest:
        return cls(set_name, prefix, tuple(sorted(files, key=lambda f: f.key)), time.time(),
                   tuple(sorted(links or (), key=lambda link: link.path)))


# Where a string decoded from JSON may hold a UTF-16 surrogate: a JSON escape of one (a pair
# of them is one character, a lone one is none), or one encoded as UTF-8 or held as it is,
# which json.loads lets through.
_MAY_HOLD_SURROGATES = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_MAY_HOLD_SURROGATES_IN_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def json_object(text: str | builtins.bytes) -> dict[str, Any]:
    """The JSON object the text holds. Invariant: every string in it is Unicode that UTF-8
    can carry (a file name, a key): JSON's escapes can write a lone surrogate, which no file
    system call or S3 request takes (UnicodeEncodeError deep in a restore)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also undecodable bytes, deep nesting
        raise ManifestError(f"not JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ManifestError("not a JSON object")
    if (_MAY_HOLD_SURROGATES_IN_BYTES.search(text) if isinstance(text, bytes)
            else _MAY_HOLD_SURROGATES.search(text)):  # rare: only then is every string read
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError("a string holds a lone surrogate, not Unicode text") from None
    return data


def time_field(data: dict[str, Any], name: str) -> float:
    """A time in seconds: a finite number a float can hold (a 400-digit integer cannot)."""
    value = field_of(data, name, (int, float))
    try:
        seconds = float(value)
    except OverflowError:
        raise ManifestError(f"field {name!r} is out of range") from None
    if not math.isfinite(seconds):
        raise ManifestError(f"field {name!r} is not a finite number")
    return seconds


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def field_of(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    # bool is an int to Python, never to a manifest.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"field {name!r} is missing or not of type {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "/".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _optional_field(data: dict[str, Any], name: str, kind: type) -> Any:
    return None if data.get(name) is None else field_of(data, name, kind)


def _is_clean_path(path: str) -> bool:
    """Relative, no empty, '.' or '..' component, no NUL: it names one place below a root."""
    return ("\0" not in path and not path.startswith("/")
            and all(part not in ("", ".", "..") for part in path.split("/")))


def refuse_clashing_paths(paths: list[str]) -> None:
    """Each path names one file: none is listed twice, and none is also a directory holding
    another listed path (a file tree cannot have both, and no restore could write both)."""
    listed = set(paths)
    if len(listed) != len(paths):
        raise ManifestError("a path is listed twice")
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in listed:
                raise ManifestError(f"path {'/'.join(parts[:depth])!r} is listed both as a "
                                    f"file and as the directory of {path!r}")


def _path_in_set(raw: object, what: str, set_name: str) -> tuple[dict[str, Any], str]:
    if not isinstance(raw, dict):
        raise ManifestError(f"a {what} entry is not an object")
    path = field_of(raw, "path", str)
    if not _is_clean_path(path) or set_name_of(path) != set_name:
        raise ManifestError(f"path {path!r} is not a clean path inside set {set_name!r}")
    return raw, path


def _link(raw: object, prefix: str, set_name: str) -> LinkEntry:
    raw, path = _path_in_set(raw, "link", set_name)
    target = field_of(raw, "target", str)
    if link_destination(path, target) is None:
        raise ManifestError(f"link {path!r} does not lead inside the tree: {target!r}")
    linked = _optional_field(raw, "file", dict)
    files = tuple(_seen_through(entry, prefix, path)
                  for entry in _optional_field(raw, "files", list) or ())
    if linked is not None and files:
        raise ManifestError(f"link {path!r} leads both to a file and to a directory")
    refuse_clashing_paths([entry.path for entry in files])
    return LinkEntry(path, target, None if linked is None else _linked_file(linked, prefix),
                     files)


def _seen_through(raw: object, prefix: str, link_path: str) -> ManifestEntry:
    """A file of a link's directory (LinkEntry.files): below the link, with the key of an
    object of another set, refused as a link's file is (_linked_file)."""
    raw, path = _path_in_set(raw, "linked file", set_name_of(link_path))
    if not path.startswith(link_path + "/"):
        raise ManifestError(f"{path!r} is not below link {link_path!r}")
    key = field_of(raw, "key", str)
    space = object_key(prefix, "")
    if not key.startswith(space):
        raise ManifestError(f"key {key!r} is not under prefix {prefix!r}")
    return replace(_linked_file({**raw, "path": key[len(space):]}, prefix), path=path)


def _linked_file(raw: dict[str, Any], prefix: str) -> ManifestEntry:
    """A link's file (LinkEntry.file): an entry of another set under the same prefix, never
    of spotwatch's own key space."""
    path = field_of(raw, "path", str)
    if is_reserved(set_name_of(path)):
        raise ManifestError(f"a link leads to {path!r}, in spotwatch's own key space")
    return _entry(raw, prefix, set_name_of(path))


def _entry(raw: object, prefix: str, set_name: str) -> ManifestEntry:
    raw, path = _path_in_set(raw, "file", set_name)
    key = field_of(raw, "key", str)
    if key != object_key(prefix, path):
        raise ManifestError(f"key {key!r} is not {object_key(prefix, path)!r}")
    size = field_of(raw, "size", int)
    part_size = _optional_field(raw, "part_size", int)
    mtime_ns = field_of(raw, "mtime_ns", int)
    if size < 0 or (part_size is not None and part_size <= 0):
        raise ManifestError(f"negative size or part size for {path!r}")
    if not all(number in INT64_RANGE for number in (size, part_size or 0, mtime_ns)):
        raise ManifestError(f"size, part size or mtime out of range for {path!r}")
    algorithm = _optional_field(raw, "checksum_algorithm", str)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ManifestError(f"unknown checksum algorithm {algorithm!r} for {path!r}")
    return ManifestEntry(key, path, size, mtime_ns, _optional_field(raw, "checksum", str),
                         part_size, algorithm, _optional_field(raw, "etag", str))
