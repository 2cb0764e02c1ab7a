"""`restore()`: the destination and the sets chosen, the newest restored, and why none was."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from spotwatch.aws.crt_store import for_restore, make_store
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.collector import exempt_long_lived_objects
from spotwatch.config import Config, WatchDir, key_space
from spotwatch.console import names
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.keys import manifest_key, object_key, set_name_of
from spotwatch.state import StateDir
from spotwatch.sync.filters import PathFilter
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.out_of_sight import set_aside_if_wiped
from spotwatch.sync.restore.beside import refuse_companions_in_the_way, with_companions, with_links
from spotwatch.sync.restore.candidates import (
    checkpoints_first,
    committed_first,
    higher_steps,
    highest_first,
    holds_files,
    is_staging_set,
    is_unfinished_marker,
    restore_candidates,
    takes_companions,
)
from spotwatch.sync.restore.destination import remove_stale_temporaries
from spotwatch.sync.restore.set_fetch import RestoreReport, restore_newest


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
    known = {c.whole.set_name: c.fetch for c in candidates}
    remove_stale_temporaries(destination, [c.whole for c in candidates])
    linked = [c for c in candidates if not holds_files(c.whole) and c.problem is None]
    with_files = [c for c in candidates if holds_files(c.whole)]
    ordered, companions = checkpoints_first(with_files)
    taken = {c.whole.set_name for c in (*ordered, *companions)}
    no_checkpoint = [c.whole.set_name for c in with_files if c.whole.set_name not in taken]
    # Invariant: a set named as a save stages it (step_3.tmp/, sealed by a version before
    # staging names were never uploaded) is half a save: restored only when --set names it.
    staging = PathFilter.staging_names(watch)
    candidates = (committed_first(store, [c for c in ordered if not is_staging_set(
                      c.whole.set_name, staging)], companions) if set_name is None
                  else [c for c in candidates if c.whole.set_name == set_name])
    by_name = set_name is not None
    if companions and any(takes_companions(c.whole, by_name) for c in candidates):
        refuse_companions_in_the_way(destination, companions)
    # Restored into the watched directory, the files are already in S3: record them.
    ledger = (Ledger(StateDir(config.state_dir).ledger) if _is_watched(destination, watch)
              else None)
    if ledger is not None:  # before the set restored makes the others look deleted
        set_aside_if_wiped(ledger, bucket, object_key(watch.prefix, ""), destination,
                           beside_new_sets=True)
    exempt_long_lived_objects()  # the candidates' manifests too: a set's files are many
    passed_over: list[str] = []
    try:
        report = restore_newest(store, candidates, destination,
                                config.transfer.checksum_algorithm, ledger, passed_over)
        if report is not None:
            chosen = next(c for c in candidates if c.whole.set_name == report.set_name)
            if companions and takes_companions(chosen.whole, by_name):
                report = with_companions(report, companions, store,
                                         config.transfer.checksum_algorithm, ledger, known,
                                         asked_for=by_name)
            report = with_links(report, {c.whole.set_name: c.fetch for c in (chosen, *linked)},
                                ledger, store.bucket)
            if set_name is None:
                report = replace(report, higher_steps=higher_steps(report.set_name, candidates),
                                 unreadable=tuple(highest_first(unreadable)))
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
                                            highest_first(unreadable)))
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


def _none_left(where: str, passed_over: Sequence[str], no_checkpoint: Sequence[str],
               unreadable: Sequence[str]) -> str:
    """Why restore has no checkpoint to bring back: the sets it passed over, those whose
    manifest it could not read, and those it never takes for one
    (candidates.checkpoints_first), which --set still restores."""
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
