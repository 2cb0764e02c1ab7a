"""Symlinks below a watched directory: which are recorded, and how restore makes them again.

Trainers point a link at their newest checkpoint: Lightning's `last.ckpt ->
epoch=3-step=400.ckpt` (ModelCheckpoint(save_last="link")), a `latest -> step_100`. A link
that leads to something inside the watched directory is recorded: its set's manifest lists
its text (Manifest.links), and it has no object, since its target is uploaded once, as itself.
Any other link (out of the tree, or dangling) is not followed: its target may lie anywhere
and change unseen.

A link whose text is absolute and names a path below the watched directory (Lightning 2.1's
`last.ckpt -> /abs/ckpts/epoch=3-step=400.ckpt`, mmcv's `latest.pth`) is recorded with the
equivalent relative text (recorded_text), which restore makes again: the absolute text would
lead out of any other destination, and manifests take relative text only
(keys.link_destination).

A link in a set directory that leads to a file of another set (a trainer or a dedup step saving
step_200 with `embed.pt -> ../step_100/embed.pt` for a file that did not change) makes that
file part of its set: the manifest also records the file's entry (LinkEntry.file), so that the
set is complete, restored and kept by retention with it (linked_target says which file). So does
one that leads to a directory of another set (`tokenizer -> ../step_100/tokenizer`) for every
regular file below that directory (LinkEntry.files); links inside it are not followed (each is
recorded by its own set, if at all).
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from spotwatch.keys import link_destination, set_name_of
from spotwatch.sync.sets.manifest import LinkEntry


class LinkSkipped(Exception):
    """Why a symlink is not recorded."""


def link_entry(root: Path, path: Path, relative: str) -> LinkEntry | None:
    """The manifest entry of the symlink at path (relative: its path below the watched
    directory root), with its text relative (recorded_text); None when it is gone.
    LinkSkipped when it leads out of the tree (as written, or through another link) or to
    nothing."""
    try:
        target = recorded_text(root, relative, os.readlink(path))
    except OSError:
        return None
    if link_destination(relative, target) is None:
        raise LinkSkipped("its target is outside the watched directory")
    try:
        leads_to = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a loop (RuntimeError before Python 3.13)
        raise LinkSkipped("dangling: its target does not exist") from None
    if root.resolve() not in leads_to.parents:
        raise LinkSkipped("its target is outside the watched directory")
    return LinkEntry(relative, target)


def recorded_text(root: Path, relative: str, target: str) -> str:
    """The text recorded for the symlink at relative (its path below root, through real
    directories: walk_files follows no link) whose text is target. An absolute text that
    names a path below root, as configured or as it resolves, becomes '..' up from the link's
    folder to root, then the rest of the text unchanged: it leads where the absolute text
    does, through the same further links, and its '..' are judged as a relative text's
    (link_destination). Any other text is kept as it is (an absolute one stays refused)."""
    if not target.startswith("/"):
        return target
    parts = _components(target)
    for base in (root.absolute(), root.resolve()):
        prefix = _components(base.as_posix())
        if parts[:len(prefix)] == prefix:
            return "/".join([".."] * relative.count("/") + parts[len(prefix):])
    return target


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def linked_target(root: Path, path: Path, relative: str) -> tuple[str, os.stat_result] | None:
    """(path below root, stat) of the regular file or directory of another set that the symlink
    at path (relative: its path below root), in a set directory, leads to, through any further
    links; None for any other link: one within its set, a set that is itself a link
    (Lightning's `last.ckpt`, a `latest -> step_100`: a pointer, not part of a checkpoint), a
    link to anything else, or one gone or leading out of the tree."""
    if "/" not in relative:
        return None
    try:
        leads_to = path.resolve(strict=True)
        stat = os.stat(leads_to, follow_symlinks=False)
        below = leads_to.relative_to(root.resolve()).as_posix()
    except (OSError, RuntimeError, ValueError):
        return None
    if below == "." or not (S_ISREG(stat.st_mode) or S_ISDIR(stat.st_mode)):
        return None  # the watched directory itself is no set's
    return None if set_name_of(below) == set_name_of(relative) else (below, stat)


def leads_into(place: Path, target: str, root: Path) -> bool:
    """Whether a link at place (in a folder already resolved) with this text would lead to
    something that is there, below root (resolved)."""
    return leads_to(place, target, root) is not None


def leads_to(place: Path, target: str, root: Path) -> Path | None:
    """What a link at place (in a folder already resolved) with this text would lead to,
    resolved, if it is there, below root (resolved). A folder not made yet is made a real
    directory by restore: '..' from it is its parent, so the text is read from the folder as
    text (a set whose folder holds nothing but links to files of another set)."""
    folder = place.parent
    joined = folder / target if folder.is_dir() else Path(os.path.normpath(folder / target))
    try:
        there = joined.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return there if root in there.parents else None


def make_link(place: Path, target: str, temporary: Path) -> None:
    """A symlink at place with this text: made under the temporary name, then renamed over
    whatever is at place (a file, an older link, which is replaced, never followed), so that
    place never lacks a link nor holds half of one."""
    try:
        if os.readlink(place) == target:
            return
    except OSError:
        pass  # no link there
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, place)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
