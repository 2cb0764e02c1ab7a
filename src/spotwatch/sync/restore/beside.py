"""What comes with the set restored: the companions beside it, and the links."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from stat import S_ISREG

from spotwatch.aws.store import ObjectStore
from spotwatch.errors import SpotwatchError
from spotwatch.logs import get_logger, printable_path
from spotwatch.sync.ledger import Ledger, LedgerError
from spotwatch.sync.links import leads_into, make_link
from spotwatch.sync.pointers import Repointed, repoint, repointed_link
from spotwatch.sync.restore.candidates import Candidate
from spotwatch.sync.restore.destination import (
    Targets,
    cleared,
    folder_writable,
    no_directory_at,
    temporary,
)
from spotwatch.sync.restore.set_fetch import RestoreReport, restore_newest
from spotwatch.sync.sets.manifest import LinkEntry, Manifest

log = get_logger("spotwatch.restore")


def with_companions(report: RestoreReport, companions: Sequence[Candidate],
                    store: ObjectStore, preferred: str, ledger: Ledger | None,
                    known: Mapping[str, Manifest], asked_for: bool) -> RestoreReport:
    """The report, after the companions that are complete and verify were restored too (each
    on its own: one that is not is named and left out), and those that point to another set of
    the series made to point to the one restored (sync.pointers); known: the sets in S3, by
    name, each as this node fetches it; asked_for: the set was named (--set). A companion
    left out still has the copy already at the destination, if any, made to name the set
    restored: the trainer must not load another step than the one restore says it restored."""
    restored = []
    skipped = []
    repointed = []
    for companion in companions:
        name = companion.whole.set_name
        if name == report.set_name:  # files side by side: each the others' companion
            continue
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


def _repoint(companion: Manifest, report: RestoreReport, known: Mapping[str, Manifest],
             asked_for: bool) -> Repointed | None:
    """The companion made to name the set restored, if it is a pointer to another of the
    series. The ledger keeps the object in S3 (still the old pointer): a daemon watching the
    destination uploads the pointer as it now is."""
    if len(companion.files) != 1:
        return None
    entry = companion.files[0]
    targets = Targets(report.destination)
    target = targets.of(entry.path)

    def whole_here(name: str) -> bool:
        """Every file of the set as S3 lists it is there with its size; a set S3 has no
        manifest of (never sealed) is the trainer's word, as the pointer is."""
        manifest = known.get(name)
        return manifest is None or all(_has_size(targets.of(f.path), f.size)
                                       for f in manifest.files)

    try:
        change = repoint(target, entry.path, report.set_name, known,
                         cleared(temporary(target)), asked_for, whole_here)
    except OSError as exc:
        raise SpotwatchError(f"cannot make {entry.path} name {report.set_name}: {exc}") from None
    if change is not None:
        log.warning("companion_repointed", companion=change.companion, set=report.set_name,
                    **{"from": change.old, "to": change.new})
    return change


def _has_size(path: Path, size: int) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return S_ISREG(info.st_mode) and info.st_size == size


def refuse_companions_in_the_way(destination: Path, companions: Sequence[Candidate]) -> None:
    """A companion's place is checked as the set's own files are (set_fetch._already_there),
    before anything downloads: a directory where `latest` goes, or a folder it may not be
    written into, would otherwise be found only once the set is in place, and a step restored
    without its pointer may load as no checkpoint."""
    targets = Targets(destination)
    for companion in companions:
        for entry in companion.fetch.files:
            place = targets.of(entry.path)
            no_directory_at(place, entry.path)
            folder_writable(place, entry.path)


def with_links(report: RestoreReport, sets: Mapping[str, Manifest], ledger: Ledger | None,
               bucket: str) -> RestoreReport:
    """The report, after the links of these sets (the one restored, and those of symlinks only)
    were made, each where its target is there now: restored, on disk already, or another link
    made here (a chain such as `chain.pt -> weights.pt -> model.safetensors`, made in as many
    rounds as it takes). A pointer link to another set of the series, not there, leads to the
    one restored instead (sync.pointers.repointed_link). A link that cannot be made is named
    and left out; the checkpoint restored stays."""
    targets = Targets(report.destination)
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


def _make_link(link: LinkEntry, targets: Targets, restored: str | None) -> Repointed | None:
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
