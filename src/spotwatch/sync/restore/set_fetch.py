"""One set downloaded, verified and placed, or passed over for the next older."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from stat import S_ISDIR, S_ISLNK, S_ISREG

from spotwatch.aws.store import ObjectMissing, ObjectStore, StoreError
from spotwatch.checksums import ChecksumUnavailable
from spotwatch.errors import SpotwatchError
from spotwatch.keys import is_restore_temporary
from spotwatch.logs import get_logger
from spotwatch.progress import ProgressBar
from spotwatch.sync.downloads import FileToFetch, SetCorrupt, SetIncomplete, fetch_verified, verify
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.links import leads_to
from spotwatch.sync.placement import NotPlaced, place_all, signals_held
from spotwatch.sync.pointers import Repointed
from spotwatch.sync.restore.candidates import Candidate, file_paths, is_directory_set
from spotwatch.sync.restore.destination import Targets, cleared, named, no_directory_at, temporary
from spotwatch.sync.restore.journal import SetJournal
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry
from spotwatch.sync.sets.remote import not_there

log = get_logger("spotwatch.restore")

# Paths a warning names at most (a set may hold thousands).
NAMED_MAX = 20


@dataclass(frozen=True)
class RestoreReport:
    set_name: str
    destination: Path
    downloaded: int
    skipped: int
    bytes: int
    passed_over: tuple[str, ...] = field(default=())  # newer sets, incomplete or corrupt
    # Sets whose manifest cannot be read (manifest_skipped): never tried, however new.
    unreadable: tuple[str, ...] = field(default=())
    # Top-level files restored beside a set directory (see candidates.checkpoints_first).
    companions: tuple[str, ...] = field(default=())
    # Those left out, incomplete or corrupt in S3 (companion_skipped).
    companions_skipped: tuple[str, ...] = field(default=())
    # Companions that named another set of the series, rewritten to name this one.
    repointed: tuple[Repointed, ...] = field(default=())
    links: tuple[LinkEntry, ...] = field(default=())  # symlinks made (beside.with_links)
    # Links into other sets restored as files, or as a directory of them (their linked files
    # not there: _linked_here).
    as_files: tuple[LinkEntry, ...] = field(default=())
    # Links left out: their target is not there, or cannot be made (link_not_restored).
    not_made: tuple[LinkEntry, ...] = field(default=())
    # Higher steps of the set's series dated older than it (candidates.higher_steps), not
    # tried.
    higher_steps: tuple[str, ...] = field(default=())
    # Local files of the set that differed from it and were replaced; those of them changed
    # after the set was sealed (work not in S3 as it was on disk) named apart.
    replaced: tuple[str, ...] = field(default=())
    replaced_newer: tuple[str, ...] = field(default=())
    # Files (and links) in the set's directory at the destination that the set does not
    # list (an older save of another shape, a crashed boot's leftovers): left as they were.
    not_in_set: tuple[str, ...] = field(default=())

    @property
    def restored_anything(self) -> bool:
        return bool(self.downloaded or self.skipped or self.links or self.as_files)


def restore_newest(store: ObjectStore, sets: Sequence[Manifest | Candidate], destination: Path,
                   preferred: str, ledger: Ledger | None,
                   passed_over: list[str] | None = None) -> RestoreReport | None:
    """Restore the first set, newest first, that is complete and whose bytes all verify;
    preferred: the configured checksum algorithm; passed_over: gets the sets found incomplete
    or corrupt (also when none is left, to say so)."""
    passed_over = [] if passed_over is None else passed_over
    for index, candidate in enumerate(sets):
        # What happens next, as the warnings say it: with --set there is no other to try.
        action = "trying the next older set" if index + 1 < len(sets) else "none left to try"
        if isinstance(candidate, Manifest):
            candidate = Candidate.of(candidate)
        manifest = candidate.fetch
        try:
            if candidate.problem is not None:
                log.warning("set_incomplete", set=manifest.set_name, reason=candidate.problem)
                passed_over.append(manifest.set_name)
                continue
            found: list[tuple[str, str]] = []
            report = _fetch_candidate(store, candidate, destination, preferred, ledger, found)
        except SetIncomplete:
            log.warning("set_incomplete", set=manifest.set_name,
                        **_why_incomplete(candidate.whole, found))
            passed_over.append(manifest.set_name)
            continue
        except SetCorrupt as exc:
            log.warning("set_corrupt", set=manifest.set_name, reason=str(exc), action=action)
            passed_over.append(manifest.set_name)
            continue
        except (StoreError, OSError, LedgerError, NotPlaced) as exc:
            why = str(exc) or type(exc).__name__  # never a line that ends at "failed:"
            raise SpotwatchError(f"restore of {manifest.set_name} failed: {why}") from None
        except ChecksumUnavailable as exc:
            raise SpotwatchError(f"cannot verify {manifest.set_name}: {exc}") from None
        return replace(report, passed_over=tuple(passed_over))
    return None


def _fetch_candidate(store: ObjectStore, candidate: Candidate, destination: Path,
                     preferred: str, ledger: Ledger | None,
                     found: list[tuple[str, str]]) -> RestoreReport:
    """_download of the candidate, its files read from the held copies that stand in for
    objects replaced since it was sealed (sync.sets.remote.stand_in). The completeness check
    runs beside the downloads, so it finds those only as they start: the set is then
    downloaded once more, from them (only after a crash mid-rewrite, or beside one)."""
    held: dict[str, str] = {}
    while True:
        seen: dict[str, str] = {}
        found.clear()
        try:
            return _download(store, candidate.fetch, destination, preferred, ledger,
                             complete=partial(_complete, store, candidate.whole, found, seen,
                                              held),
                             also=candidate.also, held=held)
        except SetIncomplete:
            if found or not seen or held:  # tried once with held copies already
                raise
            held = seen


def _complete(store: ObjectStore, manifest: Manifest, found: list[tuple[str, str]],
              seen: dict[str, str], held: Mapping[str, str]) -> bool:
    """Whether the set is complete in S3, with the held copies (held) its files are read
    from standing in for their objects; found gets the first object (key, why) it lacks,
    seen the held copies that stand in now."""
    missing = not_there(store, manifest, seen)
    if missing is not None:
        found.append(missing)
    return missing is None and seen == held


def _why_incomplete(manifest: Manifest, found: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The fields of a set_incomplete warning: which object, and for a file of another set
    that a link leads to, which link."""
    if not found:
        return {"reason": "a listed object is missing or has another size"}
    key, why = found[0]
    link = next((link for link in manifest.links
                 if any(entry.key == key for entry in link.linked)), None)
    if link is None:
        return {"reason": f"a listed object is {why}", "key": key}
    return {"reason": f"the file of another set that link {link.path} leads to is {why}",
            "key": key, "link": link.path, "target": link.target}


def _download(store: ObjectStore, manifest: Manifest, destination: Path, preferred: str,
              ledger: Ledger | None, complete: Callable[[], bool] | None = None,
              also: Mapping[str, tuple[ManifestEntry, ...]] | None = None,
              held: Mapping[str, str] | None = None) -> RestoreReport:
    """complete: the set's completeness check, run beside the downloads (SetIncomplete);
    also: by key, more entries each file must match (Candidate.also; SetCorrupt); held: by
    key, the held copy a file is read from instead (_fetch_candidate)."""
    targets = Targets(destination)
    as_files = [link for link in manifest.links
                if link.linked and not _linked_here(store, link, targets, preferred)]
    # A link to a directory restored as one: its files land in a directory of its name, not
    # through the link, which is put back should the set not land (corrupt, incomplete, a
    # stop): a set that is not restored leaves the destination as it was.
    removed = [(place, text) for link in as_files if link.files
               for place in [targets.of(link.path)] for text in [_unlink_symlink(place)]
               if text is not None]
    try:
        return _fetch_and_place(store, manifest, destination, targets, preferred, ledger,
                                as_files, complete, also or {}, held or {})
    except BaseException:
        for place, text in removed:
            if not os.path.lexists(place):
                with suppress(OSError):
                    os.symlink(text, place)
        raise


def _fetch_and_place(store: ObjectStore, manifest: Manifest, destination: Path,
                     targets: Targets, preferred: str, ledger: Ledger | None,
                     as_files: Sequence[LinkEntry], complete: Callable[[], bool] | None,
                     also: Mapping[str, tuple[ManifestEntry, ...]],
                     held: Mapping[str, str]) -> RestoreReport:
    """_download's work once it knows which links come back as files (as_files)."""
    # A link restored as a file holds its linked object's bytes: the ledger does not record it
    # (no object has its key), so a daemon watching uploads it as a file of its set. Nor does
    # it record a file whose held copy stood in: the object at its key is another version.
    linked = [entry for link in as_files for entry in link.linked]
    unrecorded = {entry.path for entry in [*linked, *manifest.files] if entry.key in held
                  } | {entry.path for entry in linked}
    todo: list[tuple[FileToFetch, Path]] = []
    there: list[tuple[ManifestEntry, Path]] = []
    for entry in [*manifest.files, *linked]:
        target = targets.of(entry.path)
        part_size = _part_size(store, entry)
        if _already_there(target, entry, part_size, preferred, also.get(entry.key, ())):
            there.append((entry, target))
        else:
            todo.append((FileToFetch(entry, cleared(temporary(target)), part_size,
                                     held.get(entry.key)), target))
    total = sum(file.entry.size for file, _ in todo)
    replaced, newer = _in_the_way(todo)
    progress = ProgressBar(f"restoring {manifest.set_name}", total)
    try:
        with _folders_made_for_the_set() as made, _temporaries() as temps:
            _make_folders({target.parent for _, target in todo}, made)
            fetch_verified(store, [file for file, _ in todo], preferred, progress, temps,
                           complete)
            _check_also(todo, also, preferred)
            # Every file of the set checked out: only now does anything land in place, the
            # whole set or nothing of it (sync.placement).
            journal = None if ledger is None else SetJournal(
                ledger, store.bucket, manifest, todo, unrecorded,
                [(entry, path) for entry, path in there if entry.path not in unrecorded])
            with signals_held():
                place_all([(file.temp, target) for file, target in todo], journal,
                          partial(named, targets.root))
                temps.clear()  # all in place: nothing left to remove
    finally:
        progress.close()
    for link in as_files:
        if link.file is not None:
            log.info("link_restored_as_file", path=link.path, target=link.target,
                     key=link.file.key,
                     reason="the file it leads to is not there: its bytes are in its place")
        else:
            log.info("link_restored_as_directory", path=link.path, target=link.target,
                     files=len(link.files), reason="the files of the directory it leads to "
                     "are not all there: their bytes are in a directory in its place")
    if replaced:
        log.warning("local_files_replaced", set=manifest.set_name, files=len(replaced),
                    paths=list(replaced[:NAMED_MAX]), newer=list(newer[:NAMED_MAX]),
                    newer_count=len(newer), reason="they differed from the set restored")
    not_in_set = _not_in_set(destination, manifest)
    if not_in_set:
        log.warning("local_files_not_in_set", set=manifest.set_name, files=len(not_in_set),
                    paths=list(not_in_set[:NAMED_MAX]), reason="the set restored does not "
                    "list them: left as they were, a loader that globs its directory meets them")
    return RestoreReport(manifest.set_name, destination, len(todo), len(there), total,
                         as_files=tuple(as_files), replaced=replaced, replaced_newer=newer,
                         not_in_set=not_in_set)


def _part_size(store: ObjectStore, entry: ManifestEntry) -> int | None:
    """The part size a composite checksum is over: from the manifest, else (manifests written
    before it was recorded) the length of the object's first part."""
    if entry.part_size is not None or entry.checksum is None or "-" not in entry.checksum:
        return entry.part_size
    try:
        size = store.head(entry.key, part_number=1).size
    except ObjectMissing:
        raise SetIncomplete() from None
    return size if size > 0 else None


def _already_there(target: Path, entry: ManifestEntry, part_size: int | None,
                   preferred: str, also: Sequence[ManifestEntry]) -> bool:
    """Whether the target already holds the entry's bytes. A directory in its place is refused
    here, before any download: restore never replaces one, and finding it only when the files
    move into place would leave part of the set there."""
    stat = no_directory_at(target, entry.path)
    if stat is None or not S_ISREG(stat.st_mode):
        # A symlink is replaced by the file (see destination.Targets), and so is a FIFO,
        # socket or device, never opened: reading a FIFO would wait for a writer for good.
        return False
    return ((stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)
            and verify(target, entry, part_size, preferred) is None
            and _mismatch(target, also, preferred) is None)


def _mismatch(path: Path, entries: Sequence[ManifestEntry], preferred: str) -> str | None:
    """Why the file is not what one of these entries (other nodes' of its key) describes."""
    for entry in entries:
        problem = verify(path, entry, entry.part_size, preferred)
        if problem is not None:
            return f"{entry.path}: {problem} of another node's part"
    return None


@contextmanager
def _temporaries() -> Iterator[list[Path]]:
    """Temporary downloads, removed unless the caller renamed them into place (and took them
    off the list)."""
    temps: list[Path] = []
    try:
        yield temps
    finally:
        for temp in temps:
            # A directory in a temporary's place was never a download's: it stays.
            with suppress(FileNotFoundError, IsADirectoryError):
                temp.unlink()


@contextmanager
def _folders_made_for_the_set() -> Iterator[list[Path]]:
    """Folders made for a set (deepest last) that then failed are removed again when nothing
    is in them."""
    made: list[Path] = []
    try:
        yield made
    except BaseException:
        for folder in reversed(made):
            with suppress(OSError):
                folder.rmdir()
        raise


def _make_folders(folders: set[Path], made: list[Path]) -> None:
    """Make the folders, once each (not once per file); made gets those that were missing,
    each after its parent."""
    for folder in sorted(folders):
        missing = [path for path in (folder, *folder.parents) if not path.is_dir()]
        made.extend(reversed(missing))  # before: a mkdir failing halfway leaves its parents
        folder.mkdir(parents=True, exist_ok=True)


def _check_also(todo: Sequence[tuple[FileToFetch, Path]],
                mapping: Mapping[str, tuple[ManifestEntry, ...]], preferred: str) -> None:
    """SetCorrupt unless every downloaded file also matches the other entries of its key."""
    for file, _ in todo:
        problem = _mismatch(file.temp, mapping.get(file.entry.key, ()), preferred)
        if problem is not None:
            raise SetCorrupt(problem)


def _not_in_set(destination: Path, manifest: Manifest) -> tuple[str, ...]:
    """The paths below the set's directory at the destination that the set does not list
    (regular files and symlinks; restore's own temporaries left out), sorted. Restore never
    deletes them, but says so: a checkpoint directory holding shards of another save may
    not load as the set restored."""
    if not is_directory_set(manifest):
        return ()
    top = destination / manifest.set_name
    try:
        if not S_ISDIR(top.lstat().st_mode):
            return ()
    except OSError:
        return ()
    listed = {*file_paths(manifest), *(link.path for link in manifest.links)}
    found = []
    for folder, folders, files in os.walk(top):
        below = PurePosixPath(manifest.set_name) / Path(folder).relative_to(top).as_posix()
        names = [*files, *(name for name in folders if os.path.islink(Path(folder, name)))]
        found += [path for name in names for path in [str(below / name)]
                  if path not in listed and not is_restore_temporary(name)]
        folders[:] = [name for name in folders if str(below / name) not in listed]
    return tuple(sorted(found))


def _in_the_way(todo: Sequence[tuple[FileToFetch, Path]]) -> tuple[tuple[str, ...],
                                                                   tuple[str, ...]]:
    """The set's paths where a file differing from its entry is on disk, which the set
    replaces, and those of them changed after the set was sealed (a later mtime): a restore
    into a directory in use says so, rather than replacing work without a word."""
    replaced: list[str] = []
    newer: list[str] = []
    for file, target in todo:
        try:
            info = target.lstat()
        except OSError:
            continue
        if S_ISDIR(info.st_mode) or S_ISLNK(info.st_mode):  # a link is no work of its own
            continue
        replaced.append(file.entry.path)
        if info.st_mtime_ns > file.entry.mtime_ns:
            newer.append(file.entry.path)
    return tuple(replaced), tuple(newer)


def _linked_here(store: ObjectStore, link: LinkEntry, targets: Targets, preferred: str) -> bool:
    """Whether the link's text leads, in the destination, to a file that holds the bytes of
    its linked file (LinkEntry.file), or to a directory that holds every file of its linked
    directory (LinkEntry.files) each with its bytes: then the link is made as it was
    (beside.with_links), else the set restores those bytes in the link's place.

    Invariant: restore never hands back a set whose link leads to nothing, or to other bytes
    than the set was sealed with."""
    place = targets.of(link.path)
    if link.files and place.is_dir() and not place.is_symlink():
        return False  # restored as a directory before: no link replaces it, its files are checked
    there = leads_to(place, link.target, targets.root)
    try:
        # A file's own entry is at the link's path: '.' below where the link leads.
        return there is not None and all(
            _already_there(there / PurePosixPath(entry.path).relative_to(link.path), entry,
                           _part_size(store, entry), preferred, ())
            for entry in link.linked)
    except (SpotwatchError, OSError):  # a directory there, or gone since: not the file
        return False


def _unlink_symlink(place: Path) -> str | None:
    """A symlink at place removed, and its text returned (None: none was there): one that
    does not lead to the bytes its set was sealed with (_linked_here), whose directory restore
    makes in its place. Restore never writes through it (see destination.Targets)."""
    if not place.is_symlink():
        return None
    text = os.readlink(place)
    place.unlink()
    return text
