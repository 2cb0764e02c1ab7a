"""Pruning runs off the daemon loop: a slow S3 listing neither stalls keep-alives and status
nor delays a notice's flush, and a notice stops the prune."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator

from .conftest import Daemon, Workspace, keys_in, wait_for
from .faultproxy import FaultProxy, Request
from .test_daemon_e2e import flush_summary
from .test_prune import MANIFESTS, save_set
from .test_systemd import notify_socket  # noqa: F401  (a fixture)

PRUNE_END = ("prune_cancelled", "prune_failed", "object_deleted")


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as fault_proxy:
        yield fault_proxy


def lists_manifests(request: Request) -> bool:
    return request.method == "GET" and any(
        "/.spotwatch/manifests/" in f"/{prefix}" for prefix in request.query.get("prefix", []))


def reads_manifest(request: Request) -> bool:
    return request.method == "GET" and "/.spotwatch/manifests/" in request.path


def prune_ended(daemon: Daemon) -> bool:
    return any(event.get("event") in PRUNE_END for event in daemon.events())


def keepalives(sock: socket.socket, wanted: int) -> bool:
    received = 0
    while received < wanted:
        try:
            received += sock.recv(4096).decode() == "WATCHDOG=1"
        except TimeoutError:
            return False
    return True


def status_time(workspace: Workspace) -> float:
    try:
        status = json.loads((workspace.root / "state" / "status.json").read_text())
    except (OSError, ValueError):
        return 0.0
    return float(status["updated_at"])


def test_a_notice_mid_prune_flushes_at_once(workspace: Workspace, imds: ImdsEmulator, s3: Any,
                                            proxy: FaultProxy,
                                            notify_socket: socket.socket,  # noqa: F811
                                            ) -> None:
    workspace.write_config(sync={"keep_sets": 1})
    for age, name in ((300, "step_1"), (200, "step_2"), (100, "step_3")):
        save_set(workspace, name, age)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))  # straight to S3, no proxy
    manifests = {k for k in keys_in(s3, workspace.bucket) if k.startswith(MANIFESTS)}
    # Retention lists the manifests and reads each: S3 answers those slowly.
    listing = proxy.add("delay", lists_manifests, times=100, delay=3.0)
    proxy.add("delay", reads_manifest, times=100, delay=1.5)

    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url,
                                    NOTIFY_SOCKET=notify_socket.getsockname(),
                                    WATCHDOG_USEC="200000")
    wait_for(lambda: listing.applied >= 1)  # the prune is waiting for S3 now
    before = status_time(workspace)
    wait_for(lambda: keepalives(notify_socket, 3) and status_time(workspace) > before)
    assert not prune_ended(daemon)  # the loop kept going while the prune waited
    notify_socket.close()  # unread, its queue would fill and block the daemon's next send

    imds.fire_spot_interruption()
    daemon.wait_for_event("prune_cancelled")
    names = [event.get("event") for event in daemon.events()]
    assert names.index("flush_started") < names.index("prune_cancelled")
    assert "object_deleted" not in names
    assert manifests <= keys_in(s3, workspace.bucket)
    assert daemon.stop() == 0
