"""Pointer files beside the set directories: after a restore they name the set restored.

Trainers keep a small top-level file that names their newest checkpoint directory: DeepSpeed's
`latest` holds its tag (`global_step300`), Megatron's `latest_checkpointed_iteration.txt` the
iteration (`300` for `iter_0000300/`). When restore falls back to an older set, the pointer it
brings back beside it still names the newer one, which is not there: the trainer then finds no
checkpoint and starts from scratch. Such a pointer is rewritten to name the set restored.

Only a small UTF-8 file named as one (`latest...`, `last...`) whose whole content (stripped) is
one name is a pointer: the name of another set of the restored set's series, or a bare number
where the file is Megatron's tracker or that number names a set of the series listed in S3.
Nothing else is touched, nor a pointer to a higher step that is there beside it whole (unless
the set restored was asked for by name).

A pointer is the trainer's commit: DeepSpeed and Megatron write it once every rank finished
saving the step it names. A newer step beside it may be a save that never finished (the
instance went away mid-save), so restore takes the step the pointer names (named_set) over
newer ones, as the trainer itself would load it from its own disk (sync.commits). A symlink
named as a pointer (Lightning's `last.ckpt`) is made to lead to the set restored the same way
(repointed_link).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from stat import S_IMODE, S_ISREG

from spotwatch.keys import series_of, step_order

# A pointer holds a name, a line at most; a file larger than this is no pointer.
POINTER_MAX_BYTES = 256
# Pointers that hold a bare number: Megatron-LM's (and NeMo's, Megatron-DeepSpeed's) tracker.
NUMBER_TRACKERS = frozenset({"latest_checkpointed_iteration.txt"})
_DIGITS = re.compile(r"[0-9]+")
# A pointer says so in its name: DeepSpeed's `latest` (and `latest_universal`), Megatron's
# `latest_checkpointed_iteration.txt`, a `last_step`. Any other small file that holds a name
# or a number of the series (an `epoch.txt`, a `best` naming the best step) means something
# else, and is never rewritten.
_POINTER_NAME = re.compile(r"(latest|last)(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Repointed:
    companion: str
    old: str  # what the pointer named (stripped)
    new: str


def named_as_pointer(name: str) -> bool:
    """Whether a file of this name (its last component) may be a pointer."""
    return _POINTER_NAME.match(name.rsplit("/", 1)[-1]) is not None


def _pointer_core(text: str, companion: str) -> str | None:
    """The one name a pointer file holds; None when the file is no pointer."""
    core = text.strip()
    if not core or any(ch.isspace() for ch in core) or not named_as_pointer(companion):
        return None
    return core


def named_set(text: str, companion: str, sets: Collection[str]) -> str | None:
    """The one of these sets that a pointer's text names (DeepSpeed's `latest` holding
    `global_step300`, Megatron's tracker holding `300` for `iter_0000300`); None when the file
    is no pointer or names none of them. companion: the pointer file's name."""
    core = _pointer_core(text, companion)
    if core is None:
        return None
    if core in sets:
        return core
    if not _DIGITS.fullmatch(core):
        return None
    numbered = [name for name in sets
                if len(runs := _DIGITS.findall(name)) == 1 and int(runs[0]) == int(core)]
    return numbered[0] if len(numbered) == 1 else None


@dataclass(frozen=True)
class Step:
    """A step of a numbered series, such as a pointer names it."""

    series: str  # keys.series_of
    number: tuple[int, ...]  # its runs of digits


def step_of(name: str) -> Step:
    return Step(series_of(name), tuple(int(run) for run in _DIGITS.findall(name)))


def step_named(text: str, companion: str, sets: Collection[str]) -> Step | None:
    """The step a pointer's text names, whether or not a set of that name is listed: a name
    of a numbered series one of the sets belongs to, or, in Megatron's tracker, a bare number
    where the sets numbered by one run of digits are of one series. None when the file is no
    pointer or its text names no step of these sets' series."""
    core = _pointer_core(text, companion)
    if core is None:
        return None
    # A bare number elsewhere names a step only where a set of that number is listed
    # (named_set): a `last_world_size` holding 2 counts no step. As a name it may still be
    # one of a series of bare numbers (DeepSpeed tags `200`, `300`).
    if _DIGITS.fullmatch(core) and companion in NUMBER_TRACKERS:
        series = {series_of(name) for name in sets if len(_DIGITS.findall(name)) == 1}
        return Step(series.pop(), (int(core),)) if len(series) == 1 else None
    step = step_of(core)
    return step if step.number and any(series_of(name) == step.series
                                       for name in sets) else None


def repointed_text(text: str, companion: str, restored: str,
                   known: Collection[str]) -> tuple[str, str, str] | None:
    """(the new content, the name it held, the name it now holds) when the text is a pointer to
    another set of the restored set's series; None when it is no pointer or names that set.
    companion: the pointer file's name; known: the names of the sets listed in S3."""
    core = _pointer_core(text, companion)
    if core is None or core == restored:
        return None
    start = text.index(core)
    if series_of(core) == series_of(restored):
        new = restored
    else:
        new_number = _number_pointed(core, companion, restored, known)
        if new_number is None:
            return None
        new = new_number
    return text[:start] + new + text[start + len(core):], core, new


def _number_pointed(core: str, companion: str, restored: str,
                    known: Collection[str]) -> str | None:
    """The restored set's number as the pointer writes it, if the pointer is a bare number of
    another set of the series (the restored name has one run of digits to compare with)."""
    runs = _DIGITS.findall(restored)
    if not _DIGITS.fullmatch(core) or len(runs) != 1 or int(core) == int(runs[0]):
        return None
    pointed = _set_pointed(core, restored)
    if companion not in NUMBER_TRACKERS and pointed not in known:
        return None
    number = str(int(runs[0]))
    # Zero-padded as the pointer was, else as Megatron writes it: str(iteration).
    return number.zfill(len(core)) if core.startswith("0") and len(core) > 1 else number


def _set_pointed(old: str, restored: str) -> str:
    """The set a pointer's old content names (a name of the series, or its number)."""
    if series_of(old) == series_of(restored):
        return old
    runs = _DIGITS.findall(restored)
    return _DIGITS.sub(old.zfill(len(runs[0])), restored)


def repointed_link(link_path: str, target: str, restored: str) -> str | None:
    """The text a top-level pointer link (named as a pointer: Lightning's `last.ckpt`, a
    `latest -> step_300`) gets to lead to the set restored instead of another set of its
    series; None for any other link. The caller makes it only where its target is there."""
    if "/" in link_path or not named_as_pointer(link_path):
        return None
    parts = target.split("/")
    lead = next((i for i, part in enumerate(parts) if part not in ("", ".")), None)
    if lead is None or parts[lead] in ("..", restored) \
            or series_of(parts[lead]) != series_of(restored):
        return None
    parts[lead] = restored
    return "/".join(parts)


def repoint(path: Path, companion: str, restored: str, known: Collection[str],
            temporary: Path, asked_for: bool = False,
            whole_here: Callable[[str], bool] = lambda name: True) -> Repointed | None:
    """Rewrite the file at path when it points to another set of the restored set's series
    (see repointed_text); temporary: where the new content waits until it replaces the file
    in one rename. Its mtime is now: it is no longer the object in S3, and the daemon, when the
    path is watched, uploads the pointer as it now is. asked_for: the set restored was named
    (`restore --set`, a rollback): the pointer names it whatever is beside it. whole_here:
    whether a set beside the pointer holds every file its manifest lists."""
    try:
        # Never through a symlink, nor from a FIFO or a device: a pointer left out of the
        # restore is whatever was at the destination already.
        info = os.lstat(path)
        if not S_ISREG(info.st_mode) or info.st_size > POINTER_MAX_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    change = repointed_text(text, companion, restored, known)
    if change is None:
        return None
    content, old, new = change
    # A higher step it names is there beside it, whole (the same disk after a reboot, a shared
    # file system): the trainer wrote the pointer once that step was saved; it loads it as it
    # is. Invariant: never a pointer left naming a step that is there only in part (a restore
    # killed while placing it, a save cut short): the trainer would load a broken checkpoint.
    # One naming a lower step would have the trainer load that step instead of the newer one
    # restored.
    pointed = _set_pointed(old, restored)
    if (not asked_for and step_order(pointed) > step_order(restored)
            and os.path.lexists(path.parent / pointed) and whole_here(pointed)):
        return None
    try:
        temporary.write_text(content, encoding="utf-8")
        os.chmod(temporary, S_IMODE(info.st_mode))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return Repointed(companion, old, new)
