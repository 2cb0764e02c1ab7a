"""Every line the daemon writes in JSON format is a JSON object, library records included."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Workspace, keys_in, wait_for
from .test_daemon_e2e import save_checkpoint


def test_library_records_are_json_lines(workspace: Workspace, s3: Any) -> None:
    # At debug level botocore, urllib3 and watchdog all log while a file is uploaded.
    workspace.write_config(log={"level": "debug", "format": "json"})
    daemon = workspace.start_daemon()
    save_checkpoint(workspace.checkpoints / "model.pt", 10_000)
    wait_for(lambda: "run1/model.pt" in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0

    lines = [line for line in daemon.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # any plain-text line fails here
    assert all(isinstance(r, dict) and r.get("event") is not None and r.get("level")
               for r in records)
    loggers = {str(r.get("logger", "")).split(".")[0] for r in records}
    assert {"botocore", "urllib3"} <= loggers
    assert any(r["event"] == "upload_done" for r in records)
