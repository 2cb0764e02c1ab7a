"""For training code: has spotwatch seen an interruption notice? Poll it between steps.

    import spotwatch
    if spotwatch.interruption_pending():
        save_checkpoint()  # spotwatch uploads it as soon as it is written

The daemon and its readers agree on where the notice file lives through notice_dirs() alone:
the daemon writes to the first directory there that it may use, a reader (which may run as
another user, and cannot know which one that was) takes the first notice file that exists.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from spotwatch.mounts import is_mount_point
from spotwatch.state import default_state_dir

NOTICE_FILE_ENV = "SPOTWATCH_NOTICE_FILE"
NOTICE_FILE_NAME = "notice.json"
# Where a daemon running as root puts the notice without systemd, and where the README's
# sidecar setups mount the volume they share with the trainer.
SHARED_RUNTIME_DIR = Path("/run/spotwatch")


def notice_dirs(state_dir: Path | None = None) -> list[tuple[Path, bool]]:
    """Where the notice file goes by default, in order, each with whether this process may
    put it there: systemd's RuntimeDirectory, /run/spotwatch (for root, or when it exists and
    is writable), the user's runtime dir, and last the state directory."""
    dirs: list[tuple[Path, bool]] = []
    if os.environ.get("RUNTIME_DIRECTORY"):
        dirs.append((Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]), True))
    dirs.append((SHARED_RUNTIME_DIR,
                 os.geteuid() == 0 or os.access(SHARED_RUNTIME_DIR, os.W_OK)))
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append((Path(os.environ["XDG_RUNTIME_DIR"]) / "spotwatch", True))
    dirs.append((state_dir or default_state_dir(), True))
    return dirs


def default_notice_file(state_dir: Path) -> Path:
    """Where the daemon writes the notice when the config names no file."""
    return next(directory for directory, usable in notice_dirs(state_dir) if usable) / \
        NOTICE_FILE_NAME


def passed_over_notice_dir(state_dir: Path) -> Path | None:
    """A default place this process may not use, ahead of the one default_notice_file
    chooses, where a trainer would look: a volume mounted there (shared with the trainer,
    owned by another user), so the notice goes to a place the trainer never reads; or one
    holding a notice file (an earlier daemon's), which a reader takes first. Else None: a
    plain directory holding no notice (the image's own /run/spotwatch, run as another uid)
    leads readers on to the place used."""
    for directory, usable in notice_dirs(state_dir):
        if usable:
            return None
        if os.path.lexists(directory / NOTICE_FILE_NAME) or is_mount_point(directory):
            return directory
    return None


def notice_file_candidates() -> list[Path]:
    """Where a reader looks: $SPOTWATCH_NOTICE_FILE alone when set, else every default."""
    explicit = os.environ.get(NOTICE_FILE_ENV)
    if explicit:
        return [Path(explicit)]
    return [directory / NOTICE_FILE_NAME for directory, _ in notice_dirs()]


def interruption_pending(
    notice_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The notice (kind, deadline, detected_at) when one was seen, else None. Cheap: a stat or
    two. A notice file that exists but cannot be read warns (naming it) instead of hiding the
    notice behind a plain None."""
    paths = [Path(notice_file)] if notice_file is not None else notice_file_candidates()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            warnings.warn(f"spotwatch: cannot read the notice file {path}: {exc.strerror}",
                          RuntimeWarning, stacklevel=2)
            return None
        except UnicodeDecodeError:  # the training loop calls this: never raises for content
            warnings.warn(f"spotwatch: {path} is not a notice file (not UTF-8 text)",
                          RuntimeWarning, stacklevel=2)
            return None
        return _parse_notice(path, text)
    return None


def _parse_notice(path: Path, text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # nested too deep for the decoder is garbage too
        data = None
    if not isinstance(data, dict):
        warnings.warn(f"spotwatch: {path} is not a notice file (not a JSON object)",
                      RuntimeWarning, stacklevel=3)
        return None
    return data
