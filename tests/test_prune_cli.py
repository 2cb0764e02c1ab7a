"""`spotwatch prune` as operators run it (cron, by hand): its output and exit code say what it
did, end to end with the CLI against the moto server."""

from __future__ import annotations

import os
from typing import Any

from .conftest import Workspace, keys_in
from .faultproxy import FaultProxy, Request
from .test_daemon_e2e import flush_summary
from .test_prune import MANIFESTS, save_set


def _deletes(request: Request) -> bool:
    return "delete" in request.query  # DeleteObjects


def test_deletions_s3_refuses_make_prune_fail(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((200, "step_1"), (100, "step_2")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("403", _deletes, times=100)  # botocore does not retry AccessDenied
        result = workspace.cli("prune", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["deleted 0 objects"]
    assert result.stderr.splitlines()[-1] == (
        "spotwatch: error: 3 of 3 objects were not deleted (see the warnings above); "
        "the next prune tries again")
    assert f"{MANIFESTS}step_1.json" in keys_in(s3, workspace.bucket)
    # Once S3 takes them, the same command deletes them and succeeds.
    done = workspace.cli("prune", "-c", "config.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "deleted 3 objects"
