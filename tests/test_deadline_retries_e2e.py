"""The daemon, S3 unreachable long enough that a checkpoint's files count as failing, then a
stop or a spot notice, and S3 back a moment later: the flush retries them within seconds and
waits for them, so they reach S3 before the daemon exits or the notice's deadline passes."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator
from spotwatch.sync.retry import FAILING_AFTER

from .conftest import Daemon, Workspace, object_bytes, wait_for
from .faultproxy import FaultProxy
from .test_daemon_e2e import save_checkpoint

KEY = "run1/step_1/model.pt"


@dataclass
class Outage:
    """S3 behind a proxy that resets every connection while `down` is set."""

    proxy: FaultProxy
    down: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def outage(workspace: Workspace) -> Iterator[Outage]:
    """Few SDK attempts per upload: a failed upload ends in a moment."""
    workspace.write_config(transfer={"max_attempts": 2, "client": "classic"},
                           sync={"stop_timeout": 60})
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        s3 = Outage(proxy)
        proxy.add("reset", lambda request: s3.down.is_set(), times=10**9)
        yield s3


def failing_checkpoint(workspace: Workspace, outage: Outage) -> tuple[Daemon, bytes]:
    """A daemon whose checkpoint file failed often enough to count as failing, S3 still down."""
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=outage.proxy.url)
    outage.down.set()
    data = save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 50_000)
    failed = daemon.wait_for_event("upload_failed", count=FAILING_AFTER, timeout=90)
    assert failed["failing"] is True and failed["key"] == KEY
    return daemon, data


def failed_after(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The upload_failed lines logged after the first `event` line."""
    events = [e["event"] for e in daemon.events()]
    if event not in events:
        return []
    return [e for e in daemon.events()[events.index(event):] if e["event"] == "upload_failed"]


def test_a_stop_uploads_the_files_s3_failed_once_it_is_back(
        workspace: Workspace, s3: Any, outage: Outage) -> None:
    daemon, data = failing_checkpoint(workspace, outage)
    daemon.process.send_signal(signal.SIGTERM)
    wait_for(lambda: failed_after(daemon, "shutdown_started"), timeout=30)  # the flush's try
    outage.down.clear()  # S3 back, with nearly all of sync.stop_timeout left
    assert daemon.process.wait(timeout=90) == 0, daemon.log_path.read_text()
    assert object_bytes(s3, workspace.bucket, KEY) == data
    [done] = daemon.named("flush_done")
    assert done["reason"] == "shutdown" and done["failed"] == 0 and done["files"] == 1
    assert not daemon.named("flush_incomplete") and daemon.named("daemon_stopped")
    # Retried within seconds, not after the backoff the earlier failures had reached.
    assert all(e["retry_in"] <= 2 for e in failed_after(daemon, "shutdown_started"))


def test_a_notice_uploads_the_files_s3_failed_before_its_deadline(
        workspace: Workspace, s3: Any, imds: ImdsEmulator, outage: Outage) -> None:
    daemon, data = failing_checkpoint(workspace, outage)
    imds.fire_spot_interruption(in_seconds=60)
    wait_for(lambda: failed_after(daemon, "notice_detected"), timeout=30)  # the flush's try
    outage.down.clear()
    done = daemon.wait_for_event("flush_done", timeout=90)
    assert done["reason"] == "spot-interruption", done
    assert done["failed"] == 0 and done["files"] == 1, done
    assert done["deadline_margin_seconds"] > 0  # it ended before the deadline, all uploaded
    assert object_bytes(s3, workspace.bucket, KEY) == data
    assert daemon.stop() == 0
