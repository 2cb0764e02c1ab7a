"""How S3 keys are named: a file's key below its prefix, its checkpoint set, the set's manifest.

A checkpoint set is the first path component below a watched directory: a subdirectory such as
``step_1000/`` with everything in it, or a single top-level file. Its manifest lives under
``<prefix>.spotwatch/manifests/``, and lists the set's symlinks that stay inside the tree
(link_destination). A sealed version of a file that is being replaced is held under
``<prefix>.spotwatch/held/`` until its set is sealed again (sync.sets.held). These rules are
shared by config validation, the IAM policy, preflight, the sync engine and restore, so they
import nothing from spotwatch.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from typing import TypeVar

MANIFEST_DIR = ".spotwatch/manifests/"
# The first path component of every key spotwatch writes for itself (manifests, probes).
RESERVED_SET = MANIFEST_DIR.split("/", 1)[0]
HELD_DIR = ".spotwatch/held/"
WRITE_PROBE = ".spotwatch/probe-"  # `spotwatch check` writes and deletes <prefix>probe-<host>
# How a restore's temporaries end (sync.restore.destination.temporary).
RESTORE_TEMP_SUFFIX = ".spotwatch-restore"
# The longest file name, in bytes, that Linux file systems take (NAME_MAX).
NAME_MAX = 255
_RESTORE_TEMPORARY = re.compile(r"\.(.+)\.([0-9a-f]{12})" + re.escape(RESTORE_TEMP_SUFFIX),
                                re.DOTALL)
S3_KEY_MAX_BYTES = 1024
_T = TypeVar("_T")
_DIGITS = re.compile(r"[0-9]+")
# A file's place among the shards of one save (model-00001-of-00004.safetensors,
# pytorch_model-00002-of-00003.bin): part of one checkpoint, never a step.
_SHARD_INDEX = re.compile(r"[0-9]+-of-[0-9]+", re.IGNORECASE)
# A step the name calls one (epoch=3-step=1200, val_loss=2.34-step=1000, global_step500).
_NAMED_STEP = re.compile(r"step[=_-]?([0-9]+)", re.IGNORECASE)


def object_key(prefix: str, relative_path: str) -> str:
    """The key of a file below a watched directory; refuses anything that would leave the
    prefix (an absolute path or a '..' component), whatever produced the path."""
    if relative_path.startswith("/") or ".." in relative_path.split("/"):
        raise ValueError(f"path escapes the watched directory: {relative_path!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + relative_path


def storable_key(prefix: str, relative_path: str, node: tuple[str, int] | None = None) -> str:
    """The key of a file below a watched directory, once sure that S3 can store both it and
    its set's manifest; ValueError saying why not otherwise. node: (job id, rank) on a node of
    a multi-node job, whose set manifest is its part (part_key, always the longer key).

    Invariant: a name S3 cannot take never reaches the ledger or S3. Such a name is one with
    bytes that are not UTF-8 (Python keeps them as surrogate escapes, which neither SQLite nor
    S3 accepts), or whose key or set manifest key exceeds S3's 1,024 bytes of UTF-8.
    """
    key = object_key(prefix, relative_path)
    set_name = set_name_of(relative_path)
    sealed_by = (manifest_key(prefix, set_name) if node is None
                 else part_key(prefix, node[0], set_name, node[1]))
    for what, candidate in (("key", key), ("set manifest key", sealed_by)):
        try:
            size = len(candidate.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("name is not valid UTF-8") from None
        if size > S3_KEY_MAX_BYTES:
            raise ValueError(f"{what} would be {size} bytes, S3 takes at most {S3_KEY_MAX_BYTES}")
    return key


def set_name_of(relative_path: str) -> str:
    return relative_path.split("/", 1)[0]


def below_prefix(key: str, prefixed: Iterable[tuple[str, _T]]) -> tuple[_T, str] | None:
    """Of (watched prefix, what watches it) pairs, the first whose prefix holds key, and the
    key's path below it; None when none does."""
    for prefix, watcher in prefixed:
        below = object_key(prefix, "")
        if key.startswith(below):
            return watcher, key[len(below):]
    return None


def is_utf8(text: str) -> bool:
    """Whether the text is UTF-8 as it was read: a name with bytes that are not UTF-8 holds
    them as surrogate escapes, which neither S3 nor the CRT's file paths take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def link_destination(link_path: str, target: str) -> str | None:
    """Where a symlink at link_path (relative to a watched directory) whose text is target
    leads, as a path relative to that directory, read as text ('..' drops the component
    before it); None when the target is empty, absolute, holds a NUL or is not UTF-8, or when
    it leads to the directory itself or out of it.

    Invariant: a link is recorded in a manifest, and made again by restore, only when this
    says it stays inside the tree (the daemon also checks where it really leads)."""
    if not target or target.startswith("/") or "\0" in target or not is_utf8(target):
        return None
    parts = link_path.split("/")[:-1]
    for part in target.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts) or None


# NeMo marks a checkpoint it is saving with an empty file beside it, removed once the save is
# finished: `<checkpoint, less .ckpt and -EMA>-unfinished`. At its start NeMo deletes every
# checkpoint that has one, so one restored beside a checkpoint costs the checkpoint.
UNFINISHED_SUFFIX = "-unfinished"


def unfinished_marker(set_name: str) -> str:
    """The name of the file that says the set (a top-level checkpoint) is still being saved."""
    return set_name.removesuffix(".ckpt").removesuffix("-EMA") + UNFINISHED_SUFFIX


def series_of(set_name: str) -> str:
    """The series a set belongs to for retention: its name with every run of digits as one
    '#'. step_100 and step_2000 are one series (step_#), epoch=3-step=400.ckpt another; a name
    without digits (DeepSpeed's `latest`, a config.json beside the steps) is a series of its
    own, and so is each shard of a save (model-00001-of-00004.safetensors keeps its digits:
    the shards of one model are no series of older and newer sets)."""
    pieces = _SHARD_INDEX.split(set_name)
    shards = _SHARD_INDEX.findall(set_name)
    return _DIGITS.sub("#", pieces[0]) + "".join(
        shard + _DIGITS.sub("#", piece) for shard, piece in zip(shards, pieces[1:], strict=True))


def step_number(set_name: str) -> int | None:
    """The step a set is: the one its name calls a step (epoch=3-step=400, global_step300),
    else the one number it holds (step_100, checkpoint-500, iter_0000300); None where it holds
    none, or several whose order need not be the training's (a shard index is none of them)."""
    named = _NAMED_STEP.findall(set_name)
    if len(named) == 1:
        return int(named[0])
    runs = _DIGITS.findall(_SHARD_INDEX.sub("", set_name))
    return int(runs[0]) if len(runs) == 1 else None


# natural_order's sort key: (text, number) pairs, then the name.
NaturalKey = tuple[tuple[tuple[str, int], ...], str]


def natural_order(set_name: str) -> NaturalKey:
    """A sort key of the name by its text and its numbers' values: step_2 before step_10,
    global_step300 before global_step1000, so within a series (series_of) the order of the
    step numbers. Each text before a number is paired with the number (-1 after the last),
    so any two names compare; the name itself last tells step_01 and step_1 apart."""
    texts = _DIGITS.split(set_name)
    numbers = [int(run) for run in _DIGITS.findall(set_name)]
    return tuple(zip(texts, [*numbers, -1], strict=True)), set_name


def step_order(set_name: str) -> tuple[int, NaturalKey]:
    """A sort key of a series' sets in training order: by step (keys.step_number), then by
    natural_order (val_loss=2.34-step=1000 and val_loss=1.9-step=2000 by their steps)."""
    step = step_number(set_name)
    return (-1 if step is None else step), natural_order(set_name)


def is_reserved(relative_path: str) -> bool:
    """Whether a path below a watched directory lies in spotwatch's own key space.

    Invariant: no local file is ever a checkpoint under ``<prefix>.spotwatch/``, so nothing in
    a watched directory (say, manifests brought down by ``aws s3 sync``) can overwrite or forge
    a manifest, or be restored as the newest set.
    """
    return set_name_of(relative_path) == RESERVED_SET


def restore_temporary_name(stem: str) -> str:
    """The name of a restore's temporary for stem (a file's name, or its digest): hidden,
    with a tag made of the stem, and RESTORE_TEMP_SUFFIX."""
    return f".{stem}.{_restore_tag(stem)}{RESTORE_TEMP_SUFFIX}"


def restore_temporary_for(name: str, role: str = "", *, by_digest: bool = False) -> str:
    """The name of a restore's temporary beside a file named name (role: what it holds, such
    as ".kept"), within NAME_MAX: made of the name's digest instead when the name nearly fills
    it, or when by_digest (the caller's first choice was taken)."""
    made = restore_temporary_name(name + role)
    if by_digest or len(os.fsencode(made)) > NAME_MAX:
        made = restore_temporary_name(hashlib.sha256(os.fsencode(name)).hexdigest()[:32] + role)
    return made


def _restore_tag(stem: str) -> str:
    return hashlib.sha256(os.fsencode(stem)).hexdigest()[:12]


def is_restore_temporary(relative_path: str) -> bool:
    """Whether the file is a restore's temporary (restore_temporary_name: of any process).

    Invariant: a restore's temporary is never a checkpoint. It becomes one only once its whole
    set checked out and it was renamed into place, so a daemon watching the directory a restore
    writes into never uploads half a download, or a file of a set that turns out corrupt.
    Only a name with the tag its stem makes is one: a file of the trainer's named like it
    (".notes.spotwatch-restore") is uploaded, and no restore removes it.
    """
    found = _RESTORE_TEMPORARY.fullmatch(relative_path.rpartition("/")[2])
    return found is not None and _restore_tag(found[1]) == found[2]


def manifest_prefix(prefix: str) -> str:
    return object_key(prefix, MANIFEST_DIR)


def manifest_key(prefix: str, set_name: str) -> str:
    return manifest_prefix(prefix) + f"{set_name}.json"


def held_prefix(prefix: str) -> str:
    return object_key(prefix, HELD_DIR)


def held_key(prefix: str, relative_path: str) -> str:
    """Where the sealed version of a file is copied before a new version replaces it
    (sync.sets.held): ``<prefix>.spotwatch/held/<relative path>``. In spotwatch's own key
    space (is_reserved), so no listing of sets, mirrored deletion or restore takes it for a
    file of a set, or for a set of its own."""
    return held_prefix(prefix) + relative_path


def held_key_of(prefix: str, key: str) -> str:
    """The held key of the object at key, a file's below prefix."""
    return held_key(prefix, key.removeprefix(object_key(prefix, "")))


def held_of_set(prefix: str, set_name: str, key: str) -> bool:
    """Whether key is a held copy of a file of the set (its one file, or one below it)."""
    return belongs_to_set(key, held_key(prefix, set_name))


def job_key_space(prefix: str, job_id: str) -> str:
    """Where a multi-node job keeps what its nodes share below a watched prefix (each node's
    part of a set, peer notices): ``<prefix>.spotwatch/jobs/<job id>/``."""
    return object_key(prefix, f"{RESERVED_SET}/jobs/{job_id}/")


def parts_prefix(prefix: str, job_id: str) -> str:
    return job_key_space(prefix, job_id) + "parts/"


def part_key(prefix: str, job_id: str, set_name: str, rank: int) -> str:
    """Where node `rank` of a job writes its part of a set: the manifest of its own files."""
    return parts_prefix(prefix, job_id) + f"{set_name}/node-{rank}.json"


def belongs_to_set(key: str, set_key: str) -> bool:
    return key == set_key or key.startswith(set_key + "/")
