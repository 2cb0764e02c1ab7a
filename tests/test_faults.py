"""Faults: S3 errors, resets, lost replies and slowness through a fault-injecting proxy; IMDS
errors, timeouts and token expiry; kill -9 mid-upload; unreadable, deleted, renamed and
full-disk files; a staged directory renamed into place."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.aws.crt_store import make_store
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import StoreError, store_error
from spotwatch.config import TransferSettings
from spotwatch.daemon.flush import OVERDUE_GRACE_SECONDS
from spotwatch.emulator import Fault, ImdsEmulator
from spotwatch.state import StateDir, StateLock
from spotwatch.sync.ledger import Ledger
from tests.conftest import REGION, Daemon, Workspace, fill, keys_in, object_bytes, wait_for
from tests.faultproxy import FaultProxy, Request

MiB = 2**20
MULTIPART = {"multipart_threshold": "5MB", "multipart_chunksize": "5MB"}


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as fault_proxy:
        yield fault_proxy


def checkpoint_data(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def of_files(request: Request) -> bool:
    """Requests for checkpoint files, not for manifests or the write probe."""
    return "/.spotwatch/" not in request.path


def in_progress_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])  # type: ignore[no-any-return]


@pytest.mark.usefixtures("transfer_client")
def test_every_file_lands_intact_through_s3_faults(workspace: Workspace, s3: Any,
                                                   proxy: FaultProxy) -> None:
    def op(*names: str) -> Any:
        return lambda r: r.operation in names and of_files(r)

    rules = [
        proxy.add("503", op("PutObject"), times=4),  # SlowDown: more than one request's retries
        proxy.add("500", op("UploadPart"), times=2),
        proxy.add("reset", op("CreateMultipartUpload")),
        proxy.add("reset-after", op("UploadPart"), times=2),  # S3 took the part, reply lost
        proxy.add("reset-after", op("PutObject")),
        proxy.add("503", op("HeadObject"), times=2),
        proxy.add("delay", op("PutObject", "UploadPart"), times=6, delay=1.0),
    ]
    workspace.write_config(transfer={**MULTIPART, "max_attempts": 3, "max_concurrency": 4})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    expected = {f"run1/shard_{i}.pt": checkpoint_data(workspace.checkpoints / f"shard_{i}.pt",
                                                      50_000 + i) for i in range(8)}
    for name in ("big_a.pt", "big_b.pt"):
        expected[f"run1/{name}"] = checkpoint_data(workspace.checkpoints / name, 12 * MiB)

    def landed() -> bool:
        keys = keys_in(s3, workspace.bucket)
        return all(key in keys and object_bytes(s3, workspace.bucket, key) == data
                   for key, data in expected.items())

    wait_for(landed, timeout=120, interval=0.5)
    daemon.wait_for_event("set_complete", count=len(expected), timeout=30)
    assert [rule.applied for rule in rules] == [rule.times for rule in rules]
    assert daemon.process.poll() is None
    files = {k for k in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in k}
    assert files == set(expected)  # nothing duplicated under another name, nothing extra
    assert in_progress_uploads(s3, workspace.bucket) == []
    assert daemon.stop() == 0


def test_imds_faults_do_not_lose_a_notice(workspace: Workspace, s3: Any,
                                          imds: ImdsEmulator) -> None:
    workspace.write_config(sync={"mode": "on-notice"},
                           imds={"poll_interval": 0.2, "timeout": 0.5})
    daemon = workspace.start_daemon()
    data = checkpoint_data(workspace.checkpoints / "step_1.pt", 10_000)
    wait_for(lambda: imds.counts().get("get", 0) >= 3)
    imds.expire_tokens()  # the daemon's token is now refused with 401
    imds.add_fault(Fault(status=500, remaining=6))
    imds.add_fault(Fault(delay=1.0, remaining=2))  # longer than the client's timeout
    imds.add_fault(Fault(status=503, remaining=3, applies_to="token"))
    imds.fire_spot_interruption()
    notice = daemon.wait_for_event("notice_detected", timeout=30)
    assert notice["kind"] == "spot-interruption"
    counts = imds.counts()
    assert counts["fault_500"] == 6 and counts["fault_503"] == 3
    assert counts.get("get_401", 0) >= 1
    daemon.wait_for_event("flush_done")
    assert object_bytes(s3, workspace.bucket, "run1/step_1.pt") == data
    assert len(daemon.named("notice_detected")) == 1  # the outage does not duplicate it
    assert daemon.named("imds_unreachable")
    assert daemon.stop() == 0


@pytest.mark.usefixtures("transfer_client")
def test_kill_9_during_multipart_then_restart(workspace: Workspace, s3: Any,
                                              proxy: FaultProxy) -> None:
    # Two parts at a time on either client (the CRT opens a connection per 0.4 Gbit/s of its
    # target): the kill comes while parts are left, not after all of them went at once.
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2,
                                     "target_throughput": 0.8})
    first = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    small = {f"run1/small_{i}.pt": checkpoint_data(workspace.checkpoints / f"small_{i}.pt",
                                                   20_000) for i in range(3)}
    first.wait_for_event("upload_done", count=3)
    proxy.add("delay", lambda r: r.operation == "UploadPart", times=1000, delay=0.7)
    big = checkpoint_data(workspace.checkpoints / "big.pt", 40 * MiB)
    wait_for(lambda: proxy.count("UploadPart") >= 2, timeout=60)
    first.process.kill()
    first.process.wait()
    assert [u["Key"] for u in in_progress_uploads(s3, workspace.bucket)] == ["run1/big.pt"]

    proxy.rules.clear()
    second = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    second.wait_for_event("upload_done")
    assert object_bytes(s3, workspace.bucket, "run1/big.pt") == big
    assert [e["key"] for e in second.named("multipart_aborted")] == ["run1/big.pt"]
    assert [e["key"] for e in second.named("upload_done")] == ["run1/big.pt"]
    assert in_progress_uploads(s3, workspace.bucket) == []
    for key, data in small.items():
        assert object_bytes(s3, workspace.bucket, key) == data
    assert second.stop() == 0


@pytest.mark.usefixtures("transfer_client")
@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_file_gone_mid_upload_is_cut_short(workspace: Workspace, s3: Any, proxy: FaultProxy,
                                           how: str) -> None:
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2})
    # Every part is held on its way to S3, so the upload is still sending when the file goes.
    held = proxy.add("delay", lambda r: r.operation == "UploadPart", times=1000, delay=1.5)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    doomed = workspace.checkpoints / "doomed.pt"
    data = checkpoint_data(doomed, 40 * MiB)  # 8 parts
    wait_for(lambda: held.applied >= 1, timeout=60)
    if how == "deleted":
        doomed.unlink()
    else:
        doomed.rename(workspace.checkpoints / "kept.pt")
    skipped = daemon.wait_for_event("upload_skipped", timeout=60)
    assert skipped["reason"] == "file deleted" and skipped["key"] == "run1/doomed.pt"
    # Cut short: the upload never completed (the classic client fails to read the next part
    # by name; the CRT, which keeps its file open, is cancelled when the file goes).
    assert proxy.count("CompleteMultipartUpload") == 0
    proxy.rules.clear()
    if how == "renamed":
        daemon.wait_for_event("upload_done")
        assert object_bytes(s3, workspace.bucket, "run1/kept.pt") == data
    kept = checkpoint_data(workspace.checkpoints / "next.pt", 30_000)
    wait_for(lambda: "run1/next.pt" in keys_in(s3, workspace.bucket), timeout=30)
    assert object_bytes(s3, workspace.bucket, "run1/next.pt") == kept
    assert "run1/doomed.pt" not in keys_in(s3, workspace.bucket)  # never a torn object
    wait_for(lambda: in_progress_uploads(s3, workspace.bucket) == [], timeout=10)
    assert daemon.stop() == 0


@pytest.mark.usefixtures("transfer_client")
def test_file_rewritten_mid_upload_is_cut_short(workspace: Workspace, s3: Any,
                                                proxy: FaultProxy) -> None:
    # A long quiet interval: the rewrite below stays open, so it does not settle (and cancel
    # the old upload that way) until it is closed.
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2},
                           sync={"settle_seconds": 0.2, "quiet_seconds": 60})
    held = proxy.add("delay", lambda r: r.operation == "UploadPart", times=1000, delay=1.5)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    path = workspace.checkpoints / "step_1.pt"
    checkpoint_data(path, 40 * MiB)  # 8 parts
    wait_for(lambda: held.applied >= 1, timeout=60)
    final = os.urandom(40 * MiB)
    with path.open("r+b") as rewrite:
        rewrite.write(final[:MiB])
        rewrite.flush()
        superseded = daemon.wait_for_event("upload_superseded", timeout=60)
        assert superseded["reason"] == "cancelled"  # not "changed" once all of it was sent
        assert proxy.count("CompleteMultipartUpload") == 0
        proxy.rules.clear()
        rewrite.write(final[MiB:])
    done = daemon.wait_for_event("upload_done", timeout=60)
    assert done["key"] == "run1/step_1.pt"
    assert object_bytes(s3, workspace.bucket, "run1/step_1.pt") == final
    wait_for(lambda: in_progress_uploads(s3, workspace.bucket) == [], timeout=10)
    assert daemon.stop() == 0


def test_unreadable_file_is_logged_and_retried(workspace: Workspace, s3: Any) -> None:
    if os.geteuid() == 0:
        # Root reads any file whatever its mode: run the daemon without that capability.
        workspace.launcher = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    locked = workspace.checkpoints / "locked.pt"
    locked_data = checkpoint_data(locked, 5_000)
    locked.chmod(0o000)
    daemon = workspace.start_daemon()
    readable = checkpoint_data(workspace.checkpoints / "ok.pt", 7_000)
    failed = daemon.wait_for_event("upload_failed", timeout=30)
    assert failed["key"] == "run1/locked.pt" and "denied" in failed["error"].lower()
    wait_for(lambda: "run1/ok.pt" in keys_in(s3, workspace.bucket))
    assert object_bytes(s3, workspace.bucket, "run1/ok.pt") == readable
    assert daemon.process.poll() is None
    locked.chmod(0o644)
    wait_for(lambda: "run1/locked.pt" in keys_in(s3, workspace.bucket), timeout=30)
    assert object_bytes(s3, workspace.bucket, "run1/locked.pt") == locked_data
    assert daemon.stop() == 0


def test_full_state_disk_keeps_the_daemon_uploading(workspace: Workspace, s3: Any,
                                                    tiny_state_dir: Path) -> None:
    workspace.write_config(state={"dir": str(tiny_state_dir)})
    daemon = workspace.start_daemon()
    filler = fill(tiny_state_dir)
    expected = {f"run1/step_{i}.pt": checkpoint_data(workspace.checkpoints / f"step_{i}.pt",
                                                     30_000) for i in range(20)}
    wait_for(lambda: expected.keys() <= keys_in(s3, workspace.bucket), timeout=60)
    daemon.wait_for_event("ledger_write_failed")
    assert daemon.process.poll() is None

    filler.unlink()
    # Once there is room again, every file gets recorded and status is written again.
    wait_for(lambda: len({e["key"] for e in daemon.named("upload_done")}) == len(expected),
             timeout=60)
    for key, data in expected.items():
        assert object_bytes(s3, workspace.bucket, key) == data
    status_written = (tiny_state_dir / "status.json").stat().st_mtime
    wait_for(lambda: (tiny_state_dir / "status.json").stat().st_mtime > status_written)
    assert daemon.stop() == 0


def puts_of(proxy: FaultProxy, key_prefix: str) -> dict[str, int]:
    """Uploads started per key under key_prefix: PutObject or CreateMultipartUpload requests."""
    counts: dict[str, int] = {}
    for request, _ in list(proxy.seen):
        bucket_and_key = request.path.lstrip("/").split("/", 1)
        key = unquote(bucket_and_key[-1])
        if (request.operation in ("PutObject", "CreateMultipartUpload")
                and key.startswith(key_prefix)):
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("staging", ["step_200.tmp", "step_200.partial"])
def test_staged_directory_renamed_into_place_is_uploaded_once(
        workspace: Workspace, s3: Any, proxy: FaultProxy, staging: str) -> None:
    # step_200.tmp/ is excluded by the default filters; step_200.partial/ is not, so its
    # files are tracked (and may upload under their staging keys) until the rename.
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 4})
    proxy.add("delay", lambda r: r.operation == "UploadPart", times=1000, delay=0.3)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    staged = workspace.checkpoints / staging
    expected = {f"run1/step_200/shard_{i}.pt": checkpoint_data(staged / f"shard_{i}.pt", 5_000)
                for i in range(300)}
    expected["run1/step_200/big.pt"] = checkpoint_data(staged / "big.pt", 24 * MiB)
    staged.rename(workspace.checkpoints / "step_200")
    wait_for(lambda: any(e["set"] == "run1/step_200" for e in daemon.named("set_complete")),
             timeout=90)
    assert daemon.stop() == 0  # the final flush uploads whatever was queued again
    assert puts_of(proxy, "run1/step_200/") == dict.fromkeys(expected, 1)
    for key, data in expected.items():
        assert object_bytes(s3, workspace.bucket, key) == data
    assert not daemon.named("upload_superseded")  # the big file was never cancelled


def manifest_files(s3: Any, bucket: str, set_name: str) -> set[str]:
    manifest = json.loads(object_bytes(s3, bucket, f"run1/.spotwatch/manifests/{set_name}.json"))
    return {entry["key"] for entry in manifest["files"]}


@pytest.mark.parametrize(("size", "finishing", "how"), [
    (200_000, "PutObject", "deleted"),
    (12 * MiB, "CompleteMultipartUpload", "deleted"),
    (12 * MiB, "CompleteMultipartUpload", "renamed"),
])
def test_file_gone_once_its_bytes_are_sent_leaves_no_object(
        workspace: Workspace, s3: Any, proxy: FaultProxy, size: int, finishing: str,
        how: str) -> None:
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    doomed = workspace.checkpoints / "step_1" / "doomed.pt"
    checkpoint_data(doomed, 1_000)  # an older version, uploaded and sealed in its set
    checkpoint_data(doomed.with_name("other.pt"), 1_000)
    daemon.wait_for_event("set_complete")
    assert manifest_files(s3, workspace.bucket, "step_1") == {"run1/step_1/doomed.pt",
                                                              "run1/step_1/other.pt"}
    # S3 has every byte of the new version when the file goes; the last request then lands.
    last = proxy.add("delay", lambda r: r.operation == finishing and "doomed" in r.path,
                     delay=1.5)
    checkpoint_data(doomed, size)
    wait_for(lambda: last.applied, timeout=30)
    if how == "deleted":
        doomed.unlink()
    else:
        doomed.rename(doomed.with_name("kept.pt"))
    skipped = daemon.wait_for_event("upload_skipped", timeout=30)
    assert skipped["key"] == "run1/step_1/doomed.pt"
    assert "run1/step_1/doomed.pt" not in keys_in(s3, workspace.bucket)
    assert skipped["object_removed"]
    # The set's manifest is written again without it.
    daemon.wait_for_event("set_complete", count=2, timeout=30)
    expected = {"run1/step_1/other.pt"} | ({"run1/step_1/kept.pt"} if how == "renamed" else set())
    wait_for(lambda: manifest_files(s3, workspace.bucket, "step_1") == expected, timeout=30)
    assert in_progress_uploads(s3, workspace.bucket) == []
    assert daemon.stop() == 0


# Long enough for the daemon to have moved on (a new upload, a stray object removed) were the
# held request abandoned; it is released as soon as that happened.
SLOW_ANSWER = 8.0


def puts_answered(proxy: FaultProxy, name: str) -> int:
    with proxy._lock:
        return sum(1 for r, what in proxy.seen
                   if r.operation == "PutObject" and r.path.endswith(name) and what == "forwarded")


@pytest.mark.usefixtures("transfer_client")
@pytest.mark.parametrize("how", ["rewritten", "deleted"])
def test_a_put_s3_answers_late_never_lands_after_what_followed_it(
        workspace: Workspace, s3: Any, proxy: FaultProxy, how: str) -> None:
    """S3 has the whole body of a PutObject and answers late, while the file is rewritten (or
    deleted): the new version (or the removal of the stray object) must come after it, on
    either client. The CRT once cancelled the request, and S3 applied it after the new one."""
    path = workspace.checkpoints / "step_1" / "model.bin"
    key = "run1/step_1/model.bin"
    held = proxy.add("delay", lambda r: r.operation == "PutObject" and r.path.endswith(key),
                     delay=SLOW_ANSWER)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    checkpoint_data(path, 200_000)
    wait_for(lambda: held.applied, timeout=30)  # its body is with the proxy, in full
    final: bytes | None = None
    if how == "rewritten":
        final = checkpoint_data(path, 200_000)  # same size, new bytes
    else:
        path.unlink()
    outcome = "upload_done" if final is not None else "upload_skipped"
    # Released once the daemon moved on without it (the new version sent, the stray object
    # removed), else answered after SLOW_ANSWER.
    wait_for(lambda: puts_answered(proxy, key) >= 1 or daemon.named(outcome), timeout=60)
    held.release()
    daemon.wait_for_event(outcome, timeout=60)
    wait_for(lambda: proxy.in_flight.get("PutObject", 0) == 0 and held.applied
             and puts_answered(proxy, key) >= (2 if final is not None else 1), timeout=60)
    if final is None:
        assert key not in keys_in(s3, workspace.bucket)
    else:
        assert object_bytes(s3, workspace.bucket, key) == final
    assert daemon.stop() == 0


def test_lost_create_multipart_reply_leaves_no_open_upload(workspace: Workspace, s3: Any,
                                                           proxy: FaultProxy) -> None:
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2})
    # S3 starts the upload but its reply is lost: botocore's retry starts a second one.
    lost = proxy.add("reset-after",
                     lambda r: r.operation == "CreateMultipartUpload" and of_files(r))
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    data = checkpoint_data(workspace.checkpoints / "big.pt", 12 * MiB)
    done = daemon.wait_for_event("upload_done", timeout=60)
    assert done["key"] == "run1/big.pt" and lost.applied == 1
    assert proxy.count("CreateMultipartUpload") == 1  # plus the lost one
    assert object_bytes(s3, workspace.bucket, "run1/big.pt") == data
    assert in_progress_uploads(s3, workspace.bucket) == []
    assert [e["key"] for e in daemon.named("multipart_aborted")] == ["run1/big.pt"]
    assert daemon.stop() == 0


def test_upload_left_open_by_a_failed_transfer_is_aborted_at_the_next_start(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:
    workspace.write_config(transfer={**MULTIPART, "max_attempts": 1},
                           sync={"stop_timeout": 2})
    proxy.add("reset-after", lambda r: r.operation == "CreateMultipartUpload" and of_files(r))
    proxy.add("500", lambda r: r.operation == "CreateMultipartUpload" and of_files(r),
              times=1000)
    first = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    data = checkpoint_data(workspace.checkpoints / "big.pt", 12 * MiB)
    first.wait_for_event("upload_failed", timeout=30)
    first.stop()
    [left] = in_progress_uploads(s3, workspace.bucket)  # S3 started it; no reply came back

    proxy.rules.clear()
    second = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    second.wait_for_event("upload_done", timeout=60)
    assert [e["upload_id"] for e in second.named("multipart_aborted")] == [left["UploadId"]]
    order = [e["event"] for e in second.events()]
    assert order.index("multipart_aborted") < order.index("startup_scan_done")
    assert object_bytes(s3, workspace.bucket, "run1/big.pt") == data
    assert in_progress_uploads(s3, workspace.bucket) == []
    assert second.stop() == 0


def stop_and_time(daemon: Daemon, timeout: float = 120) -> tuple[int, float]:
    """SIGTERM the daemon: (exit code, seconds until it exited)."""
    started = time.monotonic()
    code = daemon.stop(timeout=timeout)
    return code, time.monotonic() - started


def test_stop_is_bounded_while_s3_holds_uploads(workspace: Workspace, s3: Any,
                                                proxy: FaultProxy, transfer_client: str) -> None:
    stop_timeout = 3
    workspace.write_config(sync={"stop_timeout": stop_timeout},
                           transfer={**MULTIPART, "max_concurrency": 2})
    held = proxy.add("delay", lambda r: r.operation in ("PutObject", "UploadPart")
                     and of_files(r), times=1000, delay=30)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    checkpoint_data(workspace.checkpoints / "small.pt", 10_000)
    big = checkpoint_data(workspace.checkpoints / "big.pt", 12 * MiB)
    wait_for(lambda: held.applied >= 3, timeout=60)  # the PUT and both parts are held

    code, seconds = stop_and_time(daemon)
    assert code == 1
    assert seconds < stop_timeout + 3  # not the 30 s S3 holds each request
    incomplete = daemon.named("flush_incomplete")[0]
    assert incomplete["pending_files"] == 2 and incomplete["timed_out"] is True

    # The abandoned multipart upload is still noted: the next start aborts it. (The CRT may
    # have aborted its own upload when it was cancelled, leaving nothing to abort.)
    proxy.rules.clear()
    second = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    aborted = [e["key"] for e in second.named("multipart_aborted")]
    assert aborted == ["run1/big.pt"] or (transfer_client == "crt" and aborted == [])
    second.wait_for_event("upload_done", count=2)
    assert object_bytes(s3, workspace.bucket, "run1/big.pt") == big
    assert in_progress_uploads(s3, workspace.bucket) == []
    assert second.stop() == 0


def test_a_complete_final_flush_exits_0(workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    data = checkpoint_data(workspace.checkpoints / "step_1.pt", 20_000)
    wait_for(lambda: (read_status(workspace) or {}).get("pending_files") == 1)
    assert daemon.stop() == 0
    assert object_bytes(s3, workspace.bucket, "run1/step_1.pt") == data
    assert daemon.named("flush_done")[0]["failed"] == 0
    assert not daemon.named("flush_incomplete") and daemon.named("daemon_stopped")


def test_a_set_left_unsealed_by_a_stop_is_named_and_sealed_by_the_next_start(
        workspace: Workspace, proxy: FaultProxy, s3: Any) -> None:
    """Every file of the set is in S3 but its manifest is not: the stop says which set is no
    checkpoint yet, rather than an exit 1 with nothing left named; the next start seals it
    (nothing of it changed, so no upload would have)."""
    workspace.write_config(sync={"stop_timeout": 3})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    proxy.add("delay", lambda r: r.method == "PUT" and "/.spotwatch/manifests/" in r.path,
              times=100, delay=600)
    (workspace.checkpoints / "step_1").mkdir()
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    daemon.wait_for_event("upload_done")
    wait_for(lambda: proxy.rules[0].applied)  # the manifest write has started and hangs
    assert daemon.stop() == 1
    [incomplete] = daemon.named("flush_incomplete")
    assert incomplete["timed_out"] and incomplete["unsealed_sets"] == ["run1/step_1"]

    # Started again, the daemon finds nothing to upload but seals the set it left unsealed.
    again = workspace.start_daemon()
    assert again.wait_for_event("set_complete")["set"] == "run1/step_1"
    assert again.named("upload_done") == []
    assert "run1/.spotwatch/manifests/step_1.json" in keys_in(s3, workspace.bucket)
    assert again.stop() == 0


def test_a_hangup_stops_the_daemon_with_a_final_flush(workspace: Workspace, s3: Any) -> None:
    """The terminal or ssh session `run` was started from going away flushes, as a SIGTERM."""
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    data = checkpoint_data(workspace.checkpoints / "step_1.pt", 20_000)
    wait_for(lambda: (read_status(workspace) or {}).get("pending_files") == 1)
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.process.wait(timeout=60) == 0
    assert object_bytes(s3, workspace.bucket, "run1/step_1.pt") == data
    assert daemon.named("flush_done")[0]["failed"] == 0 and daemon.named("daemon_stopped")


def read_status(workspace: Workspace) -> dict[str, Any] | None:
    try:
        return json.loads((workspace.root / "state" / "status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def test_a_failing_file_counts_as_pending_backs_off_and_does_not_hold_up_the_stop(
        workspace: Workspace, s3: Any) -> None:
    if os.geteuid() == 0:
        workspace.launcher = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    stop_timeout = 60
    workspace.write_config(sync={"stop_timeout": stop_timeout})
    locked = workspace.checkpoints / "locked.pt"
    checkpoint_data(locked, 5_000)
    locked.chmod(0o000)
    daemon = workspace.start_daemon()
    readable = checkpoint_data(workspace.checkpoints / "ok.pt", 7_000)
    first, second = (daemon.wait_for_event("upload_failed", count=n, timeout=30)
                     for n in (1, 2))
    assert first["key"] == second["key"] == "run1/locked.pt"
    assert second["retry_in"] > first["retry_in"]  # backing off, not every 5 s
    assert first["failing"] is True  # permission denied: retrying alone will not fix it
    wait_for(lambda: "run1/ok.pt" in keys_in(s3, workspace.bucket))

    def reported() -> dict[str, Any] | None:
        status = read_status(workspace)
        done = status is not None and status["uploaded_files"] >= 1
        return status if done and status["retrying_files"] + status["uploading"] == 1 else None

    status = wait_for(reported)
    assert status["pending_files"] == 1 and status["pending_bytes"] == 5_000
    shown = workspace.cli("status", "-c", str(workspace.config_file), "--json")
    assert json.loads(shown.stdout)["daemon"]["pending_files"] == 1

    code, seconds = stop_and_time(daemon)
    assert code == 1
    assert seconds < stop_timeout  # the failing file does not make the stop wait it out
    incomplete = daemon.named("flush_incomplete")[0]
    assert incomplete["failed_files"] == [str(locked)] and incomplete["pending_files"] == 1
    assert incomplete["timed_out"] is False
    assert object_bytes(s3, workspace.bucket, "run1/ok.pt") == readable


def test_flush_reports_a_failing_file_without_waiting_for_it(workspace: Workspace,
                                                             s3: Any) -> None:
    if os.geteuid() == 0:
        workspace.launcher = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    locked = workspace.checkpoints / "locked.pt"
    checkpoint_data(locked, 5_000)
    locked.chmod(0o000)
    readable = checkpoint_data(workspace.checkpoints / "ok.pt", 7_000)
    result = subprocess.run(
        [*workspace.launcher, sys.executable, "-m", "spotwatch.cli", "flush", "-c",
         str(workspace.config_file)], cwd=workspace.root, env=workspace.env(),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    done = next(e for e in events if e["event"] == "flush_done")
    assert done["failed_files"] == [str(locked)]
    # Given up after its first, permanent-looking failure: one attempt, no rounds of retries.
    assert len([e for e in events if e["event"] == "upload_failed"]) == 1
    assert object_bytes(s3, workspace.bucket, "run1/ok.pt") == readable


def test_a_one_shot_flush_that_s3_refuses_a_file_says_so_on_stderr(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:
    """Exit 1 always comes with one line saying why, as it does when the daemon flushed; the
    other file still goes."""
    proxy.add("403", lambda r: r.method == "PUT" and r.path.endswith("/run1/denied.pt"),
              times=10**6)
    denied = workspace.checkpoints / "denied.pt"
    checkpoint_data(denied, 3_000)
    kept = checkpoint_data(workspace.checkpoints / "kept.pt", 4_000)
    result = workspace.cli("flush", "-c", str(workspace.config_file), AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 1
    # With what S3 said: the why, not only the log's JSON has it.
    assert result.stderr.strip().splitlines()[-1] == (
        f"spotwatch: error: the flush left 1 failing files: {denied} (the first failed with: "
        "An error occurred (AccessDenied) when calling the PutObject operation: Access Denied)")
    assert object_bytes(s3, workspace.bucket, "run1/kept.pt") == kept


def test_a_one_shot_flush_with_s3_down_ends_near_stop_timeout_checks_included(
        workspace: Workspace) -> None:
    """S3 refusing every connection: the checks before the flush (region, public access) take
    their time out of sync.stop_timeout, not on top of it. The flush still tries each file
    once more, then ends: within the stop_timeout and the grace a flush gives uploads in
    flight (once over twice the stop_timeout, checks and flush each taking all of it)."""
    stop_timeout = 8
    workspace.write_config(sync={"stop_timeout": stop_timeout})
    pending = workspace.checkpoints / "a.pt"
    checkpoint_data(pending, 1_000)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        started = time.monotonic()
        result = workspace.cli("flush", "-c", str(workspace.config_file), timeout=120,
                               AWS_ENDPOINT_URL=refused)
        seconds = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("spotwatch: error: the flush ")
    assert str(pending) in result.stderr or "not yet durable" in result.stderr
    assert seconds < stop_timeout + OVERDUE_GRACE_SECONDS, result.stderr


def spawn_cli(workspace: Workspace, proxy: FaultProxy,
              command: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`spotwatch <command>` through the proxy, not waited for; its output goes to a file."""
    log_path = workspace.root / f"{command}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "spotwatch.cli", command, "-c", str(workspace.config_file)],
            cwd=workspace.root, env=workspace.env(AWS_ENDPOINT_URL=proxy.url),
            stdout=log_file, stderr=subprocess.STDOUT)
    return process, log_path


@pytest.mark.parametrize(("status", "code", "permanent"), [
    (400, "RequestTimeout", False), (400, "IncompleteBody", False), (400, "ExpiredToken", False),
    (403, "RequestTimeTooSkewed", False), (503, "SlowDown", False), (429, "Anything", False),
    (403, "AccessDenied", True), (400, "KMS.NotFoundException", True),
    (400, "InvalidArgument", True), (404, "NoSuchBucket", True),
])
def test_only_a_refusal_is_permanent(status: int, code: str, permanent: bool) -> None:
    error = ClientError({"Error": {"Code": code, "Message": "m"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    assert store_error(error).permanent is permanent


@given(status=st.integers(400, 599), code=st.text(max_size=30))
def test_a_server_error_is_never_permanent_and_a_timeout_code_never_is(status: int,
                                                                       code: str) -> None:
    def permanent(error_code: str) -> bool:
        return store_error(ClientError({"Error": {"Code": error_code},
                                        "ResponseMetadata": {"HTTPStatusCode": status}},
                                       "PutObject")).permanent

    if status >= 500:
        assert not permanent(code)
    assert not permanent("RequestTimeout") and not permanent("SlowDown")


def test_a_flush_retries_a_file_s3_timed_out_instead_of_calling_it_failing(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:
    """S3 answers a slow upload with 400 RequestTimeout: a timeout, not a refusal. The flush
    must try the file again, as after any transient failure, not give it up at once."""
    # The classic client: the CRT reports S3's timeout as its own error, transient already.
    workspace.write_config(transfer={"max_attempts": 1, "client": "classic"})
    timing_out = proxy.add("400", lambda r: r.method == "PUT" and r.path.endswith("/slow.pt"),
                           times=10**6)
    data = checkpoint_data(workspace.checkpoints / "slow.pt", 3_000)
    flush, log_path = spawn_cli(workspace, proxy, "flush")
    try:
        wait_for(lambda: '"upload_failed"' in log_path.read_text())
        timing_out.times = 0  # S3 answers in time again
        assert flush.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if flush.poll() is None:
            flush.kill()
    assert object_bytes(s3, workspace.bucket, "run1/slow.pt") == data


@pytest.mark.parametrize(("client", "attempts"), [
    ("classic", 3), ("crt", 3), ("classic", 1),
    # One attempt: the CRT cannot be kept from retrying (it takes 0 retries as its default
    # of 5, so it made 6), and auto goes classic.
    ("auto", 1)])
def test_a_request_gets_as_many_attempts_as_transfer_max_attempts_says(
        tmp_path: Path, bucket: str, proxy: FaultProxy, client: str, attempts: int) -> None:
    """`transfer.max_attempts` is attempts, retries included, on either transfer client (botocore
    reads its own max_attempts as retries only)."""
    settings = TransferSettings(max_attempts=attempts, client=client)  # type: ignore[arg-type]
    failing = proxy.add("500", lambda r: r.method == "PUT", times=10**6)
    path = tmp_path / "f.pt"
    path.write_bytes(b"x" * 1000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # auto as in the one spotwatch process on the host (tests elsewhere may hold the lock)
        patch.setattr("spotwatch.aws.crt_store._holds_crt_process_lock", lambda: True)
        store = make_store(make_s3_client(REGION, settings), bucket, settings)
    try:
        with pytest.raises(StoreError):
            store.upload_file(path, "run1/f.pt", 1000).future.result(timeout=60)
        assert failing.applied == attempts
        with pytest.raises(StoreError):
            store.put_bytes("run1/m.json", b"{}", "application/json").result(timeout=60)
        assert failing.applied == 2 * attempts
    finally:
        store.close()


def test_a_flush_asked_for_while_the_daemon_starts_is_made_and_does_not_kill_it(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:
    """S3 is slow while the daemon starts (its cleanup of open uploads waits on a listing):
    the daemon holds the state lock already, so `spotwatch flush` signals it. The daemon
    must take that as a request, not die of it (SIGUSR1's default action)."""
    state = StateDir(workspace.root / "state")
    state.ensure()
    ledger = Ledger(state.ledger)  # a multipart upload an earlier run left open, to clean up
    ledger.multipart_started(workspace.bucket, "run1/orphan.pt")
    ledger.close()
    proxy.add("delay", lambda r: r.query.get("prefix") == ["run1/orphan.pt"], delay=4)
    data = checkpoint_data(workspace.checkpoints / "model.pt", 2_000)
    process, log_path = spawn_cli(workspace, proxy, "run")
    daemon = Daemon(process, log_path)
    try:
        wait_for(lambda: StateLock(state).holder() == process.pid)
        assert not daemon.named("daemon_started")  # still starting
        flushed = workspace.cli("flush", "-c", str(workspace.config_file))
        assert flushed.returncode == 0, flushed.stderr
        assert process.poll() is None
        assert object_bytes(s3, workspace.bucket, "run1/model.pt") == data
        assert daemon.stop() == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_flush_through_the_daemon_reports_a_failing_file(workspace: Workspace, s3: Any) -> None:
    if os.geteuid() == 0:
        workspace.launcher = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    workspace.write_config(sync={"mode": "on-notice"})
    locked = workspace.checkpoints / "locked.pt"
    checkpoint_data(locked, 5_000)
    locked.chmod(0o000)
    daemon = workspace.start_daemon()
    readable = checkpoint_data(workspace.checkpoints / "ok.pt", 7_000)
    wait_for(lambda: (read_status(workspace) or {}).get("pending_files") == 2)
    result = workspace.cli("flush", "-c", str(workspace.config_file), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"failing files: {locked} (the first failed with: [Errno 13] Permission denied); 1 sets "
        "left without a manifest, a file they need not in S3: run1/locked.pt")
    assert object_bytes(s3, workspace.bucket, "run1/ok.pt") == readable
    assert daemon.stop() == 1


@pytest.mark.parametrize("daemon_running", [True, False], ids=["daemon", "one-shot"])
def test_a_flush_ends_at_its_time_limit_while_s3_holds_its_uploads(
        workspace: Workspace, s3: Any, proxy: FaultProxy, transfer_client: str,
        daemon_running: bool) -> None:
    """S3 takes the uploads and never answers: no upload ends, so no retry comes either. A
    flush still ends at sync.stop_timeout from its start (it has no notice's deadline), exits
    1 and says how many files are not durable yet; the uploads go on after it."""
    stop_timeout = 3
    workspace.write_config(sync={"stop_timeout": stop_timeout})
    held = proxy.add("delay", lambda r: r.operation == "PutObject" and of_files(r),
                     times=1000, delay=120)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url) if daemon_running else None
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    if daemon is not None:
        wait_for(lambda: held.applied >= 1, timeout=60)
    flush, log_path = spawn_cli(workspace, proxy, "flush")
    try:
        # Within the limit, plus a start-up and the report's polling, and well before the
        # 120 s S3 holds each upload.
        assert flush.wait(timeout=60) == 1, log_path.read_text()
    finally:
        if flush.poll() is None:
            flush.kill()
    said = log_path.read_text()
    assert "reached its time limit" in said and "1 files not yet durable" in said, said
    assert "Traceback" not in said
    if daemon is not None:
        record = workspace.status()["last_flush"]
        assert record["timed_out"] is True and record["pending_files"] == 1
        assert workspace.status()["pending_files"] == 1  # still uploading, still counted
        assert daemon.stop() == 1  # its own final flush cannot make it durable either
