"""The IMDSv2 client against the emulator: tokens, refresh, 401 retry, faults, endpoints."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest

from spotwatch.aws.imds import (
    IPV4_ENDPOINT,
    IPV6_ENDPOINT,
    ImdsClient,
    ImdsDisabledError,
    ImdsError,
    resolve_endpoint,
)
from spotwatch.config import ImdsSettings
from spotwatch.emulator import Fault, ImdsEmulator

from .conftest import wait_for

SPOT = "meta-data/spot/instance-action"


def test_one_token_serves_many_requests(imds: ImdsEmulator) -> None:
    client = ImdsClient(imds.url)
    for _ in range(5):
        assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert imds.counts()["token_put"] == 1


def test_404_means_no_notice(imds: ImdsEmulator) -> None:
    assert ImdsClient(imds.url).get(SPOT) is None
    imds.fire_spot_interruption()
    assert '"action": "terminate"' in (ImdsClient(imds.url).get(SPOT) or "")


def test_token_is_refreshed_before_it_expires(imds: ImdsEmulator) -> None:
    now = [0.0]
    client = ImdsClient(imds.url, token_ttl=8, clock=lambda: now[0])
    client.get("meta-data/instance-id")  # the token is valid until 8 on this clock
    now[0] = 7.0  # inside the refresh margin (a quarter of the TTL) but not yet expired
    client.get("meta-data/instance-id")
    counts = imds.counts()
    assert counts["token_put"] == 2
    assert counts.get("get_401", 0) == 0


def test_401_gets_a_new_token_and_retries_once(imds: ImdsEmulator) -> None:
    client = ImdsClient(imds.url)
    client.get("meta-data/instance-id")
    imds.expire_tokens()  # as after an IMDS restart
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    counts = imds.counts()
    assert counts["get_401"] == 1
    assert counts["token_put"] == 2


def test_a_hanging_token_refresh_does_not_hold_up_other_requests(imds: ImdsEmulator) -> None:
    now = [0.0]
    client = ImdsClient(imds.url, token_ttl=8, timeout=1.0, attempts=1, clock=lambda: now[0])
    assert client.get("meta-data/instance-id")  # the token is valid until 8 on this clock
    now[0] = 7.0  # inside the refresh margin (a quarter of the TTL), still valid
    imds.add_fault(Fault(delay=3.0, remaining=1, applies_to="token"))

    def refresh() -> None:
        with suppress(ImdsError):
            client.get("meta-data/instance-id")

    refreshing = threading.Thread(target=refresh)
    refreshing.start()
    wait_for(lambda: imds.counts()["token_put"] == 2)  # the refresh is hanging now
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert refreshing.is_alive()  # answered with the old token while the refresh hangs
    refreshing.join()


def test_server_errors_are_retried(imds: ImdsEmulator) -> None:
    imds.add_fault(Fault(status=500, remaining=2))
    assert ImdsClient(imds.url, attempts=3).get("meta-data/instance-id") is not None


def test_timeouts_are_retried(imds: ImdsEmulator) -> None:
    imds.add_fault(Fault(delay=1.0, remaining=1))
    client = ImdsClient(imds.url, timeout=0.3, attempts=3)
    started = time.monotonic()
    assert client.get("meta-data/instance-id") is not None
    assert time.monotonic() - started < 2.5


def test_persistent_failure_is_an_error(imds: ImdsEmulator) -> None:
    imds.add_fault(Fault(status=503, remaining=10))
    with pytest.raises(ImdsError, match="HTTP 503"):
        ImdsClient(imds.url, attempts=3).get("meta-data/instance-id")


def test_unreachable_endpoint_is_an_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImdsError, match="unreachable"):
        ImdsClient(f"http://127.0.0.1:{port}", timeout=0.2, attempts=2).get(SPOT)


def test_disabled_imds_is_reported(imds: ImdsEmulator) -> None:
    imds.set_disabled(True)
    with pytest.raises(ImdsDisabledError):
        ImdsClient(imds.url).get(SPOT)


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", raising=False)
    assert resolve_endpoint(ImdsSettings()) == IPV4_ENDPOINT
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert resolve_endpoint(ImdsSettings()) == IPV6_ENDPOINT
    assert resolve_endpoint(ImdsSettings(endpoint_mode="IPv4")) == IPV4_ENDPOINT
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1234/")
    assert resolve_endpoint(ImdsSettings()) == "http://127.0.0.1:1234"
    assert resolve_endpoint(ImdsSettings(endpoint="http://[::1]:80")) == "http://[::1]:80"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def imds_v6() -> Iterator[ImdsEmulator]:
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    with ImdsEmulator(host="::1") as emulator:
        yield emulator


def test_ipv6_endpoint(imds_v6: ImdsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert imds_v6.url.startswith("http://[::1]:")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds_v6.url)
    client = ImdsClient.from_settings(ImdsSettings())
    imds_v6.fire_spot_interruption("hibernate")
    assert '"hibernate"' in (client.get(SPOT) or "")
