"""Whether a file's own format says it is cut short: a writer killed mid-save (torch.save
straight to the final name, then SIGKILL) leaves a prefix whose close looks like any other.

Recognised by content: ZIP archives (torch.save since PyTorch 1.6, Lightning's .ckpt) and
safetensors. Only the tail of a ZIP and the header of a safetensors file are read, never the
whole file. Anything else is UNKNOWN and uploaded as before. Invariant: a verdict of cut
short is given only where the format proves it (a ZIP's end record missing, or the data a
safetensors header describes not all there), or for an empty file that cannot be what it was
(see check): a false one would keep a good file from S3.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_EMPTY = b"PK\x05\x06"  # an archive with no entries starts with its end record
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_EOCD = b"PK\x06\x06"
_ZIP64_EOCD_SIZE = 56
_CENTRAL_ENTRY = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF
# A safetensors header larger than this is no safetensors header (the reference reader's own
# limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000
# Formats whose files are never empty: a zip is at least its 22-byte end record, a
# safetensors file at least its 8-byte length and "{}".
_NEVER_EMPTY_SUFFIXES = {".pt": "zip", ".pth": "zip", ".ckpt": "zip",
                         ".safetensors": "safetensors"}


class State(str, Enum):
    COMPLETE = "complete"
    CUT_SHORT = "cut_short"
    UNKNOWN = "unknown"  # a format not recognised: uploaded as before


@dataclass(frozen=True)
class Verdict:
    state: State
    format: str = ""
    reason: str = ""

    @property
    def cut_short(self) -> bool:
        return self.state is State.CUT_SHORT


UNKNOWN = Verdict(State.UNKNOWN)


def check(path: Path, previous_size: int | None = None) -> Verdict:
    """The verdict on the file at path as it is now. previous_size: the size of the version
    uploaded before (None: none). An empty file is cut short only where it cannot be what it
    was or what its name says: its previous version held bytes (truncated by an open for
    writing, then the writer died: an empty object over a good one destroys it), or its name
    is that of a format never empty. Otherwise an empty file may be a marker, and goes up."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size == 0:
            return _empty(path, previous_size)
        file.seek(0)
        head = file.read(16)
        if head.startswith((_ZIP_LOCAL, _ZIP_EMPTY)):
            return _zip(file, size)
        if _looks_like_safetensors(head):
            return _safetensors(file, size)
    return UNKNOWN


def _empty(path: Path, previous_size: int | None) -> Verdict:
    if previous_size:
        return Verdict(State.CUT_SHORT, "empty",
                       f"empty, where the version uploaded before had {previous_size} bytes")
    format_name = _NEVER_EMPTY_SUFFIXES.get(path.suffix.lower())
    if format_name is not None:
        return Verdict(State.CUT_SHORT, format_name, f"empty, and a {format_name} file never is")
    return UNKNOWN


def _zip(file: BinaryIO, size: int) -> Verdict:
    """Complete: an end of central directory record ends the file (after the comment whose
    length it states), and the central directory it points to lies before it."""
    tail_start = max(0, size - (_EOCD_SIZE + _MAX_COMMENT + _ZIP64_LOCATOR_SIZE))
    file.seek(tail_start)
    tail = file.read()
    at = tail.rfind(_EOCD)
    while at >= 0:
        record = tail[at:at + _EOCD_SIZE]
        if len(record) == _EOCD_SIZE:
            (_, _, _, _, entries, cd_size, cd_offset,
             comment) = struct.unpack("<4s4H2LH", record)
            if at + _EOCD_SIZE + comment == len(tail):
                return _zip_directory(file, tail_start + at, tail[:at], entries, cd_size,
                                      cd_offset)
        at = tail.rfind(_EOCD, 0, at)
    return Verdict(State.CUT_SHORT, "zip", "no end of central directory record at its end")


def _zip_directory(file: BinaryIO, eocd_at: int, before: bytes, entries: int, cd_size: int,
                   cd_offset: int) -> Verdict:
    directory_end = eocd_at
    locator = before[-_ZIP64_LOCATOR_SIZE:]
    # A ZIP64 end record is read wherever its locator precedes the end record, needed or not:
    # torch.save (miniz) always writes one, between the central directory and the end record.
    if len(locator) == _ZIP64_LOCATOR_SIZE and locator.startswith(_ZIP64_LOCATOR):
        # Where it lies, not the offset the locator records: data prepended shifts that.
        record_at = eocd_at - _ZIP64_LOCATOR_SIZE - _ZIP64_EOCD_SIZE
        if record_at < 0:
            return Verdict(State.CUT_SHORT, "zip", "ZIP64 end record missing")
        file.seek(record_at)
        record = file.read(_ZIP64_EOCD_SIZE)
        if not record.startswith(_ZIP64_EOCD):
            return Verdict(State.CUT_SHORT, "zip", "ZIP64 end record missing")
        entries, cd_size, cd_offset = struct.unpack_from("<3Q", record, 32)
        directory_end = record_at
    elif entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        return Verdict(State.CUT_SHORT, "zip", "ZIP64 end record locator missing")
    # Data prepended to the archive shifts the offsets it records: the directory is taken to
    # end where the end record begins, as readers do.
    if cd_size > directory_end or cd_offset + cd_size > directory_end:
        return Verdict(State.CUT_SHORT, "zip", "central directory beyond the file")
    if entries:
        file.seek(directory_end - cd_size)
        if file.read(4) != _CENTRAL_ENTRY:
            return Verdict(State.CUT_SHORT, "zip", "central directory missing")
    return Verdict(State.COMPLETE, "zip")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack_from("<Q", head)
    return 2 <= length <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{"


def _safetensors(file: BinaryIO, size: int) -> Verdict:
    """Complete: the size is 8 + the header's length + the end of the data it describes."""
    file.seek(0)
    (length,) = struct.unpack("<Q", file.read(8))
    if size < 8 + length:
        return Verdict(State.CUT_SHORT, "safetensors",
                       f"header of {length} bytes cut at {size - 8}")
    try:
        header = json.loads(file.read(length))
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items()
                if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return UNKNOWN  # its header whole but no safetensors header: another format
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return Verdict(State.CUT_SHORT, "safetensors",
                       f"{size} bytes of the {expected} its header describes")
    return Verdict(State.COMPLETE, "safetensors")
