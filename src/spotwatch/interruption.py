"""For training code: has spotwatch seen an interruption notice? Poll it between steps.

    import spotwatch
    if spotwatch.interruption_pending():
        save_checkpoint()  # spotwatch uploads it as soon as it is written
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spotwatch.state import default_state_dir

NOTICE_FILE_ENV = "SPOTWATCH_NOTICE_FILE"


def notice_file_path() -> Path:
    explicit = os.environ.get(NOTICE_FILE_ENV)
    return Path(explicit) if explicit else default_state_dir() / "notice.json"


def interruption_pending(
    notice_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The notice (kind, deadline, detected_at) when one was seen, else None. Cheap: one stat."""
    path = Path(notice_file) if notice_file is not None else notice_file_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
