"""Prometheus metrics and /healthz, scraped over HTTP from a running daemon."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import spotwatch
from spotwatch.daemon.metrics import Metrics, MetricsServer
from spotwatch.emulator import Fault, ImdsEmulator

from .conftest import Daemon, Workspace, wait_for
from .faultproxy import FaultProxy, Request
from .test_daemon_e2e import save_checkpoint


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{url}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metrics_url(daemon: Daemon) -> str:
    url = daemon.named("daemon_started")[0]["metrics"]
    assert url and url.startswith("http://127.0.0.1:")
    return str(url)


@pytest.mark.usefixtures("transfer_client")
def test_metrics_follow_pending_work_uploads_notices_and_flushes(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    url = metrics_url(daemon)
    assert requests.get(f"{url}/healthz", timeout=5).text == "ok\n"
    save_checkpoint(workspace.checkpoints / "step_1.pt", 12_345)

    def pending() -> float:
        return scrape(url)[("spotwatch_pending_files", ())]

    wait_for(lambda: pending() == 1, timeout=10)
    before = scrape(url)
    assert before[("spotwatch_pending_files", ())] == 1
    assert before[("spotwatch_pending_bytes", ())] == 12_345
    assert before[("spotwatch_uploaded_files_total", ())] == 0
    # No upload yet: no age sample at all (no sentinel that reads as a real age).
    assert ("spotwatch_last_upload_age_seconds", ()) not in before
    assert before[("spotwatch_build_info", (("version", spotwatch.__version__),))] == 1
    assert before[("process_cpu_seconds_total", ())] > 0
    assert before[("spotwatch_imds_up", ())] == 1

    imds.fire_spot_interruption()
    flush = daemon.wait_for_event("flush_done")
    # The gauges are set with each status.json, before it is written: once a status names
    # this flush, the gauges show the state after it.
    wait_for(lambda: (workspace.status().get("last_flush") or {}).get("finished_at")
             == flush["finished_at"])
    after = scrape(url)
    assert after[("spotwatch_pending_files", ())] == 0
    assert after[("spotwatch_uploaded_files_total", ())] == 1
    assert after[("spotwatch_uploaded_bytes_total", ())] == 12_345
    assert 0 <= after[("spotwatch_last_upload_age_seconds", ())] < 10
    assert after[("spotwatch_notices_total", (("kind", "spot-interruption"),))] == 1
    assert after[("spotwatch_notice_detection_seconds_count", ())] == 1
    # The notice's time has whole seconds, so the estimate can be up to a second long.
    assert after[("spotwatch_notice_detection_seconds_sum", ())] < 2.5
    reason = (("reason", "spot-interruption"),)
    assert after[("spotwatch_flush_duration_seconds_count", reason)] == 1
    assert daemon.stop() == 0


def test_a_notice_posted_long_before_the_daemon_ran_is_not_timed(
        workspace: Workspace, imds: ImdsEmulator) -> None:
    """A spot time years ago (garbled, or posted while the daemon was down) is counted as a
    notice, but puts no years into the detection latency."""
    daemon = workspace.start_daemon()
    url = metrics_url(daemon)
    imds.set_item("meta-data/spot/instance-action",
                  '{"action": "terminate", "time": "2020-01-01T00:00:00Z"}')
    daemon.wait_for_event("flush_done")
    after = wait_for(lambda: (lambda scraped: scraped if scraped.get(
        ("spotwatch_notices_total", (("kind", "spot-interruption"),))) else None)(scrape(url)))
    assert after.get(("spotwatch_notice_detection_seconds_count", ()), 0) == 0
    assert after.get(("spotwatch_notice_detection_seconds_sum", ()), 0) == 0
    assert daemon.stop() == 0


def test_a_manual_flush_is_not_counted_as_a_notice(workspace: Workspace,
                                                   imds: ImdsEmulator) -> None:
    """spotwatch_notices_total counts AWS's notices (as status's last notice shows them): an
    operator's `spotwatch flush` is a flush, not a notice, so an alert on notices stays quiet."""
    daemon = workspace.start_daemon()
    url = metrics_url(daemon)
    assert workspace.cli("flush", "-c", str(workspace.config_file)).returncode == 0
    after_flush = scrape(url)
    assert after_flush[("spotwatch_flush_duration_seconds_count",
                        (("reason", "manual-flush"),))] == 1
    assert not [key for key in after_flush if key[0] == "spotwatch_notices_total"]
    imds.fire_spot_interruption()
    daemon.wait_for_event("flush_done", count=2)
    notices = {key: value for key, value in scrape(url).items()
               if key[0] == "spotwatch_notices_total"}
    assert notices == {("spotwatch_notices_total", (("kind", "spot-interruption"),)): 1}
    assert daemon.stop() == 0


def test_busy_metrics_port_does_not_stop_the_daemon(workspace: Workspace) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        workspace.write_config(metrics={"port": taken.getsockname()[1]})
        daemon = workspace.start_daemon()
        warning = daemon.wait_for_event("metrics_unavailable")
        assert warning["port"] == taken.getsockname()[1]
        save_checkpoint(workspace.checkpoints / "a.pt", 100)
        daemon.wait_for_event("upload_done")
        assert daemon.stop() == 0


def test_metrics_can_be_switched_off(workspace: Workspace) -> None:
    workspace.write_config(metrics={"enabled": False})
    daemon = workspace.start_daemon()
    assert daemon.named("daemon_started")[0]["metrics"] is None
    assert daemon.stop() == 0


def test_healthz_reports_a_stalled_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    server = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        metrics._last_tick -= 60  # as if the loop had not run for a minute
        stalled = requests.get(f"{server.url}/healthz", timeout=5)
        assert (stalled.status_code, stalled.text) == (503, "stalled\n")
        metrics.tick()
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


def test_healthz_reports_degradation_with_its_reason() -> None:
    metrics = Metrics()
    server = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        metrics.degraded = ("IMDS unreachable for 12s",)
        answer = requests.get(f"{server.url}/healthz", timeout=5)
        assert (answer.status_code, answer.text) == (503, "degraded: IMDS unreachable for 12s\n")
        metrics.degraded = ()
        assert requests.get(f"{server.url}/healthz", timeout=5).text == "ok\n"
    finally:
        server.stop()


def test_metrics_serve_on_an_ipv6_address_as_on_an_ipv4_one() -> None:
    """metrics.address takes an IPv6 literal (config); the server binds it, not just IPv4."""
    for address in ("::1", "127.0.0.1", "localhost"):
        server = MetricsServer(Metrics(), address, 0).start()
        try:
            answer = requests.get(f"{server.url}/healthz", timeout=5)
            assert (answer.status_code, answer.text) == (200, "ok\n")
            assert server.url.startswith("http://[::1]:" if address == "::1" else "http://")
        finally:
            server.stop()


def healthz(url: str) -> requests.Response:
    return requests.get(f"{url}/healthz", timeout=5)


def degraded_text(url: str) -> str | None:
    answer = healthz(url)
    return answer.text if answer.status_code == 503 else None


def healthy_exit_code(workspace: Workspace) -> int:
    return workspace.cli("status", "-c", str(workspace.config_file), "--healthy").returncode


def test_s3_outage_is_visible_at_once_and_its_end_too(workspace: Workspace,
                                                      transfer_client: str) -> None:
    """On the CRT path, retries happen inside the CRT: a transfer is counted once, by the
    error it finally failed with, so the two resets it retried past are not seen."""
    def file_puts(request: Request) -> bool:
        return request.operation == "PutObject" and "/.spotwatch/" not in request.path

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.add("reset", file_puts, times=2)
        proxy.add("503", file_puts, times=10**6)
        workspace.write_config(transfer={"max_attempts": 3})
        daemon = workspace.start_daemon(AWS_ENDPOINT_URL=proxy.url)
        url = metrics_url(daemon)
        save_checkpoint(workspace.checkpoints / "step_1.pt", 1_000)

        degraded = daemon.wait_for_event("s3_degraded", timeout=40)
        assert degraded["error_class"] == "SlowDown"
        per_attempt = transfer_client == "classic"
        if per_attempt:
            assert degraded["errors"]["ConnectionError"] == 2
        text = wait_for(lambda: degraded_text(url))
        assert text.startswith("degraded: S3 requests failing for ") and "SlowDown" in text
        samples = scrape(url)
        assert samples[("spotwatch_s3_errors_total", (("class", "SlowDown"),))] >= 1
        if per_attempt:
            assert samples[("spotwatch_s3_errors_total", (("class", "ConnectionError"),))] == 2
        wait_for(lambda: healthy_exit_code(workspace) == 1)

        proxy.rules.clear()
        recovered = daemon.wait_for_event("s3_recovered", timeout=60)
        assert recovered["errors"]["SlowDown"] >= 1
        daemon.wait_for_event("upload_done")
        wait_for(lambda: healthz(url).status_code == 200)
        wait_for(lambda: healthy_exit_code(workspace) == 0)
        assert daemon.stop() == 0


def test_unreachable_imds_is_visible(workspace: Workspace, imds: ImdsEmulator) -> None:
    workspace.write_config(imds={"poll_interval": 0.2, "timeout": 0.5})
    daemon = workspace.start_daemon()
    url = metrics_url(daemon)
    wait_for(lambda: scrape(url).get(("spotwatch_imds_up", ())) == 1)
    # As in a container without hop limit 2: every request to IMDS fails.
    imds.add_fault(Fault(status=500, remaining=10**6, applies_to="all"))
    daemon.wait_for_event("imds_unreachable")
    wait_for(lambda: scrape(url)[("spotwatch_imds_up", ())] == 0)
    text = wait_for(lambda: degraded_text(url), timeout=30)
    assert text.startswith("degraded: IMDS unreachable for ")
    assert healthy_exit_code(workspace) == 1
    shown = workspace.cli("status", "-c", str(workspace.config_file), "--json")
    assert json.loads(shown.stdout)["daemon"]["imds_up"] is False

    imds.reset()
    wait_for(lambda: scrape(url)[("spotwatch_imds_up", ())] == 1, timeout=30)
    wait_for(lambda: healthz(url).status_code == 200)
    wait_for(lambda: healthy_exit_code(workspace) == 0)
    assert daemon.stop() == 0


def test_metrics_port_config_errors(workspace: Workspace) -> None:
    workspace.write_config(metrics={"port": 70000})
    result: Any = workspace.cli("check", "-c", "config.yaml")
    assert result.returncode == 2 and "metrics.port" in result.stderr


@pytest.mark.usefixtures("transfer_client")
def test_flush_shows_a_progress_bar_on_a_terminal(workspace: Workspace) -> None:
    for i in range(3):
        save_checkpoint(workspace.checkpoints / f"shard_{i}.pt", 2 * 2**20)
    code, text = workspace.cli_on_terminal("flush", "-c", "config.yaml")
    assert code == 0, text
    assert "\rflushing: [########################]" in text
    assert "6.0 / 6.0 MiB (100.0%), 3 files" in text


def test_delegated_flush_and_status_on_a_terminal(workspace: Workspace) -> None:
    workspace.write_config(sync={"mode": "on-notice"})
    daemon = workspace.start_daemon()
    save_checkpoint(workspace.checkpoints / "a.pt", 3 * 2**20)
    code, text = workspace.cli_on_terminal("flush", "-c", "config.yaml")
    assert code == 0, text
    assert "\rdaemon flushing: [" in text
    status = workspace.cli("status", "-c", "config.yaml")
    assert f"metrics:      {metrics_url(daemon)}/metrics" in status.stdout
    assert daemon.stop() == 0
