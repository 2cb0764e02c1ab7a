"""Which sets restore tries, and in what order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spotwatch.aws.store import ObjectStore
from spotwatch.config import JobSettings
from spotwatch.keys import UNFINISHED_SUFFIX, series_of, step_number, step_order
from spotwatch.logs import get_logger
from spotwatch.sync.commits import is_pointer_set, uncommitted
from spotwatch.sync.filters import PathFilter
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.parts import JobSet
from spotwatch.sync.sets.remote import list_job_sets, list_manifests

log = get_logger("spotwatch.restore")


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
        if is_pointer_set(job_set.whole):
            candidates.append(_pointer_candidate(job_set))
            continue
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


def _pointer_candidate(job_set: JobSet) -> Candidate:
    """A pointer (DeepSpeed's `latest`) that one node writes, or each its own: every node needs
    it to resume (DeepSpeed's load starts from scratch without it), and restore makes it name
    the set restored beside it (beside.with_companions), whichever step it named. So it is
    restorable with parts missing, or naming other steps: as the part sealed last has it, the
    object's likely last writer, its bytes checked against that part alone."""
    newest = max(job_set.parts.values(), key=lambda part: part.sealed_at)
    return Candidate.of(newest)


def is_staging_set(set_name: str, staging: PathFilter) -> bool:
    """Whether a set's name is one a save stages under, judged as the tracker judges the
    files it never uploads (staging: PathFilter.staging_names): the set's own (a file) or
    its files' (a directory)."""
    return not staging.accepts(set_name) or not staging.accepts(set_name + "/_")


def is_unfinished_marker(manifest: Manifest) -> bool:
    """Whether the set is an empty top-level file named as NeMo's marker."""
    return (manifest.set_name.endswith(UNFINISHED_SUFFIX) and manifest.bytes == 0
            and [entry.path for entry in manifest.files] == [manifest.set_name])


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
    restores such a set. Those set directories come first, newest first, then the numbered
    top-level files of a series of two or more; the other top-level files, unnumbered
    (`latest`, a `config.json`) or alone in their series (DeepSpeed's `zero_to_fp32.py`), are
    restored beside the set directory, which may need them to load, and are never tried for
    the checkpoint; one that points to another step (`latest` naming an incomplete
    global_step300) is made to name the step restored (sync.pointers). Where checkpoints are
    files only (Lightning's epoch=3-step=400.ckpt and last.ckpt), the newest complete set is
    restored, as ever."""
    steps = [c for c in candidates if is_directory_set(c.whole) and _is_numbered(c.whole)]
    if not steps:
        return _files_only(candidates)
    in_series = Counter(series_of(c.whole.set_name) for c in candidates)
    files = [c for c in candidates if not is_directory_set(c.whole)]
    # A numbered file alone in its series beside the steps is no checkpoint of its own but
    # a file the trainer keeps beside them: DeepSpeed's zero_to_fp32.py, copied at each save.
    companions = [c for c in files if not _is_numbered(c.whole)
                  or in_series[series_of(c.whole.set_name)] == 1]
    return steps + [c for c in files if c not in companions], companions


def _files_only(candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """checkpoints_first where checkpoints are files only. A pointer is never the checkpoint:
    restored alone it hands back a name and no step (`latest` sealed, the step it names
    never). Where files are numbered (Lightning's epoch=3-step=400.ckpt beside last.ckpt) the
    newest complete file comes back, as ever. Where none is (model.pt and optim.pt saved in
    place, a Hugging Face save_model), every file is part of the checkpoint: the newest
    complete one comes back, and the others beside it (takes_companions)."""
    checkpoints = [c for c in candidates if not is_pointer_set(c.whole)]
    if not checkpoints or any(_is_numbered(c.whole) for c in checkpoints):
        return checkpoints, []
    return checkpoints, list(candidates)


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


def takes_companions(manifest: Manifest, by_name: bool) -> bool:
    """Whether the companions come with the set restored: a numbered set directory
    (global_step100/), which the pointer beside it must name to be loaded, named by --set or
    not; or, unless --set named it alone, a file of a checkpoint of unnumbered files
    (_files_only)."""
    if is_directory_set(manifest):
        return _is_numbered(manifest)
    return not by_name and not _is_numbered(manifest)


def _is_numbered(manifest: Manifest) -> bool:
    return series_of(manifest.set_name) != manifest.set_name


def is_directory_set(manifest: Manifest) -> bool:
    return any(path != manifest.set_name for path in file_paths(manifest))


def holds_files(manifest: Manifest) -> bool:
    """Whether the set is a checkpoint, not links only: it has files, or links to files of
    other sets (a step directory all of whose files a dedup step linked to an older one's)."""
    return bool(file_paths(manifest))


def file_paths(manifest: Manifest) -> list[str]:
    """The paths of the set's files, with those its links to files and directories of other
    sets make part of it, as seen through the links (LinkEntry.linked)."""
    return [*(entry.path for entry in manifest.files),
            *(entry.path for link in manifest.links for entry in link.linked)]


def higher_steps(restored: str, candidates: Sequence[Candidate]) -> tuple[str, ...]:
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


def highest_first(set_names: Sequence[str]) -> list[str]:
    return sorted(set_names, key=step_order, reverse=True)
