"""The kernel's mount table (/proc/self/mountinfo): where file systems are mounted, and which.

One reader for every question asked of it, since its format has traps: a mount point's space,
tab, newline and backslash are written in octal (\\040), a point's bytes need not be UTF-8, and
the file system's type follows a variable number of optional fields, after a lone '-'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MOUNT_INFO = Path("/proc/self/mountinfo")
# mountinfo's fields: id, parent id, major:minor, root, mount point, options, then optional
# fields ended by "-", then the type, the source and the super block's options.
_POINT_FIELD = 4
_FIELDS_BEFORE_OPTIONAL = 6
_SEPARATOR = "-"
_ESCAPED = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    point: Path
    fs_type: str


def unescaped(field: str) -> str:
    """A mount point as the table writes it, back as the path it names."""
    return _ESCAPED.sub(lambda match: chr(int(match.group(1), 8)), field)


def mounts(table: Path | None = None) -> list[Mount] | None:
    """Every mount in the table's order (a later one at a point hides those before it);
    None when the table cannot be read. A point's bytes that are not UTF-8 come back as
    Python's own paths hold them (surrogate escapes), so they compare equal to those."""
    try:
        # newline="": a point may hold a \r as is, which universal newlines would turn to \n.
        with open(table or MOUNT_INFO, encoding="utf-8", errors="surrogateescape",
                  newline="") as file:
            text = file.read()
    except OSError:
        return None
    return list(_parsed(text))


def _parsed(text: str) -> Iterator[Mount]:
    for line in text.split("\n"):  # not splitlines(): a point may hold \v, \f or \x1c as is
        fields = line.split(" ")
        try:
            separator = fields.index(_SEPARATOR, _FIELDS_BEFORE_OPTIONAL)
        except ValueError:
            continue  # not a line of the format: nothing can be told from it
        if separator + 1 < len(fields):
            yield Mount(Path(unescaped(fields[_POINT_FIELD])), fields[separator + 1])


def is_mount_point(directory: Path) -> bool:
    """By the mount table, so that a bind mount from the same file system counts too; by the
    device numbers (os.path.ismount) when the table cannot be read."""
    table = mounts()
    if table is None:
        return os.path.ismount(directory)
    return any(mount.point == directory for mount in table)


def file_system_type(real: Path) -> str | None:
    """The type of the file system mounted nearest above a resolved path (of several at one
    point, the last, which hides the others); None when the table cannot be read."""
    table = mounts()
    if table is None:
        return None
    best: tuple[int, str] | None = None
    for mount in table:
        if real == mount.point or mount.point in real.parents:
            depth = len(mount.point.parts)
            if best is None or depth >= best[0]:
                best = (depth, mount.fs_type)
    return best[1] if best else None
