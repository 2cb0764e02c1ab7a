"""A file found unclosed at startup has been quiet since its last change, not since the scan."""

from __future__ import annotations

import os
import time
from typing import Any

from tests.conftest import Workspace, keys_in


def test_flush_counts_the_quiet_interval_from_the_files_last_change(
        workspace: Workspace, s3: Any) -> None:
    # Unchanged for 18 of its 20 quiet seconds: a one-shot flush (which sees no close events)
    # must take it within its stop_timeout, not wait 20 s more from its own start and give up.
    workspace.write_config(sync={"quiet_seconds": 20, "stop_timeout": 8})
    step = workspace.checkpoints / "step_1"
    step.mkdir()
    shard = step / "model.pt"
    shard.write_bytes(b"weights" * 1000)
    changed = time.time() - 18
    os.utime(shard, (changed, changed))

    result = workspace.cli("flush", "-c", str(workspace.config_file))

    assert result.returncode == 0, result.stderr
    assert {"run1/step_1/model.pt", "run1/.spotwatch/manifests/step_1.json"} <= keys_in(
        s3, workspace.bucket)
