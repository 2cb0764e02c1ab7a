"""The IMDS emulator speaks IMDSv2 the way the real service does, over real HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import requests

from spotwatch.emulator import ImdsEmulator

from .conftest import wait_for

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def token(url: str, ttl: str = "60") -> str:
    response = requests.put(f"{url}/latest/api/token", headers={TTL: ttl}, timeout=2)
    assert response.status_code == 200
    assert response.headers[TTL] == ttl
    return response.text


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "ten"])
def test_bad_ttl_is_400(imds: ImdsEmulator, ttl: str | None) -> None:
    headers = {TTL: ttl} if ttl is not None else {}
    response = requests.put(f"{imds.url}/latest/api/token", headers=headers, timeout=2)
    assert response.status_code == 400


def test_forwarded_token_request_is_403(imds: ImdsEmulator) -> None:
    response = requests.put(f"{imds.url}/latest/api/token",
                            headers={TTL: "60", "X-Forwarded-For": "10.0.0.1"}, timeout=2)
    assert response.status_code == 403


def test_get_without_or_with_bad_token_is_401(imds: ImdsEmulator) -> None:
    url = f"{imds.url}/latest/meta-data/instance-id"
    assert requests.get(url, timeout=2).status_code == 401
    assert requests.get(url, headers={TOKEN: "forged"}, timeout=2).status_code == 401
    good = requests.get(url, headers={TOKEN: token(imds.url)}, timeout=2)
    assert good.status_code == 200
    assert good.text.startswith("i-")


def test_token_expires_after_its_ttl(imds: ImdsEmulator) -> None:
    short = token(imds.url, "1")
    url = f"{imds.url}/latest/meta-data/instance-id"
    assert requests.get(url, headers={TOKEN: short}, timeout=2).status_code == 200
    # Refused once its one second is over (and it must be over within a few).
    wait_for(lambda: requests.get(url, headers={TOKEN: short}, timeout=2).status_code == 401,
             timeout=5)


def test_instance_action_is_404_until_marked(imds: ImdsEmulator) -> None:
    url = f"{imds.url}/latest/meta-data/spot/instance-action"
    headers = {TOKEN: token(imds.url)}
    assert requests.get(url, headers=headers, timeout=2).status_code == 404
    control = requests.post(f"{imds.url}/_emulator/spot",
                            json={"action": "stop", "in_seconds": 120}, timeout=2)
    assert control.status_code == 200
    body = requests.get(url, headers=headers, timeout=2).json()
    assert body["action"] == "stop"
    assert body["time"].endswith("Z")
    termination = requests.get(f"{imds.url}/latest/meta-data/spot/termination-time",
                               headers=headers, timeout=2)
    assert termination.text == body["time"]


def test_directory_listing_and_identity(imds: ImdsEmulator) -> None:
    headers = {TOKEN: token(imds.url)}
    listing = requests.get(f"{imds.url}/latest/meta-data/placement", headers=headers, timeout=2)
    assert set(listing.text.splitlines()) == {"availability-zone", "region"}
    document = requests.get(f"{imds.url}/latest/dynamic/instance-identity/document",
                            headers=headers, timeout=2).json()
    assert document["region"] == "us-west-2"


def test_injected_faults_and_disable(imds: ImdsEmulator) -> None:
    headers = {TOKEN: token(imds.url)}
    url = f"{imds.url}/latest/meta-data/instance-id"
    requests.post(f"{imds.url}/_emulator/fault", json={"status": 503, "count": 2}, timeout=2)
    statuses = [requests.get(url, headers=headers, timeout=2).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    requests.post(f"{imds.url}/_emulator/disable", json={}, timeout=2)
    assert requests.get(url, headers=headers, timeout=2).status_code == 403
    stats = requests.get(f"{imds.url}/_emulator/stats", timeout=2).json()
    assert stats["counts"]["fault_503"] == 2


def test_scheduled_events_and_lifecycle(imds: ImdsEmulator) -> None:
    headers = {TOKEN: token(imds.url)}
    base = f"{imds.url}/latest/meta-data"
    assert requests.get(f"{base}/events/maintenance/scheduled", headers=headers,
                        timeout=2).json() == []
    imds.schedule_event("instance-stop", 600)
    events = json.loads(requests.get(f"{base}/events/maintenance/scheduled", headers=headers,
                                     timeout=2).text)
    assert events[0]["Code"] == "instance-stop"
    assert events[0]["NotBefore"].endswith("GMT")
    cancelled = requests.post(f"{imds.url}/_emulator/cancel-scheduled",
                              json={"event_id": events[0]["EventId"]}, timeout=2)
    assert cancelled.status_code == 200 and json.loads(cancelled.text) == []
    [history] = json.loads(requests.get(f"{base}/events/maintenance/history", headers=headers,
                                        timeout=2).text)
    assert history["EventId"] == events[0]["EventId"] and history["State"] == "canceled"
    imds.schedule_event("instance-stop", 600)
    [marked] = json.loads(imds.cancel_event(to_history=False))  # canceled, still listed
    assert marked["State"] == "canceled"
    assert requests.get(f"{base}/autoscaling/target-lifecycle-state", headers=headers,
                        timeout=2).status_code == 404
    imds.set_lifecycle_state("Terminated")
    assert requests.get(f"{base}/autoscaling/target-lifecycle-state", headers=headers,
                        timeout=2).text == "Terminated"


@pytest.mark.parametrize(("action", "body"), [
    ("fault", {"status": 500, "count": "many"}),
    ("spot", {"in_seconds": "soon"}),
    ("spot", {"in_seconds": 1e300}),
    ("scheduled", {"in_seconds": [1]}),
    ("instance", {}),
    ("cancel-scheduled", {"event_id": "instance-event-none"}),
    ("spot", [1, 2]),
])
def test_a_bad_control_body_is_400_and_the_emulator_goes_on(imds: ImdsEmulator, action: str,
                                                            body: object) -> None:
    """A control request with wrong values answers 400 naming the action, as a body that is
    not JSON does, instead of dropping the connection (and a traceback on the console)."""
    answer = requests.post(f"{imds.url}/_emulator/{action}", json=body, timeout=2)
    assert answer.status_code == 400 and action in answer.text
    fired = requests.post(f"{imds.url}/_emulator/spot", json={"in_seconds": 60}, timeout=2)
    assert fired.status_code == 200 and json.loads(fired.text)["action"] == "terminate"


def test_standalone_emulator_serves_until_sigterm() -> None:
    process = subprocess.Popen([sys.executable, "-m", "spotwatch.emulator", "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        response = requests.get(f"{url}/latest/meta-data/instance-id",
                                headers={TOKEN: token(url)}, timeout=2)
        assert response.status_code == 200 and response.text.startswith("i-")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
