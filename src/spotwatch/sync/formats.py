"""Whether a file's own format says it is cut short: a writer killed mid-save (torch.save
straight to the final name, then SIGKILL) leaves a prefix whose close looks like any other.

Recognised by content: ZIP archives (torch.save since PyTorch 1.6, Lightning's .ckpt) and,
by name and content, safetensors. Only the tail of a ZIP and the header of a safetensors file
are read, never the whole file. Anything else is UNKNOWN and uploaded as before. Invariant: a
verdict of cut short is given only where the format proves it (no end record ends the ZIP, or
the data a safetensors header describes is not all there), or for a file named as a format
never empty that holds no more than the first bytes every file of it starts with (none, or
`PK` of a .pt): a false one would keep a good file from S3. What proves nothing (bytes after a
ZIP's end record, a header that does not parse) is UNKNOWN.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

_ZIP_LOCAL = b"PK\x03\x04"
_EOCD = b"PK\x05\x06"  # also how an archive with no entries starts
_EOCD_SIZE = 22
_DIRECTORY_ENTRY = b"PK\x01\x02"  # how the central directory's first entry starts
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_MAX_COMMENT = 0xFFFF
# A safetensors header larger than this is no safetensors header (the reference reader's own
# limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000
# Formats whose files are never empty: a zip is at least its 22-byte end record, a
# safetensors file at least its 8-byte length and "{}".
_NEVER_EMPTY_SUFFIXES = {".pt": "zip", ".pth": "zip", ".ckpt": "zip",
                         ".safetensors": "safetensors"}
# What every safetensors file starts with: its header's 8-byte length, and the header's "{".
_SAFETENSORS_START = 9


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


def check(path: Path) -> Verdict:
    """The verdict on the file at path as it is now. An empty file is cut short only where
    its name is that of a format never empty (a Lightning .ckpt its writer died before
    writing to); any other empty file may be a marker, or emptied on purpose, and goes up.
    So is a file of such a name that holds only the first bytes its format starts with."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        file.seek(0)
        head = file.read(16)
        short = _shorter_than_its_start(path, head)
        if short is not None:
            return short
        if head.startswith((_ZIP_LOCAL, _EOCD)):
            return _zip(file, size)
        if path.suffix.lower() == ".safetensors" and _looks_like_safetensors(head):
            return _safetensors(file, size)
    return UNKNOWN


def _shorter_than_its_start(path: Path, head: bytes) -> Verdict | None:
    """Cut short: a file of a format never empty, by its name, that holds less than the bytes
    every file of the format starts with, and only a prefix of them: empty, or `P`, `PK` or
    `PK\x03` of a .pt, or up to 8 bytes of a .safetensors file (a 5-byte pickle named .pt is
    no zip's prefix, and proves nothing). None: longer than that, or of another format."""
    format_name = _NEVER_EMPTY_SUFFIXES.get(path.suffix.lower())
    if format_name == "zip":
        short = len(head) < len(_ZIP_LOCAL) and (
            _ZIP_LOCAL.startswith(head) or _EOCD.startswith(head))
    else:
        short = format_name == "safetensors" and len(head) < _SAFETENSORS_START
    if format_name is None or not short:
        return None
    if not head:
        return Verdict(State.CUT_SHORT, format_name, f"empty, and a {format_name} file never is")
    return Verdict(State.CUT_SHORT, format_name,
                   f"{len(head)} bytes, fewer than every {format_name} file starts with")


def _zip(file: BinaryIO, size: int) -> Verdict:
    """Complete: an end of central directory record ends the file, after the comment whose
    length it states (every complete archive has one within the last 64 KiB + 22 bytes).
    Cut short: none does, and a record (or the comment it states) runs past the end, or no
    record is there at all. Records that all end before the file does (bytes appended after
    an archive) prove nothing: UNKNOWN. The signature alone is no record: a member's bytes may
    hold it (_states_its_directory)."""
    tail_start = max(0, size - (_EOCD_SIZE + _MAX_COMMENT))
    file.seek(tail_start)
    tail = file.read()
    overruns = appended = False
    at = tail.rfind(_EOCD)
    while at >= 0:
        record = tail[at:at + _EOCD_SIZE]
        if len(record) < _EOCD_SIZE:
            overruns = True
        elif _states_its_directory(file, record, tail_start + at):
            (comment,) = struct.unpack_from("<H", record, 20)
            end = at + _EOCD_SIZE + comment
            if end == len(tail):
                return Verdict(State.COMPLETE, "zip")
            overruns = overruns or end > len(tail)
            appended = appended or end < len(tail)
        at = tail.rfind(_EOCD, 0, at)
    if overruns:
        return Verdict(State.CUT_SHORT, "zip", "its end record runs past the end of the file")
    if appended:
        return UNKNOWN
    return Verdict(State.CUT_SHORT, "zip", "no end of central directory record")


def _states_its_directory(file: BinaryIO, record: bytes, position: int) -> bool:
    """Whether the end record at position is one, and not a member's bytes that hold its
    signature: its disk numbers and entry counts agree, and a ZIP64 locator is right before
    it, or the central directory of the size it states ends right before it (and starts with
    a directory entry, or holds none). Said from the record's own position, so that bytes
    before the archive (a stub) change nothing."""
    disk, directory_disk, on_this_disk, entries, directory_size = (
        int(field) for field in struct.unpack_from("<4HI", record, 4))
    if (disk, on_this_disk) != (directory_disk, entries):  # one disk: the archive's own
        return False
    if position >= _ZIP64_LOCATOR_SIZE and _bytes_at(
            file, position - _ZIP64_LOCATOR_SIZE, len(_ZIP64_LOCATOR)) == _ZIP64_LOCATOR:
        return True
    if entries == 0:
        return directory_size == 0
    return directory_size <= position and _bytes_at(
        file, position - directory_size, len(_DIRECTORY_ENTRY)) == _DIRECTORY_ENTRY


def _bytes_at(file: BinaryIO, position: int, length: int) -> bytes:
    file.seek(position)
    return file.read(length)


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
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError):
        return UNKNOWN  # its header whole but no safetensors header: another format
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return Verdict(State.CUT_SHORT, "safetensors",
                       f"{size} bytes of the {expected} its header describes")
    return Verdict(State.COMPLETE, "safetensors")
