"""What `spotwatch status`, status.json and the metrics say, compared with what is true: a set
whose manifest is not written yet, a final flush the stop timeout cut short, a stalled daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.bucket import NamedBucket
from spotwatch.commands.status import HEALTHY_WITHIN_SECONDS, gather_status, render_status
from spotwatch.config import load_config
from spotwatch.emulator import ImdsEmulator
from spotwatch.state import StateDir, StateLock
from tests.conftest import Daemon, Workspace, object_bytes, wait_for
from tests.faultproxy import FaultProxy
from tests.test_faults import (  # noqa: F401  (the proxy fixture)
    MULTIPART,
    MiB,
    checkpoint_data,
    of_files,
    proxy,
)
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
    # A report written since the upload ended: no file pending, the set still waiting.
    wait_for(lambda: (lambda report: report.get("pending_files") == 0
                      and report.get("unsealed_sets") == ["run1/step_1"])(workspace.status()))

    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert shown.returncode == 0
    assert "1 sets waiting for their manifest" in shown.stdout and "run1/step_1" in shown.stdout
    report: dict[str, Any] = json.loads(
        workspace.cli("status", "--json", "-c", str(workspace.config_file)).stdout)
    assert report["daemon"]["unsealed_sets"] == ["run1/step_1"]
    assert scrape(metrics_url(daemon))[("spotwatch_unsealed_sets", ())] == 1


def test_a_set_whose_prefix_s3_refuses_is_reported_incomplete_while_others_go_on(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:  # noqa: F811
    """A bucket policy denies writes under step_2/ only: not one file of that set gets
    through, yet status, status.json and the metrics must name it, as for a set with one file
    failing among others, while the other sets keep uploading."""
    proxy.add("403", lambda r: r.method in ("PUT", "POST") and "/step_2/" in r.path,
              times=10**6)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    checkpoint_data(workspace.checkpoints / "step_2" / "model.pt", 4_000)
    daemon.wait_for_event("upload_failed")
    good = checkpoint_data(workspace.checkpoints / "step_3" / "model.pt", 5_000)
    wait_for(lambda: workspace.status().get("incomplete_sets") == ["run1/step_2"])
    daemon.wait_for_event("set_complete")  # step_2 may be reported before step_3 is up
    assert object_bytes(s3, workspace.bucket, "run1/step_3/model.pt") == good
    incomplete = daemon.wait_for_event("set_incomplete")
    assert incomplete["set"] == "run1/step_2" and incomplete["missing"] == ["step_2/model.pt"]

    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert "1 sets without a manifest" in shown.stdout and "run1/step_2" in shown.stdout
    # The file failing is named with why, not only counted: no need to go to the log.
    refused = workspace.checkpoints / "step_2" / "model.pt"
    assert (f"1 failing); 0 still being written; failing: {refused} (the first: "
            in shown.stdout.replace("\n", " ")), shown.stdout
    assert "AccessDenied" in shown.stdout
    report = workspace.status()
    assert report["failing_named"] == [str(refused)] and "AccessDenied" in report[
        "failing_because"]
    assert scrape(metrics_url(daemon))[("spotwatch_incomplete_sets", ())] == 1
    assert daemon.stop() == 1


def test_a_flush_asked_for_after_a_spot_notice_does_not_hide_the_notice(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """A trainer's exit script runs `spotwatch flush` after the spot notice: status must
    still show the notice and its deadline, the instance is still being reclaimed."""
    daemon = workspace.start_daemon()
    imds.fire_spot_interruption(in_seconds=120)
    daemon.wait_for_event("flush_done")
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0
    wait_for(lambda: (workspace.status().get("last_flush") or {}).get("reason")
             == "manual-flush")
    notice = workspace.status()["last_notice"]
    assert notice["kind"] == "spot-interruption" and notice["deadline"] is not None
    shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
    assert "last notice:  spot-interruption at" in shown


def test_a_set_none_of_whose_uploads_has_ended_shows_as_waiting_for_its_manifest(
        workspace: Workspace, proxy: FaultProxy) -> None:  # noqa: F811
    """The sealer hears of a set from its first upload's result: before it, status, the metric
    and a stop's flush_incomplete must name the set all the same."""
    workspace.write_config(sync={"stop_timeout": 3})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    proxy.add("delay", lambda r: r.method == "PUT" and "/run1/step_2/" in r.path,
              times=100, delay=600)
    checkpoint_data(workspace.checkpoints / "step_2" / "model.pt", 10_000)
    wait_for(lambda: workspace.status().get("uploading") == 1)
    assert workspace.status()["unsealed_sets"] == ["run1/step_2"]
    assert scrape(metrics_url(daemon))[("spotwatch_unsealed_sets", ())] == 1
    assert daemon.stop() == 1
    assert daemon.named("flush_incomplete")[0]["unsealed_sets"] == ["run1/step_2"]
    # Once it is gone, status still says what it left.
    shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
    assert "daemon:       not running" in shown
    assert "left behind:  1 files not in S3 when it last reported" in shown, shown
    assert "1 sets without their manifest: run1/step_2" in shown
    report = json.loads(workspace.cli("status", "--json", "-c",
                                      str(workspace.config_file)).stdout)
    assert report["left_by_last_run"]["pending_files"] == 1


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


def a_daemons_report(pid: int) -> dict[str, Any]:
    """status.json as a running daemon writes it."""
    return {"pid": pid, "role": "run", "updated_at": time.time(), "pending_files": 2,
            "pending_bytes": 10, "uploading": 1, "unsettled_files": 0, "retrying_files": 1,
            "failing_files": 0, "degraded": [], "metrics_url": "http://127.0.0.1:9464",
            "last_notice": {"kind": "spot", "detected_at": "2026-01-01T00:00:00+00:00",
                            "deadline": "2026-01-01T00:02:00+00:00"},
            "last_flush": {"files": 1, "bytes": 5, "seconds": 0.5, "reason": "spot"},
            "incomplete_sets": ["run1/step_1"], "unsealed_sets": []}


@contextmanager
def holding_the_state_lock(state: Path) -> Iterator[int]:
    """This process holds the state directory, as a daemon of another version would."""
    state.mkdir(parents=True, exist_ok=True)
    lock = StateLock(StateDir(state))
    lock.acquire()
    try:
        yield os.getpid()
    finally:
        lock.release()


def test_a_status_json_of_another_version_is_said_to_be_unreadable(
        workspace: Workspace) -> None:
    """A daemon of another spotwatch version holds the state directory and writes a
    status.json whose fields this version does not know: no traceback, not healthy."""
    config = str(workspace.config_file)
    state = workspace.root / "state"
    with holding_the_state_lock(state) as pid:
        newer = {"pid": pid, "updated_at": time.time(), "format": 2,
                 "pending": {"files": 1, "bytes": 10}}
        (state / "status.json").write_text(json.dumps(newer))
        shown = workspace.cli("status", "-c", config)
        assert shown.returncode == 0 and shown.stderr == ""
        assert (f"daemon:       running (pid {pid}), but its status.json is not one this "
                f"version reads") in shown.stdout
        report = json.loads(workspace.cli("status", "--json", "-c", config).stdout)
        assert report["daemon_report_unreadable"] is True and report["healthy"] is False
        assert workspace.cli("status", "--healthy", "-c", config).returncode == 1


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(a_daemons_report(0))), value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=6))
def test_status_reads_any_status_json_without_a_traceback(tmp_path: Path, field: str,
                                                          value: Any) -> None:
    state = tmp_path / "state"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"watch": [{"path": str(tmp_path / "ckpt")}],
                                       "state": {"dir": str(state)}}))
    config = load_config(config_file)
    with holding_the_state_lock(state) as pid:
        damaged = {**a_daemons_report(pid), field: value} if field != "pid" else None
        (state / "status.json").write_text(json.dumps(damaged or a_daemons_report(pid)))
        report = gather_status(config, NamedBucket("ckpt", "--bucket"))
        render_status(report)
        json.dumps(report)
        assert not (report["healthy"] and report["daemon_report_unreadable"])


def test_a_one_shot_flush_shows_its_pending_work(tmp_path: Path) -> None:
    """Old: the text said only that a one-shot flush holds the state directory, while its
    status.json counted the files it had still to upload."""
    state = tmp_path / "state"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"watch": [{"path": str(tmp_path / "ckpt")}],
                                       "state": {"dir": str(state)}}))
    with holding_the_state_lock(state) as pid:
        flushing = {**a_daemons_report(pid), "role": "flush", "pending_files": 75,
                    "pending_bytes": 3 * 1024 * 1024}
        (state / "status.json").write_text(json.dumps(flushing))
        report = gather_status(load_config(config_file), NamedBucket("ckpt", "--bucket"))
    text = render_status(report)
    assert f"a one-shot flush, pid {pid}" in text and report["healthy"] is False
    assert ("pending:      75 files, 3.0 MiB (1 uploading, 1 waiting to retry, of which 0 "
            "failing); 0 still being written") in text.splitlines()
    assert report["flush"]["pending_files"] == 75 and report["daemon"] is None


def status_says(workspace: Workspace) -> tuple[int, str, dict[str, Any]]:
    """`spotwatch status --healthy`'s exit code, the text and the JSON."""
    config = str(workspace.config_file)
    healthy = workspace.cli("status", "--healthy", "-c", config).returncode
    text = workspace.cli("status", "-c", config).stdout
    return healthy, text, json.loads(workspace.cli("status", "--json", "-c", config).stdout)


def start_one_shot_flush(workspace: Workspace,
                         proxy: FaultProxy) -> subprocess.Popen[bytes]:  # noqa: F811
    """`spotwatch flush` with no daemon running, through the fault proxy."""
    return subprocess.Popen(
        [sys.executable, "-m", "spotwatch.cli", "flush", "-c", str(workspace.config_file)],
        cwd=workspace.root, env=workspace.env(AWS_ENDPOINT_URL=proxy.url),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_flush_through_a_stalled_daemon_gives_up_instead_of_waiting_forever(
        workspace: Workspace) -> None:
    """`spotwatch flush` asks the daemon and waits for its record: from a daemon that stopped
    reporting (here SIGSTOP), none ever comes. It must end, exit 1 and say why."""
    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("pid") == daemon.process.pid)
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        result = workspace.cli("flush", "-c", str(workspace.config_file),
                               timeout=HEALTHY_WITHIN_SECONDS + 30)
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"spotwatch: error: the daemon (pid {daemon.process.pid}) has not reported for "
        f"{HEALTHY_WITHIN_SECONDS:.0f}s (stalled): its flush cannot be waited for"]


def test_a_one_shot_flush_is_no_running_daemon(workspace: Workspace,
                                               proxy: FaultProxy) -> None:  # noqa: F811
    """`spotwatch flush` with no daemon holds the state lock and writes status.json while it
    works; the container health check must still fail: nothing watches the directory."""
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    proxy.add("delay", lambda r: r.operation == "PutObject" and "/step_1/" in r.path,
              times=100, delay=600)
    flush = start_one_shot_flush(workspace, proxy)
    try:
        wait_for(lambda: workspace.status().get("pid") == flush.pid and proxy.rules[0].applied,
                 timeout=60)
        healthy, text, report = status_says(workspace)
        assert healthy == 1 and report["healthy"] is False
        assert "daemon:       running" not in text
        assert f"a one-shot flush, pid {flush.pid}" in text
        assert report["daemon_pid"] is None and report["flush_pid"] == flush.pid
    finally:
        flush.kill()
        flush.wait()


def test_a_killed_daemons_status_is_not_its_starting_successors(
        workspace: Workspace, proxy: FaultProxy) -> None:  # noqa: F811
    """A daemon killed mid-multipart leaves a fresh status.json; its successor holds the lock
    while it aborts the leftover upload (held up here). Until the successor reports, status
    must not show the dead daemon's numbers as its own, nor call it healthy."""
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2})
    first = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    proxy.add("delay", lambda r: r.operation == "UploadPart", times=1000, delay=0.7)
    checkpoint_data(workspace.checkpoints / "big.pt", 40 * MiB)
    wait_for(lambda: proxy.count("UploadPart") >= 2, timeout=60)
    wait_for(lambda: workspace.status().get("uploading") == 1)
    first.process.kill()
    first.process.wait()
    proxy.rules.clear()
    # The listing of the leftover upload, which runs with the lock held; not the preflight's
    # (one upload at most), which runs before the lock is taken.
    listing = proxy.add("delay", lambda r: r.operation == "ListMultipartUploads"
                        and "max-uploads" not in r.query, times=100, delay=600)
    second = subprocess.Popen(
        [sys.executable, "-m", "spotwatch.cli", "run", "-c", str(workspace.config_file)],
        cwd=workspace.root, env=workspace.env(AWS_ENDPOINT_URL=proxy.url),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listing.applied, timeout=60)
        assert workspace.status()["pid"] == first.process.pid  # the successor is starting
        healthy, text, report = status_says(workspace)
        assert healthy == 1 and report["healthy"] is False
        assert f"starting (pid {second.pid}" in text and "pending:" not in text
        assert report["daemon_pid"] == second.pid and report["daemon"] is None
    finally:
        second.kill()
        second.wait()


def test_a_second_flush_waits_for_a_one_shot_flush_instead_of_ending_it(
        workspace: Workspace, proxy: FaultProxy, s3: Any) -> None:  # noqa: F811
    """The second `spotwatch flush` signals the lock's holder as it would a daemon; a one-shot
    flush must not die of that SIGUSR1 with its uploads under way."""
    data = checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 10_000)
    held = proxy.add("delay", lambda r: r.operation == "PutObject" and "/step_1/" in r.path,
                     delay=3)
    first = start_one_shot_flush(workspace, proxy)
    try:
        wait_for(lambda: workspace.status().get("pid") == first.pid and held.applied,
                 timeout=60)
        second = workspace.cli("flush", "-c", str(workspace.config_file))
        assert first.wait(timeout=60) == 0
        assert second.returncode == 0, second.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert workspace.status()["last_flush"]["files"] == 1
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data


def test_status_and_flush_from_a_shell_need_no_bucket_while_the_daemon_runs(
        workspace: Workspace) -> None:
    """The systemd unit names the bucket to the daemon alone (its environment file): from a
    shell, `spotwatch status` and `spotwatch flush` reach the daemon without it."""
    no_bucket = {"S3_BUCKET_NAME": ""}
    result = workspace.cli("status", "-c", str(workspace.config_file), **no_bucket)
    assert result.returncode == 2
    assert result.stderr.startswith("spotwatch: error: no bucket:")
    assert "(no running daemon reports one, nor did the last one)" in result.stderr
    assert workspace.cli("flush", "-c", str(workspace.config_file), **no_bucket).returncode == 2

    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("pid") == daemon.process.pid)
    shown = workspace.cli("status", "-c", str(workspace.config_file), "--json", **no_bucket)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["bucket"] == workspace.bucket
    assert workspace.cli("status", "-c", str(workspace.config_file), "--healthy",
                         **no_bucket).returncode == 0
    (workspace.checkpoints / "step_1.pt").write_bytes(b"saved")
    flushed = workspace.cli("flush", "-c", str(workspace.config_file), **no_bucket)
    assert flushed.returncode == 0, flushed.stderr
    assert daemon.named("flush_done")

    # Killed with a file pending (between two of systemd's restarts): what it left behind is
    # shown from its last report, which names the bucket.
    workspace.write_config(sync={"mode": "on-notice"})
    daemon.process.kill()
    daemon.process.wait()
    daemon = workspace.start_daemon()
    (workspace.checkpoints / "step_2.pt").write_bytes(b"pending")
    wait_for(lambda: workspace.status().get("pending_files") == 1)
    daemon.process.kill()
    daemon.process.wait()
    shown = workspace.cli("status", "-c", str(workspace.config_file), **no_bucket)
    assert shown.returncode == 0, shown.stderr
    assert "left behind:  1 files not in S3" in shown.stdout, shown.stdout
    assert workspace.cli("status", "-c", str(workspace.config_file), "--healthy",
                         **no_bucket).returncode == 1


def test_status_says_a_flush_is_running_while_it_runs(workspace: Workspace,
                                                      imds: ImdsEmulator) -> None:
    """During a notice's flush, `spotwatch status` says so, not only the flush before it."""
    workspace.write_config(sync={"quiet_seconds": 60})  # a file left open stays unsettled
    daemon = workspace.start_daemon()
    (workspace.checkpoints / "step_1").mkdir()
    with (workspace.checkpoints / "step_1" / "model.pt").open("wb") as checkpoint:
        checkpoint.write(b"weights" * 1000)
        checkpoint.flush()
        imds.fire_rebalance()  # no deadline: the flush waits for the file being written
        daemon.wait_for_event("flush_started")
        wait_for(lambda: workspace.status().get("flushing") is True)
        shown = workspace.cli("status", "-c", str(workspace.config_file))
        assert "flush:        running" in shown.stdout, shown.stdout
    daemon.wait_for_event("flush_done")
    wait_for(lambda: workspace.status().get("flushing") is False)
    shown = workspace.cli("status", "-c", str(workspace.config_file))
    assert "flush:        running" not in shown.stdout
    assert "last flush:" in shown.stdout
    assert daemon.stop() == 0


def test_s3_not_answering_uploads_is_degraded_everywhere_until_answers_flow(
        workspace: Workspace, proxy: FaultProxy, transfer_client: str) -> None:  # noqa: F811
    """S3 taking requests and never answering fails none for minutes (the CRT has no read
    timeout, the classic client's is 60 s): uploads in flight with no progress for 10 s make
    the daemon degraded, in status.json, `status`, `--healthy`, /healthz and the metrics, and
    it is healthy again as soon as answers flow."""
    workspace.write_config(transfer={**MULTIPART, "max_concurrency": 2})
    held = proxy.add("delay", lambda r: r.operation in ("PutObject", "UploadPart")
                     and of_files(r), times=1000, delay=600)
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
    checkpoint_data(workspace.checkpoints / "step_1" / "model.pt", 12 * MiB)
    wait_for(lambda: held.applied >= 1, timeout=60)

    def not_answering(report: dict[str, Any] | None) -> bool:
        return any(reason.startswith("S3 not answering: ")
                   for reason in (report or {}).get("degraded") or [])

    wait_for(lambda: not_answering(workspace.status()), timeout=30)
    healthy, text, report = status_says(workspace)
    assert healthy == 1 and report["healthy"] is False and not_answering(report["daemon"])
    assert "uploads in flight, no progress for" in text
    answer = requests.get(f"{metrics_url(daemon)}/healthz", timeout=5)
    assert answer.status_code == 503 and "degraded: S3 not answering: " in answer.text
    assert scrape(metrics_url(daemon))[("spotwatch_uploads_quiet_seconds", ())] > 10
    assert daemon.named("s3_not_answering")

    held.release()  # the held requests are answered, and the rest at once
    daemon.wait_for_event("upload_done", timeout=60)
    wait_for(lambda: status_says(workspace)[0] == 0, timeout=30)
    assert not workspace.status()["degraded"]
    assert daemon.named("s3_answering")
    assert daemon.stop() == 0


def test_status_and_flush_naming_another_bucket_than_the_daemons_are_refused(
        workspace: Workspace) -> None:
    """A bucket other than the running daemon's (from --bucket, S3_BUCKET_NAME or .env) is
    one line and exit 2: status would show that daemon's report under the other bucket's
    name, and flush would hand the daemon a flush of its own bucket and say it was done."""
    daemon = workspace.start_daemon()
    wait_for(lambda: workspace.status().get("pid") == daemon.process.pid)
    for verb in ("status", "flush"):
        refused = workspace.cli(verb, "-c", str(workspace.config_file), "--bucket",
                                "some-other-bucket")
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "some-other-bucket" in lines[0], lines
        assert workspace.bucket in lines[0], lines
    # Named by nothing but a config/.env (beside the config, or in the working directory):
    # the line says which file, or the operator is left wondering where the name came from.
    env_file = workspace.config_file.parent / "config" / ".env"
    env_file.parent.mkdir(exist_ok=True)
    env_file.write_text("S3_BUCKET_NAME=bucket-from-env-file\n")
    refused = workspace.cli("status", "-c", str(workspace.config_file), S3_BUCKET_NAME="")
    assert refused.returncode == 2, refused.stderr
    assert f"(bucket-from-env-file, from {env_file})" in refused.stderr, refused.stderr
    env_file.unlink()
    same = workspace.cli("status", "-c", str(workspace.config_file), "--bucket", workspace.bucket)
    assert same.returncode == 0, same.stderr
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0
    assert daemon.stop() == 0


def test_a_killed_daemon_leaves_a_file_still_being_written_in_status(
        workspace: Workspace) -> None:
    """Killed while the trainer still wrote a file: nothing of it is in S3, and status once
    the daemon is gone says so, as the next start uploads it."""
    daemon = workspace.start_daemon()
    with (workspace.checkpoints / "step_7.pt").open("wb") as writing:
        writing.write(b"half a shard")
        writing.flush()
        wait_for(lambda: workspace.status().get("unsettled_files") == 1)
        daemon.process.kill()
        daemon.process.wait()
    shown = workspace.cli("status", "-c", str(workspace.config_file)).stdout
    assert "daemon:       not running" in shown, shown
    assert "left behind:  0 files not in S3 when it last reported" in shown, shown
    assert "and 1 still being written; the next start uploads them" in shown, shown
    report = json.loads(workspace.cli("status", "--json", "-c",
                                      str(workspace.config_file)).stdout)
    assert report["left_by_last_run"]["unsettled_files"] == 1
