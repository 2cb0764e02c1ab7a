"""`spotwatch restore`: download the newest complete checkpoint set, never an incomplete one.

A set counts only when its manifest is valid for the configured prefix and every file it lists
is in S3 with the listed size. Every file is downloaded under a temporary name and checked
against the manifest's size and checksum; only when all files of the set check out are they
renamed into place, with their original mtime, so a rerun skips what is already there and the
daemon does not upload them again. The files of a set download concurrently (sync.downloads),
each checked against its manifest entry as its bytes arrive where the store can
(aws.ranged_get, the CRT), else read back once written; the set's completeness is checked
beside them. A set whose bytes do not match is corrupt: its downloads are removed and the next
older complete set is restored instead, with a warning; so is an incomplete one. Temporaries
that a restore stopped by kill -9 left are removed by the next one.

Numbered set directories come before other numbered sets, with the top-level files beside
them; a set without a number is then no checkpoint (checkpoints_first). A pointer among those
files is made to name the set restored (sync.pointers).
A set of symlinks only (Lightning's `last.ckpt`) is never the checkpoint restored: once the
files are in place, the links of the set restored and of those sets are made again wherever
their target is there (sync.links). A link of the set restored into another set (step_200's
`embed.pt -> ../step_100/embed.pt`), whose file the manifest records (LinkEntry.file), is part
of the set: the set is complete only while that object is whole in S3, and the link is made
where that file is on disk and verifies, else the object's bytes are restored in the link's
place, verified like every other file of the set (_linked_here). So is a link to a directory of
another set (`tokenizer -> ../step_100/tokenizer`, LinkEntry.files): made where every file of
that directory is on disk and verifies, else those files are restored below the link's path.

On a multi-node job a set counts only when it is complete for the whole job (sync.sets.parts):
the whole set is restored, or with --node-rank only the files that node's part lists.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from stat import S_ISDIR, S_ISLNK, S_ISREG

from spotwatch.aws.crt_store import for_restore, make_store
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectMissing, ObjectStore, StoreError
from spotwatch.checksums import ChecksumUnavailable
from spotwatch.collector import exempt_long_lived_objects
from spotwatch.config import Config, JobSettings, WatchDir, at_or_below, key_space
from spotwatch.console import names
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.keys import (
    RESTORE_TEMP_SUFFIX,
    UNFINISHED_SUFFIX,
    is_restore_temporary,
    manifest_key,
    object_key,
    series_of,
    set_name_of,
    step_number,
    step_order,
)
from spotwatch.logs import get_logger, printable_path
from spotwatch.model import FileVersion
from spotwatch.progress import ProgressBar
from spotwatch.state import StateDir
from spotwatch.sync.commits import uncommitted
from spotwatch.sync.downloads import FileToFetch, SetCorrupt, SetIncomplete, fetch_verified, verify
from spotwatch.sync.ledger import Ledger, LedgerError, SavedSet
from spotwatch.sync.links import leads_into, leads_to, make_link
from spotwatch.sync.placement import NotPlaced, place_all, signals_held
from spotwatch.sync.pointers import Repointed, repoint, repointed_link
from spotwatch.sync.sets.manifest import LinkEntry, Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_job_sets, list_manifests, not_there

log = get_logger("spotwatch.restore")

# The longest file name, in bytes, that Linux file systems take (NAME_MAX).
NAME_MAX = 255
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
    # Top-level files restored beside a set directory (see checkpoints_first).
    companions: tuple[str, ...] = field(default=())
    # Those left out, incomplete or corrupt in S3 (companion_skipped).
    companions_skipped: tuple[str, ...] = field(default=())
    # Companions that named another set of the series, rewritten to name this one.
    repointed: tuple[Repointed, ...] = field(default=())
    links: tuple[LinkEntry, ...] = field(default=())  # symlinks made (see _with_links)
    # Links into other sets restored as files, or as a directory of them (their linked files
    # not there: _linked_here).
    as_files: tuple[LinkEntry, ...] = field(default=())
    # Links left out: their target is not there, or cannot be made (link_not_restored).
    not_made: tuple[LinkEntry, ...] = field(default=())
    # Higher steps of the set's series dated older than it (see _higher_steps), not tried.
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


class _Targets:
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
        where it has a file is (see _already_there): restore replaces neither."""
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


def _choose_watch(config: Config, prefix: str | None) -> WatchDir:
    if prefix is not None:
        for watch in config.watch:
            # 'run1' and 'run1/' write the same keys: either names the entry.
            if key_space(watch.prefix) == key_space(prefix):
                return watch
        raise ConfigError(f"no watched directory has prefix {prefix!r}")
    if len(config.watch) > 1:
        raise ConfigError("several watched directories: choose one with --prefix")
    return config.watch[0]


def _destination(to: Path | None, watch: WatchDir) -> Path:
    """The directory to restore into; refused when it, or what would hold it, is no directory."""
    destination = (to or watch.path).absolute()
    existing = next((p for p in (destination, *destination.parents) if os.path.lexists(p)),
                    None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"cannot restore into {destination}: {existing} is not a directory")
    try:  # lexists says False for a path below a folder that may not be entered
        os.stat(destination)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpotwatchError(f"cannot restore into {destination}: {exc.strerror}") from None
    return destination


@dataclass(frozen=True)
class Candidate:
    """A set restore may choose. `whole` must be complete in S3; `fetch` is what is
    downloaded and verified: the whole set, or one node's part of a job's set. problem: why
    the set cannot be restored at all (a job's set missing a node's part); also: by key,
    other nodes' entries the fetched bytes must match as well (JobSet.other_checksums)."""

    whole: Manifest
    fetch: Manifest
    problem: str | None = None
    also: Mapping[str, tuple[ManifestEntry, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest) -> Candidate:
        return cls(manifest, manifest)


def restore(config: Config, bucket: str, to: Path | None = None, set_name: str | None = None,
            prefix: str | None = None, node_rank: int | None = None) -> RestoreReport:
    """node_rank: on a job, only that node's part of the set (the set must still be complete
    for the whole job)."""
    watch = _choose_watch(config, prefix)
    destination = _destination(to, watch)
    settings = for_restore(config.transfer)
    store = make_store(make_s3_client(resolve_region(config), settings), bucket, settings,
                       uploads=False)
    unreadable: list[str] = []
    try:
        candidates = restore_candidates(store, watch.prefix, config.job, node_rank, unreadable)
    except StoreError as exc:
        raise SpotwatchError(f"cannot read s3://{bucket}/{watch.prefix}: {exc}") from None
    # A trainer's marker that a checkpoint is still being saved (keys.unfinished_marker; in
    # S3 when uploaded before it was excluded by default) is never restored: it is no
    # checkpoint, and beside the checkpoint it marks NeMo would delete that one at its start.
    candidates = [c for c in candidates if not is_unfinished_marker(c.whole)]
    known = frozenset(c.whole.set_name for c in candidates)
    _remove_stale_temporaries(destination, [c.whole for c in candidates])
    linked = [c for c in candidates if not _holds_files(c.whole) and c.problem is None]
    with_files = [c for c in candidates if _holds_files(c.whole)]
    ordered, companions = checkpoints_first(with_files)
    taken = {c.whole.set_name for c in (*ordered, *companions)}
    no_checkpoint = [c.whole.set_name for c in with_files if c.whole.set_name not in taken]
    candidates = (committed_first(store, ordered, companions) if set_name is None
                  else [c for c in candidates if c.whole.set_name == set_name])
    if companions and any(_takes_companions(c.whole) for c in candidates):
        _refuse_companions_in_the_way(destination, companions)
    # Restored into the watched directory, the files are already in S3: record them.
    ledger = (Ledger(StateDir(config.state_dir).ledger) if _is_watched(destination, watch)
              else None)
    exempt_long_lived_objects()  # the candidates' manifests too: a set's files are many
    passed_over: list[str] = []
    try:
        report = restore_newest(store, candidates, destination,
                                config.transfer.checksum_algorithm, ledger, passed_over)
        if report is not None:
            chosen = next(c for c in candidates if c.whole.set_name == report.set_name)
            if companions and _takes_companions(chosen.whole):
                report = _with_companions(report, companions, store,
                                          config.transfer.checksum_algorithm, ledger, known,
                                          asked_for=set_name is not None)
            report = _with_links(report, {c.whole.set_name: c.fetch for c in (chosen, *linked)},
                                 ledger, store.bucket)
            if set_name is None:
                report = replace(report, higher_steps=_higher_steps(report.set_name, candidates),
                                 unreadable=tuple(_highest_first(unreadable)))
    finally:
        if ledger is not None:
            ledger.close()
    if report is not None and not report.restored_anything:
        # A set of links only (`--set latest` for a `latest -> step_2`) none of which could be
        # made: nothing was restored, which a script reading the exit status must know.
        left_out = ", ".join(f"{link.path} -> {link.target}" for link in report.not_made
                             if set_name_of(link.path) == report.set_name)
        raise SpotwatchError(f"nothing of set {report.set_name!r} restored: it holds only "
                             f"links, and none could be made ({left_out}: see the warnings)")
    if report is None:
        where = f"s3://{bucket}/{watch.prefix}"
        if set_name is None:
            raise SpotwatchError(_none_left(where, passed_over, no_checkpoint,
                                            _highest_first(unreadable)))
        if any(c.whole.set_name == set_name for c in candidates):
            raise SpotwatchError(f"set {set_name!r} under {where} is not complete or does not "
                                 "match its manifest (see the warnings above)")
        if _has_objects(store, manifest_key(watch.prefix, set_name)):
            raise SpotwatchError(f"set {set_name!r} under {where} has a manifest that cannot "
                                 "be read (see the manifest_skipped warning above)")
        if _has_objects(store, object_key(watch.prefix, set_name)):
            raise SpotwatchError(f"set {set_name!r} under {where} was never sealed complete: "
                                 "it has files but no manifest")
        raise SpotwatchError(f"no set {set_name!r} under {where}")
    return report


def _higher_steps(restored: str, candidates: Sequence[Candidate]) -> tuple[str, ...]:
    """The sets of the restored one's series with a higher step that come after it in restore's
    order: dated older, so not tried (a file written later into an old step, an evaluation's
    results, makes it the newest by date). Retention keeps them (sync.pruner); said, so that
    `--set` can take one."""
    series = series_of(restored)
    if step_number(restored) is None:
        return ()
    after = [c.whole.set_name for c in candidates][
        [c.whole.set_name for c in candidates].index(restored) + 1:]
    higher = tuple(sorted((name for name in after if series_of(name) == series
                           and step_order(name) > step_order(restored)),
                          key=step_order, reverse=True))
    if higher:
        log.warning("higher_step_not_restored", restored=restored, higher=list(higher),
                    reason="dated older than the set restored (a file written into it later?)",
                    action=f"--set {higher[0]} restores the highest")
    return higher


def _highest_first(set_names: Sequence[str]) -> list[str]:
    return sorted(set_names, key=step_order, reverse=True)


def _none_left(where: str, passed_over: Sequence[str], no_checkpoint: Sequence[str],
               unreadable: Sequence[str]) -> str:
    """Why restore has no checkpoint to bring back: the sets it passed over, those whose
    manifest it could not read, and those it never takes for one (checkpoints_first), which
    --set still restores."""
    why = f"no complete checkpoint set under {where}"
    if passed_over:
        why += f": passed over {names(passed_over)} (incomplete or corrupt, see the warnings)"
    if unreadable:
        why += (f"; the manifest of {names(unreadable)} cannot be read (see the "
                "manifest_skipped warnings)")
    if len(no_checkpoint) == 1:
        why += (f"; {names(no_checkpoint)} has no step number, so is no checkpoint here "
                f"(--set {shlex.quote(no_checkpoint[0])} restores it)")
    elif no_checkpoint:
        why += (f"; {names(no_checkpoint)} have no step number, so are no checkpoint here "
                f"(--set NAME restores one)")
    return why


def _has_objects(store: ObjectStore, key: str) -> bool:
    """Whether the set of this key (a file, or a directory's files) has an object in S3."""
    try:
        return any(listed.key == key or listed.key.startswith(key + "/")
                   for listed in store.list_objects(key))
    except StoreError:
        return False  # said as no set at all: the listing of the sets just worked


def _is_watched(destination: Path, watch: WatchDir) -> bool:
    """Whether the destination is the watched directory, however the path is spelled (through
    a symlink, with '..'): where the daemon would otherwise upload every restored file again."""
    return destination.resolve() == watch.path.resolve()


def checkpoints_first(candidates: Sequence[Candidate]) -> tuple[list[Candidate],
                                                                 list[Candidate]]:
    """The sets in the order restore tries them, and the top-level files that come with a
    set directory.

    Invariant: without --set, restore brings back the newest complete checkpoint. Where the
    trainer saves numbered set directories (step_100/, checkpoint-500/, global_step300/), a
    set whose name carries no number is none: a `latest` file that DeepSpeed rewrites at every
    save, a TensorBoard `runs/` directory or a `train.log` beside the steps is always newer
    than the steps, and restoring it alone would hand back no checkpoint at all: with every
    step incomplete or corrupt, restore has none to give back (exit 1), and only --set
    restores such a set. Those set directories come first, newest first, then the other
    numbered sets (top-level files); the unnumbered top-level files
    (`latest`, a `config.json`) are restored beside the set directory, which may need them to
    load; one that points to another step (`latest` naming an incomplete global_step300) is
    made to name the step restored (sync.pointers). Where checkpoints are files only
    (Lightning's epoch=3-step=400.ckpt and last.ckpt), the newest complete set is restored,
    as ever."""
    steps: list[Candidate] = []
    others: list[Candidate] = []
    companions: list[Candidate] = []
    for candidate in candidates:
        directory, numbered = _is_directory_set(candidate.whole), _is_numbered(candidate.whole)
        (steps if directory and numbered else others).append(candidate)
        if not directory and not numbered:
            companions.append(candidate)
    if not steps:
        return list(candidates), []
    return steps + [c for c in others if _is_numbered(c.whole)], companions


def committed_first(store: ObjectStore, ordered: Sequence[Candidate],
                    companions: Sequence[Candidate] = ()) -> list[Candidate]:
    """The sets in restore's order, less the numbered sets newer than the one a pointer beside
    them names (sync.commits); the pointers are among them or the companions.

    Invariant: restore never hands back a step the trainer had not committed. DeepSpeed's
    `latest` and Megatron's tracker are written once every rank finished the step they name:
    a newer step of the series, sealed with the files written before the instance went away,
    may be half a save, and the trainer would load the pointer's step from its own disk."""
    passed_over = {found.set_name: found for found in uncommitted(
        store, [candidate.whole for candidate in (*ordered, *companions)])}
    for found in passed_over.values():
        log.warning("set_not_committed", set=found.set_name, pointer=found.pointer,
                    names=found.names,
                    detail="newer than the step the trainer's pointer names: its save may "
                           "not have finished; restoring the step the pointer names")
    return [candidate for candidate in ordered if candidate.whole.set_name not in passed_over]


def _takes_companions(manifest: Manifest) -> bool:
    """Whether the companions come with the set restored, named by --set or not: a numbered
    set directory (global_step100/), which the pointer beside it must name to be loaded."""
    return _is_directory_set(manifest) and _is_numbered(manifest)


def _is_numbered(manifest: Manifest) -> bool:
    return series_of(manifest.set_name) != manifest.set_name


def _is_directory_set(manifest: Manifest) -> bool:
    return any(path != manifest.set_name for path in _file_paths(manifest))


def _holds_files(manifest: Manifest) -> bool:
    """Whether the set is a checkpoint, not links only: it has files, or links to files of
    other sets (a step directory all of whose files a dedup step linked to an older one's)."""
    return bool(_file_paths(manifest))


def _file_paths(manifest: Manifest) -> list[str]:
    """The paths of the set's files, with those its links to files and directories of other
    sets make part of it, as seen through the links (LinkEntry.linked)."""
    return [*(entry.path for entry in manifest.files),
            *(entry.path for link in manifest.links for entry in link.linked)]


def _with_companions(report: RestoreReport, companions: Sequence[Candidate],
                     store: ObjectStore, preferred: str, ledger: Ledger | None,
                     known: Collection[str], asked_for: bool) -> RestoreReport:
    """The report, after the companions that are complete and verify were restored too (each
    on its own: one that is not is named and left out), and those that point to another set of
    the series made to point to the one restored (sync.pointers); known: the sets in S3;
    asked_for: the set was named (--set). A companion left out still has the copy already at
    the destination, if any, made to name the set restored: the trainer must not load another
    step than the one restore says it restored."""
    restored = []
    skipped = []
    repointed = []
    for companion in companions:
        name = companion.whole.set_name
        try:
            done = restore_newest(store, [companion], report.destination, preferred, ledger)
            if done is None:
                log.warning("companion_skipped", set=name, beside=report.set_name)
                skipped.append(name)
            else:
                restored.append(name)
                report = replace(report, downloaded=report.downloaded + done.downloaded,
                                 skipped=report.skipped + done.skipped,
                                 bytes=report.bytes + done.bytes,
                                 replaced=report.replaced + done.replaced,
                                 replaced_newer=report.replaced_newer + done.replaced_newer)
            change = _repoint(companion.fetch, report, known, asked_for)
        except SpotwatchError as exc:  # the step is in place already: said, not hidden
            raise SpotwatchError(f"{exc} ({report.set_name} is restored into "
                                 f"{printable_path(report.destination)} already)") from None
        if change is not None:
            repointed.append(change)
    return replace(report, companions=tuple(restored), companions_skipped=tuple(skipped),
                   repointed=tuple(repointed))


def _repoint(companion: Manifest, report: RestoreReport, known: Collection[str],
             asked_for: bool) -> Repointed | None:
    """The companion made to name the set restored, if it is a pointer to another of the
    series. The ledger keeps the object in S3 (still the old pointer): a daemon watching the
    destination uploads the pointer as it now is."""
    if len(companion.files) != 1:
        return None
    entry = companion.files[0]
    target = _Targets(report.destination).of(entry.path)
    try:
        change = repoint(target, entry.path, report.set_name, known,
                         cleared(temporary(target)), asked_for)
    except OSError as exc:
        raise SpotwatchError(f"cannot make {entry.path} name {report.set_name}: {exc}") from None
    if change is not None:
        log.warning("companion_repointed", companion=change.companion, set=report.set_name,
                    **{"from": change.old, "to": change.new})
    return change


def _with_links(report: RestoreReport, sets: Mapping[str, Manifest], ledger: Ledger | None,
                bucket: str) -> RestoreReport:
    """The report, after the links of these sets (the one restored, and those of symlinks only)
    were made, each where its target is there now: restored, on disk already, or another link
    made here (a chain such as `chain.pt -> weights.pt -> model.safetensors`, made in as many
    rounds as it takes). A pointer link to another set of the series, not there, leads to the
    one restored instead (sync.pointers.repointed_link). A link that cannot be made is named
    and left out; the checkpoint restored stays."""
    targets = _Targets(report.destination)
    as_files = {link.path for link in report.as_files}
    for manifest in sets.values():
        if ledger is not None and not (manifest.set_name == report.set_name and as_files):
            # Before a daemon sees them, so that it seals nothing again. Not when the set
            # has links restored as files: a daemon uploads those and seals the set again,
            # perhaps before the links below are made. The ledger must then not say that S3
            # lists them, or the links the daemon finds next would not seal the set again
            # and its manifest in S3 would stay without them.
            _record_links(ledger, bucket, manifest)
    in_order = [link for manifest in sets.values() for link in manifest.links
                if link.path not in as_files]
    pending = in_order
    made: dict[str, LinkEntry] = {}
    repointed = list(report.repointed)
    # A link's own target first, in rounds; a pointer is led to the set restored instead
    # only once no round makes any more as they were.
    repointing = False
    while pending:
        waiting = []
        for link in pending:
            try:
                change = _make_link(link, targets, report.set_name if repointing else None)
            except _TargetNotThere:
                waiting.append(link)
                continue
            except (SpotwatchError, OSError) as exc:
                log.warning("link_not_restored", path=link.path, target=link.target,
                            reason=str(exc))
                continue
            if change is not None:
                repointed.append(change)
            made[link.path] = LinkEntry(link.path, link.target if change is None else change.new)
        if len(waiting) == len(pending) and not repointing:
            repointing = True
        elif len(waiting) == len(pending):  # no link made this round leads on to these
            for link in waiting:
                log.warning("link_not_restored", path=link.path, target=link.target,
                            reason="its target is not there")
            break
        pending = waiting
    return replace(report, links=tuple(made[link.path] for link in in_order
                                       if link.path in made),
                   not_made=tuple(link for link in in_order if link.path not in made),
                   repointed=tuple(repointed))


class _TargetNotThere(Exception):
    """A link's target is not in the destination (yet)."""


def _make_link(link: LinkEntry, targets: _Targets, restored: str | None) -> Repointed | None:
    """Make one link: None when made as it was, the Repointed when made to lead to the set
    restored instead (a pointer to another set of the series, not there; restored: None to
    make none so). _TargetNotThere when neither leads to anything there."""
    place = targets.of(link.path)
    target = link.target
    change = None
    if not leads_into(place, target, targets.root):
        target = (repointed_link(link.path, target, restored) if restored else None) or ""
        if not target or not leads_into(place, target, targets.root):
            raise _TargetNotThere()
        change = Repointed(link.path, link.target, target)
    place.parent.mkdir(parents=True, exist_ok=True)
    make_link(place, target, temporary(place))
    if change is not None:
        log.warning("companion_repointed", companion=link.path, set=restored,
                    **{"from": link.target, "to": target})
    return change


def _record_links(ledger: Ledger, bucket: str, manifest: Manifest) -> None:
    try:
        ledger.record_links(bucket, manifest)
    except LedgerError as exc:  # a daemon watching seals the set again, at worst
        log.warning("ledger_write_failed", set=manifest.set_name, error=str(exc))


def is_unfinished_marker(manifest: Manifest) -> bool:
    """Whether the set is an empty top-level file named as NeMo's marker."""
    return (manifest.set_name.endswith(UNFINISHED_SUFFIX) and manifest.bytes == 0
            and [entry.path for entry in manifest.files] == [manifest.set_name])


def restore_candidates(store: ObjectStore, prefix: str, job: JobSettings,
                       node_rank: int | None, unreadable: list[str] | None = None
                       ) -> list[Candidate]:
    """The sets under the prefix, newest first: a job's sets by their parts, else by their
    manifests (unreadable: gets the sets whose manifest cannot be read)."""
    if job.id is None or job.nodes is None:
        return [Candidate.of(manifest)
                for manifest in list_manifests(store, prefix, unreadable)]
    candidates = []
    for job_set in list_job_sets(store, prefix, job.id, job.nodes):
        whole = job_set.whole
        problem = job_set.problem()
        # A set sealed by a job of another size: which of its files node_rank needs now is
        # for the trainer to say (a resharding load reads across the old shards), so the
        # node gets them all.
        resized = job_set.nodes != job.nodes
        fetch = whole if node_rank is None or problem or resized else job_set.parts[node_rank]
        if resized and node_rank is not None and not problem:
            log.info("set_of_other_job_size", set=whole.set_name, sealed_by_nodes=job_set.nodes,
                     job_nodes=job.nodes, restoring="every node's files")
        candidates.append(Candidate(whole, fetch, problem, job_set.other_checksums))
    return candidates


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
            report = _download(store, manifest, destination, preferred, ledger,
                               complete=partial(_complete, store, candidate.whole, found),
                               also=candidate.also)
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


def _complete(store: ObjectStore, manifest: Manifest, found: list[tuple[str, str]]) -> bool:
    """Whether the set is complete in S3; found gets the first object (key, why) it lacks."""
    missing = not_there(store, manifest)
    if missing is not None:
        found.append(missing)
    return missing is None


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
    stat = _no_directory_at(target, entry.path)
    if stat is None or S_ISLNK(stat.st_mode):
        return False  # a symlink is replaced by the file (see _Targets)
    return ((stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)
            and verify(target, entry, part_size, preferred) is None
            and _mismatch(target, also, preferred) is None)


def _no_directory_at(target: Path, path: str) -> os.stat_result | None:
    """What is at the target (lstat), None for nothing; refused when it is a directory."""
    try:
        stat = target.lstat()
    except FileNotFoundError:
        return None
    if S_ISDIR(stat.st_mode):
        raise SpotwatchError(f"cannot restore {path!r}: {target} is a directory")
    return stat


def _refuse_companions_in_the_way(destination: Path, companions: Sequence[Candidate]) -> None:
    """A companion's place is checked as the set's own files are (_already_there), before
    anything downloads: a directory where `latest` goes, or a folder it may not be written
    into, would otherwise be found only once the set is in place, and a step restored without
    its pointer may load as no checkpoint."""
    targets = _Targets(destination)
    for companion in companions:
        for entry in companion.fetch.files:
            place = targets.of(entry.path)
            _no_directory_at(place, entry.path)
            _folder_writable(place, entry.path)


def _folder_writable(place: Path, path: str) -> None:
    """Refused when the folder a file goes into (or the nearest one there, to make it in)
    may not be written to: its temporary could not be made there."""
    folder = place.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpotwatchError(f"cannot restore {path!r}: {folder} may not be written to")


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


def temporary(target: Path) -> Path:
    """Where the target's bytes wait until its set checks out: beside it, hidden, and still
    within NAME_MAX when the target's own name nearly fills it (then named by its digest)."""
    name = f".{target.name}{RESTORE_TEMP_SUFFIX}"
    if len(os.fsencode(name)) > NAME_MAX:
        digest = hashlib.sha256(os.fsencode(target.name)).hexdigest()[:32]
        name = f".{digest}{RESTORE_TEMP_SUFFIX}"
    return target.with_name(name)


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


def _remove_stale_temporaries(destination: Path, manifests: Iterable[Manifest]) -> None:
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
             for path in [*_file_paths(manifest), *(ln.path for ln in manifest.links)]]
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


def _download(store: ObjectStore, manifest: Manifest, destination: Path, preferred: str,
              ledger: Ledger | None, complete: Callable[[], bool] | None = None,
              also: Mapping[str, tuple[ManifestEntry, ...]] | None = None) -> RestoreReport:
    """complete: the set's completeness check, run beside the downloads (SetIncomplete);
    also: by key, more entries each file must match (Candidate.also; SetCorrupt)."""
    targets = _Targets(destination)
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
                                as_files, complete, also or {})
    except BaseException:
        for place, text in removed:
            if not os.path.lexists(place):
                with suppress(OSError):
                    os.symlink(text, place)
        raise


def _fetch_and_place(store: ObjectStore, manifest: Manifest, destination: Path,
                     targets: _Targets, preferred: str, ledger: Ledger | None,
                     as_files: Sequence[LinkEntry], complete: Callable[[], bool] | None,
                     also: Mapping[str, tuple[ManifestEntry, ...]]) -> RestoreReport:
    """_download's work once it knows which links come back as files (as_files)."""
    # A link restored as a file holds its linked object's bytes: the ledger does not record it
    # (no object has its key), so a daemon watching uploads it as a file of its set.
    linked = [entry for link in as_files for entry in link.linked]
    unrecorded = {entry.path for entry in linked}
    todo: list[tuple[FileToFetch, Path]] = []
    there: list[tuple[ManifestEntry, Path]] = []
    for entry in [*manifest.files, *linked]:
        target = targets.of(entry.path)
        part_size = _part_size(store, entry)
        if _already_there(target, entry, part_size, preferred, also.get(entry.key, ())):
            there.append((entry, target))
        else:
            todo.append((FileToFetch(entry, cleared(temporary(target)), part_size), target))
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
            journal = None if ledger is None else _SetJournal(
                ledger, store.bucket, manifest, todo, unrecorded,
                [(entry, path) for entry, path in there if entry.path not in unrecorded])
            with signals_held():
                place_all([(file.temp, target) for file, target in todo], journal,
                          partial(_named, targets.root))
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


def _not_in_set(destination: Path, manifest: Manifest) -> tuple[str, ...]:
    """The paths below the set's directory at the destination that the set does not list
    (regular files and symlinks; restore's own temporaries left out), sorted. Restore never
    deletes them, but says so: a checkpoint directory holding shards of another save may
    not load as the set restored."""
    if not _is_directory_set(manifest):
        return ()
    top = destination / manifest.set_name
    try:
        if not S_ISDIR(top.lstat().st_mode):
            return ()
    except OSError:
        return ()
    listed = {*_file_paths(manifest), *(link.path for link in manifest.links)}
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


def _linked_here(store: ObjectStore, link: LinkEntry, targets: _Targets, preferred: str) -> bool:
    """Whether the link's text leads, in the destination, to a file that holds the bytes of
    its linked file (LinkEntry.file), or to a directory that holds every file of its linked
    directory (LinkEntry.files) each with its bytes: then the link is made as it was
    (_with_links), else the set restores those bytes in the link's place.

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
    makes in its place. Restore never writes through it (see _Targets)."""
    if not place.is_symlink():
        return None
    text = os.readlink(place)
    place.unlink()
    return text


def _record(ledger: Ledger, bucket: str, entry: ManifestEntry, target: Path,
            sealed_at: float) -> None:
    """As uploaded when its set was sealed: status's last upload is one this host made, or
    the newest set's (a restore uploads nothing)."""
    ledger.record(bucket, entry.key, target, FileVersion(entry.size, entry.mtime_ns),
                  entry.checksum, entry.part_size, entry.checksum_algorithm, entry.etag,
                  uploaded_at=sealed_at)


class _SetJournal:
    """What the ledger records of a set restored into the watched directory (place_all's
    Journal), put back as it was when the set does not land whole.

    Invariant: every file of a set restored into the watched directory is in the ledger as
    the object it came from, also one that was there already (a kept checkpoint volume, a
    fresh state directory): the daemon uploads none of them again, nor seals the set anew
    (on a job, its part would list every node's files, and a part of a job of another size
    would take the place of this rank's). No row stays for a file a failed restore took back:
    delete mirroring (sync.delete) would delete its object from S3."""

    def __init__(self, ledger: Ledger, bucket: str, manifest: Manifest,
                 todo: Sequence[tuple[FileToFetch, Path]], unrecorded: Collection[str],
                 there: Sequence[tuple[ManifestEntry, Path]]) -> None:
        self._ledger = ledger
        self._bucket = bucket
        self._set_key = object_key(manifest.prefix, manifest.set_name)
        self._sealed_at = manifest.sealed_at
        self._todo = todo
        self._unrecorded = unrecorded
        self._there = there
        self._saved: SavedSet | None = None

    def begin(self) -> None:
        self._saved = self._ledger.saved_set(self._bucket, self._set_key)
        # Settled before the first rename: a restore killed between two (kill -9, a power
        # loss) leaves part of the set in place, and a daemon starting then must not seal
        # that part over the manifest it came from.
        self._ledger.set_settled(self._bucket, self._set_key, True)

    def placing(self, index: int) -> None:
        file, target = self._todo[index]
        if file.entry.path not in self._unrecorded:  # before the rename: a daemon skips it
            _record(self._ledger, self._bucket, file.entry, target, self._sealed_at)

    def end(self) -> None:
        with self._ledger.transaction():
            for entry, target in self._there:
                _record(self._ledger, self._bucket, entry, target, self._sealed_at)

    def revert(self) -> None:
        if self._saved is not None:
            self._ledger.put_back(self._saved)


def _named(root: Path, target: Path) -> str:
    """A target as the set names it, for an error line."""
    with suppress(ValueError):
        return printable_path(target.relative_to(root))
    return printable_path(target)
