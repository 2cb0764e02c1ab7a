"""A notice's flush puts the newest checkpoint first, also ahead of a backlog of older sets
already handed to the transfer client (end to end: daemon, IMDS emulator, moto)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spotwatch.emulator import ImdsEmulator

from .conftest import Workspace, object_bytes, wait_for
from .faultproxy import FaultProxy
from .test_daemon_e2e import save_checkpoint

# One request at a time, so two uploads in flight (twice the concurrency): one sending, held
# by the bandwidth cap, and one queued behind it in the transfer client.
CONCURRENCY = 1


# At the cap's 64 KiB/s the upload sending holds for a minute: the notice comes before it ends.
@pytest.mark.parametrize("size", [4 * 2**20, 11 * 2**20], ids=["single-put", "multipart"])
def test_the_newest_set_goes_ahead_of_older_uploads_that_have_not_begun(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, size: int) -> None:
    older = 6
    long_ago = time.time() - 600
    for step in range(1, older + 1):
        path = workspace.checkpoints / f"step_{step}" / "model.pt"
        save_checkpoint(path, size)
        os.utime(path, (long_ago + step, long_ago + step))  # found by the startup scan
    # The cap makes the backlog: continuous uploads crawl until the notice lifts it.
    workspace.write_config(sync={"continuous_bandwidth": "64KB"},
                           transfer={"max_concurrency": CONCURRENCY, "multipart_threshold": "5MB",
                                     "multipart_chunksize": "5MB"})
    daemon = workspace.start_daemon()
    # The files the start found are judged against the sets sealed in S3 before they are
    # handed over (sync.sets.sealed): once S3's are listed, that takes no request more.
    daemon.wait_for_event("sealed_sets_listed")
    wait_for(lambda: workspace.status().get("uploading") == 2 * CONCURRENCY)
    newest = save_checkpoint(workspace.checkpoints / "step_999" / "model.pt", size)
    wait_for(lambda: workspace.status().get("pending_files") == older + 1)
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("flush_done", timeout=60)
    sealed = [event["set"] for event in daemon.named("set_complete")]
    uploaded = [event["key"] for event in daemon.named("upload_done")]
    if size < 5 * 2**20:
        # One PutObject at a time, in the order handed over: only the upload already
        # sending when the notice came finishes before the newest set. (s3transfer may
        # interleave the parts of uploads handed over together, so not checked there.)
        assert uploaded.index("run1/step_999/model.pt") == CONCURRENCY, uploaded
        # Manifests go newest set first too, but two may be written at once: step_5's,
        # uploaded just after, may be seen done first; no older set's is.
        assert sealed.index("run1/step_999") <= CONCURRENCY + 1, sealed
    taken_back = daemon.named("uploads_taken_back")[0]["keys"]
    if size < 5 * 2**20:
        # step_6 was sending, step_5 queued behind it in the transfer client: taken back.
        assert taken_back == ["run1/step_5/model.pt"]
    else:
        # s3transfer prepares the two multipart uploads on threads of its own, so either
        # may be the one sending: the other, not begun, is taken back.
        assert len(taken_back) == 1, taken_back
        assert taken_back[0] in ("run1/step_5/model.pt", "run1/step_6/model.pt")
    assert object_bytes(s3, workspace.bucket, "run1/step_999/model.pt") == newest
    assert len(sealed) == older + 1  # the one taken back goes up too
    assert not daemon.named("upload_failed")
    assert not s3.list_multipart_uploads(Bucket=workspace.bucket).get("Uploads")
    assert daemon.stop() == 0


@pytest.fixture
def faults(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as running:
        yield running


def test_the_newest_sets_manifest_does_not_wait_for_older_files(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, faults: FaultProxy) -> None:
    """Manifests are small writes of their own: the newest set is sealed while older sets'
    files still upload, not queued behind them."""
    long_ago = time.time() - 600
    for step in (1, 2):
        path = workspace.checkpoints / f"step_{step}" / "model.pt"
        save_checkpoint(path, 100_000)
        os.utime(path, (long_ago + step, long_ago + step))
    save_checkpoint(workspace.checkpoints / "step_3" / "model.pt", 100_000)
    # S3 holds the older sets' files: each takes seconds, as a large shard would.
    faults.add("delay", lambda r: r.operation == "PutObject" and "/run1/step_3/" not in r.path
               and "/.spotwatch/" not in r.path, times=2, delay=5.0)
    workspace.write_config(sync={"mode": "on-notice"},
                           transfer={"max_concurrency": CONCURRENCY, "client": "classic"})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=faults.url)
    wait_for(lambda: workspace.status().get("pending_files") == 3)
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("flush_done", timeout=60)
    order = [(e["event"], e.get("set") or e.get("key")) for e in daemon.events()
             if e.get("event") in ("upload_done", "set_complete")]
    sealed_at = order.index(("set_complete", "run1/step_3"))
    assert order.index(("upload_done", "run1/step_2/model.pt")) > sealed_at, order
    assert daemon.stop() == 0
