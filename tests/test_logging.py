"""Every line the daemon writes in JSON format is a JSON object, library records included."""

from __future__ import annotations

import json
import subprocess
import sys
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


QUIET_THEN_SAYING = """
import logging, sys
from spotwatch.logs import configure_logging, get_logger
import spotwatch.commands.restore, spotwatch.commands.status, spotwatch.commands.run
configure_logging("info", "json")
log = get_logger("spotwatch.test")
log.debug("below_the_level")
print("after a quiet start:", "structlog" in sys.modules, flush=True)
logging.getLogger("botocore.test").warning("a library speaks first")
log.info("said", n=1)
print("after a line:", "structlog" in sys.modules, flush=True)
"""


def test_structlog_is_loaded_with_the_first_line_and_every_line_is_json() -> None:
    """A command that has nothing to say never imports structlog (40 ms of every start); the
    first line, a library's record included, is a JSON line all the same."""
    result = subprocess.run([sys.executable, "-c", QUIET_THEN_SAYING], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.splitlines() == ["after a quiet start: False", "after a line: True"]
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(r.get("logger"), r["event"], r["level"]) for r in records] == [
        ("botocore.test", "a library speaks first", "warning"), (None, "said", "info")]
    assert records[1]["n"] == 1


WARNING_FROM_A_LIBRARY = """
import warnings
from spotwatch.logs import configure_logging
configure_logging("info", "json")
warnings.warn("Callback with id 7 already exists", RuntimeWarning)
"""


def test_a_librarys_python_warning_is_a_json_line() -> None:
    """watchdog warns through `warnings` (a callback registered twice, say): in a JSON log
    that is one more JSON line, not raw text among them."""
    result = subprocess.run([sys.executable, "-c", WARNING_FROM_A_LIBRARY], capture_output=True,
                            text=True, timeout=60, check=True)
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(records) == 1 and records[0]["level"] == "warning"
    assert "Callback with id 7 already exists" in records[0]["event"]
