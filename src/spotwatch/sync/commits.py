"""Which steps in S3 the trainer has committed: a pointer beside the steps (DeepSpeed's
`latest`, Megatron's tracker) is written once every rank finished saving the step it names, so
a newer step of that series may be a save that never finished (the instance went away mid-save,
and the files written so far were sealed). Restore passes such a step over; retention does not
count it among the sets it keeps, so it never drops the committed step for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.keys import series_of
from spotwatch.sync.pointers import (
    POINTER_MAX_BYTES,
    Step,
    named_as_pointer,
    named_set,
    step_named,
    step_of,
)
from spotwatch.sync.sets.manifest import Manifest


@dataclass(frozen=True)
class Uncommitted:
    set_name: str
    pointer: str  # the pointer's set
    names: str  # the step it names


def uncommitted(store: ObjectStore, manifests: Sequence[Manifest]) -> list[Uncommitted]:
    """The sets (manifests: newest first) newer than the step of their series a pointer among
    them names. One GET per pointer (a small file named as one)."""
    names = [manifest.set_name for manifest in manifests]
    found: dict[str, Uncommitted] = {}
    committed: set[str] = set()
    for manifest in manifests:
        text = _pointer_text(store, manifest)
        if text is None:
            continue
        pointed = named_set(text, manifest.set_name, names)
        if pointed is not None:
            committed.add(pointed)
        newer = (_listed_before(pointed, names) if pointed is not None
                 else _numbered_beyond(step_named(text, manifest.set_name, names), names))
        for name in newer:
            if name not in found:
                found[name] = Uncommitted(name, manifest.set_name, pointed or text.strip())
    # Invariant: a step a pointer names, whole in S3, is committed, and so is every older step
    # of its series: another pointer that names an older step (Megatron's tracker beside
    # DeepSpeed's `latest`, not uploaded again before the instance went away) never passes
    # it over.
    for step in committed:
        for name in [step, *names[names.index(step) + 1:]]:
            if series_of(name) == series_of(step):
                found.pop(name, None)
    return list(found.values())


def _listed_before(pointed: str, names: Sequence[str]) -> list[str]:
    """The sets of the pointed set's series newer than it (names: newest first)."""
    series = series_of(pointed)
    return [name for name in names[:names.index(pointed)] if series_of(name) == series]


def _numbered_beyond(pointed: Step | None, names: Sequence[str]) -> list[str]:
    """Where the step a pointer names is not among the sets (never sealed complete: at a
    notice the newest step is flushed first, and the one before it may not have made it), the
    sets of its series numbered past it: the trainer had not committed them. Only while a set
    of the series numbered at most the pointed step is there to restore instead; else none is
    passed over, as restore would then have none of the series to give back."""
    if pointed is None:
        return []
    steps = {name: step_of(name) for name in names}
    of_series = {name: step for name, step in steps.items()
                 if step.series == pointed.series and len(step.number) == len(pointed.number)}
    if not any(step.number <= pointed.number for step in of_series.values()):
        return []
    return [name for name, step in of_series.items() if step.number > pointed.number]


def is_pointer_set(manifest: Manifest) -> bool:
    """A one-file set named and small enough to be a pointer (DeepSpeed's `latest`): a name
    of a checkpoint, never one itself."""
    return (len(manifest.files) == 1 and manifest.files[0].path == manifest.set_name
            and manifest.files[0].size <= POINTER_MAX_BYTES
            and named_as_pointer(manifest.set_name))


def _pointer_text(store: ObjectStore, manifest: Manifest) -> str | None:
    """The text of a one-file set named and small enough to be a pointer, if it is the size
    its manifest lists."""
    if not is_pointer_set(manifest):
        return None
    entry = manifest.files[0]
    try:
        body = store.get_bytes(entry.key, limit=POINTER_MAX_BYTES)
        return body.decode("utf-8") if len(body) == entry.size else None
    except (StoreError, UnicodeDecodeError):
        return None
