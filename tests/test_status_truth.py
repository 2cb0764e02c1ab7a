"""What `spotwatch status`, status.json and the metrics say, compared with what is true: a set
whose manifest is not written yet, a final flush the stop timeout cut short, a stalled daemon."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from spotwatch.commands.status import HEALTHY_WITHIN_SECONDS
from tests.conftest import Daemon, Workspace, wait_for
from tests.faultproxy import FaultProxy
from tests.test_faults import checkpoint_data, proxy  # noqa: F401  (the proxy fixture)
from tests.test_metrics import metrics_url, scrape


def hang_manifest_writes(proxy: FaultProxy) -> None:  # noqa: F811
    proxy.add("delay", lambda r: r.method == "PUT" and "/.spotwatch/manifests/" in r.path,
              times=100, delay=600)


def daemon_with_a_set_waiting_for_its_manifest(workspace: Workspace,
                                               proxy: FaultProxy) -> Daemon:  # noqa: F811
    """Every file of step_1 is in S3; its manifest write hangs."""
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    hang_manifest_writes(proxy)
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    daemon.wait_for_event("upload_done")
    wait_for(lambda: proxy.rules[0].applied)
    return daemon


def test_a_set_waiting_for_its_manifest_shows_in_status_and_metrics(
        workspace: Workspace, proxy: FaultProxy) -> None:  # noqa: F811
    """No file is pending, yet step_1 is no checkpoint: status must not look all done."""
    daemon = daemon_with_a_set_waiting_for_its_manifest(workspace, proxy)
    wait_for(lambda: workspace.status().get("unsealed_sets") == ["run1/step_1"])
    assert workspace.status()["pending_files"] == 0

    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert shown.returncode == 0
    assert "1 sets waiting for their manifest" in shown.stdout and "run1/step_1" in shown.stdout
    report: dict[str, Any] = json.loads(
        workspace.cli("status", "--json", "-c", str(workspace.config_file)).stdout)
    assert report["daemon"]["unsealed_sets"] == ["run1/step_1"]
    assert scrape(metrics_url(daemon))[("spotwatch_unsealed_sets", ())] == 1


def test_a_stop_cut_short_leaves_no_flush_reported_running(
        workspace: Workspace, proxy: FaultProxy) -> None:  # noqa: F811
    """status.json outlives the daemon: its last word must not be "flushing"."""
    workspace.write_config(sync={"stop_timeout": 3})
    daemon = daemon_with_a_set_waiting_for_its_manifest(workspace, proxy)
    assert daemon.stop() == 1
    assert daemon.named("flush_incomplete")[0]["timed_out"] is True

    status = workspace.status()
    assert status["flushing"] is False
    assert status["last_flush"]["reason"] == "shutdown"
    assert status["last_flush"]["timed_out"] is True
    assert status["unsealed_sets"] == ["run1/step_1"]


def test_a_stalled_daemon_is_stalled_in_every_status_output(workspace: Workspace) -> None:
    """A daemon that stops reporting (here SIGSTOP) still holds its lock: --healthy says so
    after HEALTHY_WITHIN_SECONDS, and the text and JSON must say the same, not "ok"."""
    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("pid") == daemon.process.pid)
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: workspace.cli("status", "--healthy", "-c",
                                       str(workspace.config_file)).returncode == 1,
                 timeout=HEALTHY_WITHIN_SECONDS + 30, interval=1.0)
        shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
        assert "health:       stalled: no report since" in shown and "health:       ok" not in shown
        report = json.loads(workspace.cli("status", "--json", "-c",
                                          str(workspace.config_file)).stdout)
        assert report["daemon_pid"] == daemon.process.pid and report["healthy"] is False
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    assert daemon.stop() == 0
