"""Where a set's files land below the destination, and where their bytes wait until the set
checks out."""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from stat import S_ISDIR, S_ISREG

from spotwatch.config import at_or_below
from spotwatch.errors import SpotwatchError
from spotwatch.keys import is_restore_temporary, restore_temporary_for, set_name_of
from spotwatch.logs import get_logger, printable_path
from spotwatch.sync.restore.candidates import file_paths
from spotwatch.sync.sets.manifest import Manifest

log = get_logger("spotwatch.restore")



class Targets:
    """Where the files of a set land below a destination: each folder is resolved once (a
    resolve per file cost more than a small file's download). Refused when a symlink would
    lead a folder out of the destination or out of its own set's folder, or two files to one.

    Invariants:
    - a symlink already at a file's own path is never written through (it may lead out of
      the destination, or to another file of the set): the file replaces it;
    - a set's files land in its own folder only: a symlinked folder already in the
      destination that leads elsewhere (`step_2 -> step_1`, `step_2/opt -> ../step_1/opt`)
      would have them overwrite another checkpoint's files, which a daemon watching would
      then upload over that checkpoint's objects. Restore refuses it before any download."""

    def __init__(self, destination: Path) -> None:
        self.root = destination.resolve()
        self._folders: dict[PurePosixPath, Path] = {}
        self._taken: dict[Path, str] = {}  # target -> the manifest path that goes there

    def of(self, path: str) -> Path:
        """Where the manifest path (clean: relative, no '..') lands."""
        relative = PurePosixPath(path)
        folder = self._folders.get(relative.parent)
        if folder is None:
            folder = self._folders[relative.parent] = self._resolved(
                self.root / relative.parent, path)
            self._refuse_file_in_the_way(folder, path)
        target = folder / relative.name
        other = self._taken.setdefault(target, path)
        if other != path:  # through a symlinked folder already in the destination
            raise SpotwatchError(f"manifest paths {other!r} and {path!r} lead to the same "
                                 f"file {target}")
        return target

    def _refuse_file_in_the_way(self, folder: Path, path: str) -> None:
        """A file where the set has a folder is refused before any download, as a folder
        where it has a file is (see set_fetch._already_there): restore replaces neither."""
        for above in (folder, *folder.parents):
            if os.path.lexists(above):
                if not above.is_dir():
                    raise SpotwatchError(f"cannot restore {path!r}: {above} is a file, "
                                         f"not a directory")
                return
            if above == self.root:  # made by the restore (its own parents checked already)
                return

    def _resolved(self, folder: Path, path: str) -> Path:
        """The folder resolved, if it stays in its set's own folder below the destination (a
        top-level file's folder is the destination itself)."""
        try:
            resolved = folder.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop
            raise SpotwatchError(f"cannot restore {path!r}: {exc}") from None
        if not at_or_below(resolved, self.root):  # manifest paths are clean: a symlink did
            raise SpotwatchError(
                f"cannot restore {path!r}: a symlink in the destination leads its folder to "
                f"{printable_path(resolved)}, outside the destination (restore never "
                "writes outside it)")
        own = self.root / set_name_of(path) if folder != self.root else self.root
        if not at_or_below(resolved, own):
            raise SpotwatchError(
                f"cannot restore {path!r}: a symlink in the destination leads its folder to "
                f"{printable_path(resolved.relative_to(self.root))}, outside its set's own "
                f"folder (restore never writes into another set)")
        return resolved


def temporary(target: Path) -> Path:
    """Where the target's bytes wait until its set checks out: beside it, hidden, and still
    within NAME_MAX when the target's own name nearly fills it (then named by its digest)."""
    return target.with_name(restore_temporary_for(target.name))


def cleared(temp: Path) -> Path:
    """The temporary, once nothing is at its name that writing there would write through: a
    symlink (to anywhere: a file outside the destination, say, which the download would fill
    and the rename then put in the target's place), or a file hard-linked elsewhere too.

    Invariant: restore writes only under its target, whatever is already there. A regular
    file of one link (a temporary a stopped restore left) stays, to be written over."""
    try:
        info = os.lstat(temp)
    except FileNotFoundError:
        return temp
    if not S_ISDIR(info.st_mode) and not (S_ISREG(info.st_mode) and info.st_nlink == 1):
        temp.unlink()
    return temp


def remove_stale_temporaries(destination: Path, manifests: Iterable[Manifest]) -> None:
    """Remove what a restore stopped by kill -9 or a power loss left behind: its temporaries,
    a whole shard each, which no later restore of another set would touch and a trainer
    listing the folder would see. Looked for in every folder a set in S3 restores into (the
    restore stopped may have been of another set than the one restored now), and only files
    and symlinks (a link's, see sync.links) named as temporary() names them are removed.

    A restore into the same folders at the same time is not supported: both would write the
    same temporaries, and this one removes the other's."""
    root = destination.resolve()
    if not root.is_dir():
        return
    paths = [path for manifest in manifests
             for path in [*file_paths(manifest), *(ln.path for ln in manifest.links)]]
    for relative in {PurePosixPath(path).parent for path in paths}:
        try:
            folder = (root / relative).resolve()
            # A symlink out of the destination: no restore writes there.
            if not at_or_below(folder, root):
                continue
            with os.scandir(folder) as entries:
                stale = [Path(entry.path) for entry in entries
                         if is_restore_temporary(entry.name)
                         and (entry.is_file(follow_symlinks=False) or entry.is_symlink())]
        except (RuntimeError, OSError):  # missing, unreadable or a symlink loop: none there
            continue
        for path in stale:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # the restore goes on: a download into it fails itself
                log.warning("stale_temporary_kept", path=printable_path(path),
                            error=exc.strerror)
                continue
            log.info("stale_temporary_removed", path=printable_path(path))


def no_directory_at(target: Path, path: str) -> os.stat_result | None:
    """What is at the target (lstat), None for nothing; refused when it is a directory."""
    try:
        stat = target.lstat()
    except FileNotFoundError:
        return None
    if S_ISDIR(stat.st_mode):
        raise SpotwatchError(f"cannot restore {path!r}: {target} is a directory")
    return stat


def folder_writable(place: Path, path: str) -> None:
    """Refused when the folder a file goes into (or the nearest one there, to make it in)
    may not be written to: its temporary could not be made there."""
    folder = place.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpotwatchError(f"cannot restore {path!r}: {folder} may not be written to")


def named(root: Path, target: Path) -> str:
    """A target as the set names it, for an error line."""
    with suppress(ValueError):
        return printable_path(target.relative_to(root))
    return printable_path(target)
