"""A slow or hanging IMDS item never delays the spot interruption's detection."""

from __future__ import annotations

import threading
import time

from spotwatch.aws.imds import ImdsClient
from spotwatch.emulator import Fault, ImdsEmulator
from spotwatch.model import Notice, NoticeKind
from spotwatch.notices import DEFAULT_SOURCES
from spotwatch.notices.poller import NoticePoller
from spotwatch.notices.sources import SPOT_INSTANCE_ACTION

from .conftest import wait_for

INTERVAL = 0.2
TIMEOUT = 0.5


def test_spot_detection_ignores_hanging_items(imds: ImdsEmulator) -> None:
    for source in DEFAULT_SOURCES:
        if source != SPOT_INSTANCE_ACTION:  # every other item hangs past the client's timeout
            imds.add_fault(Fault(delay=TIMEOUT * 10, remaining=10_000, path=source.path))
    detected: dict[str, float] = {}
    got_one = threading.Event()

    def on_notice(notice: Notice) -> None:
        if notice.kind is NoticeKind.SPOT_INTERRUPTION:
            detected[notice.id] = time.time()
            got_one.set()

    poller = NoticePoller(ImdsClient(imds.url, timeout=TIMEOUT, attempts=3), DEFAULT_SOURCES,
                          INTERVAL, on_notice)
    poller.start()
    # Bound: one poll interval plus one request, and one more interval for scheduling.
    bound = INTERVAL + TIMEOUT + INTERVAL
    latencies = []
    try:
        # Every item was asked for at least once: the other items' requests are hanging.
        wait_for(lambda: imds.counts().get("get", 0) >= len(DEFAULT_SOURCES) + 2)
        for number in range(5):
            got_one.clear()
            imds.fire_spot_interruption(in_seconds=120 + 10 * number)  # a new notice each
            fired = imds.state.fired_at["spot"]
            assert got_one.wait(timeout=bound * 20)
            latencies.append(max(detected.values()) - fired)
    finally:
        poller.stop()
    assert len(detected) == 5
    assert max(latencies) <= bound, latencies
