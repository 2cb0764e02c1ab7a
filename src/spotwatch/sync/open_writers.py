"""Which files some process still holds open for writing, as /proc tells.

Invariant: a file never seen closed is not taken as complete (the tracker's quiet rule) while a
process still holds it open for writing: a trainer that pauses mid-save with the file open would
otherwise have half a file uploaded and its set sealed. held_for_writing looks through
/proc/<pid>/fd/* for a descriptor on the file (same st_dev and st_ino) whose
/proc/<pid>/fdinfo/<fd> ``flags`` open it O_WRONLY or O_RDWR.

Files written through a memory mapping are left to the quiet rule (and the periodic rescan,
SyncEngine.rescan_when_due): a trainer may keep a numpy.memmap for its whole run, flushing it
each step, and Python's mmap keeps a read-write descriptor of its own for the mapping's life. So
a descriptor does not count when the same process maps the file writable and shared
(/proc/<pid>/maps, read only for a process found holding one). Its inode alone is compared there
(maps names the superblock's device, which btrfs subvolumes do not report in st_dev).

It only sees what /proc lets it see: a daemon that is not root sees its own user's processes
alone; a process it may not look into (or one that ends mid-scan) counts as not holding the
file, and the quiet rule applies as before. It never raises. It costs a readlink per open
descriptor of every process, so it runs only when the quiet rule would settle a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_PROC = Path("/proc")
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)

Identity = tuple[int, int]  # (st_dev, st_ino)


def file_identity(path: Path) -> Identity | None:
    try:
        stat = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def paths_held_for_writing(paths: Iterable[Path]) -> set[Path]:
    """The paths among these whose file some process visible here holds open for writing."""
    identities = {path: file_identity(path) for path in paths}
    held = held_for_writing(i for i in identities.values() if i is not None)
    return {path for path, identity in identities.items() if identity in held}


def held_for_writing(files: Iterable[Identity], proc: Path = _PROC) -> set[Identity]:
    """The files among these that some process visible here holds open for writing."""
    wanted = set(files)
    held: set[Identity] = set()
    if not wanted:
        return held
    try:
        pids = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return held
    for pid in pids:
        held |= _written_descriptors(proc / pid, wanted - held)
        if held == wanted:
            break
    return held


def _written_descriptors(process: Path, wanted: set[Identity]) -> set[Identity]:
    held: set[Identity] = set()
    try:
        descriptors = list(os.scandir(process / "fd"))
    except OSError:  # gone, or not ours to look into
        return held
    for descriptor in descriptors:
        try:
            if not os.readlink(descriptor.path).startswith("/"):
                continue  # a pipe, socket, anon_inode: no file
            stat = os.stat(descriptor.path)
        except OSError:
            continue
        identity = (stat.st_dev, stat.st_ino)
        if identity in wanted and _opened_for_writing(process / "fdinfo" / descriptor.name):
            held.add(identity)
    if held:
        mapped = _shared_writable_inodes(process)
        held = {identity for identity in held if identity[1] not in mapped}
    return held


def _opened_for_writing(fdinfo: Path) -> bool:
    try:
        text = fdinfo.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "flags":
            try:
                return (int(value.strip(), 8) & os.O_ACCMODE) in _WRITE_MODES
            except ValueError:
                return False
    return False


def _shared_writable_inodes(process: Path) -> set[int]:
    """Inodes the process maps writable and shared ("rw?s"): written through the mapping."""
    inodes: set[int] = set()
    try:
        with open(process / "maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[1][1:2] == "w" and fields[1][3:4] == "s":
                    inodes.add(int(fields[4]))
    except (OSError, ValueError):
        pass  # unreadable: its descriptors count as writers
    return inodes
