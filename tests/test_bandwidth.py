"""The bandwidth cap on continuous uploads: the token bucket on a fake clock, the store's two
upload paths against the moto server, and the daemon lifting the cap on a notice or a stop."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import IN_MEMORY_BODY_MAX, S3ObjectStore
from spotwatch.config import MIN_BANDWIDTH, MiB, TransferSettings, load_config
from spotwatch.emulator import ImdsEmulator
from spotwatch.errors import ConfigError
from spotwatch.sync.bandwidth import BandwidthLimiter
from tests.conftest import REGION, Workspace, keys_in, object_bytes, wait_for

# s3transfer reports a multipart upload's progress (and so waits for the cap) per 256 KiB
# read: each part in flight may run that far ahead of the bucket.
PROGRESS_STEP = 256 * 1024
SMALL_PARTS = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket ---------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(rate=st.integers(MIN_BANDWIDTH, 10**9),
       burst_seconds=st.floats(0.01, 2.0),
       requests=st.lists(st.tuples(st.floats(0, 5), st.floats(0.0, 1.0)), min_size=1,
                         max_size=60))
def test_no_window_lets_more_than_rate_times_length_plus_burst_through(
        rate: int, burst_seconds: float, requests: list[tuple[float, float]]) -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(rate, max(1, int(rate * burst_seconds)), clock)
    released: list[tuple[float, int]] = []  # (when the bytes may go, how many)
    for gap, share in requests:
        clock.now += gap
        size = max(1, int(limiter.burst * share))  # each request at most the burst
        released.append((clock.now + limiter.reserve(size), size))
    assert released == sorted(released, key=lambda item: item[0])  # first come, first served
    for first in range(len(released)):
        sent = 0
        for last in range(first, len(released)):
            sent += released[last][1]
            window = released[last][0] - released[first][0]
            assert sent <= rate * window + limiter.burst + 1e-6 * sent


def test_a_cancelled_wait_gives_its_bytes_back_only_when_none_queued_behind_it() -> None:
    """Given back with a sender queued behind it, its bytes would let a newcomer go beside that
    sender, over the rate; given back as the last in line, the next sender waits for nothing
    never sent."""
    clock = FakeClock()  # time never passes
    limiter = BandwidthLimiter(MIN_BANDWIDTH, clock=clock)
    assert limiter.acquire(limiter.burst)  # the bucket is empty now
    last_in_line = threading.Event()
    last_in_line.set()  # cancelled before its turn
    assert not limiter.acquire(1000, last_in_line)
    assert limiter.reserve(1000) == pytest.approx(1000 / MIN_BANDWIDTH)  # as if never asked
    # Now one waits (cancelled later) and another queues behind it.
    cancelled = threading.Event()
    waited: list[bool] = []
    waiting = threading.Thread(target=lambda: waited.append(limiter.acquire(1000, cancelled)))
    waiting.start()
    wait_for(lambda: limiter._reservations == 4)
    behind = limiter.reserve(1000)
    cancelled.set()
    waiting.join(10)
    assert waited == [False]
    # Nothing given back: a newcomer goes after the one behind, not beside it.
    assert limiter.reserve(1000) == pytest.approx(behind + 1000 / MIN_BANDWIDTH)


@given(rate=st.integers(MIN_BANDWIDTH, 10**9), size=st.integers(1, 10**10))
def test_a_request_waits_for_exactly_what_the_bucket_lacks(rate: int, size: int) -> None:
    limiter = BandwidthLimiter(rate, clock=FakeClock())
    assert limiter.reserve(size) == pytest.approx(max(0, size - limiter.burst) / rate)


def test_lift_releases_every_held_sender_at_once_and_reimpose_caps_again() -> None:
    limiter = BandwidthLimiter(MIN_BANDWIDTH, clock=FakeClock())  # time never passes
    hour = MIN_BANDWIDTH * 3600
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(limiter.acquire, hour) for _ in range(3)]
        wait_for(lambda: limiter.reserve(1) > 3 * 3600 - 1)  # all three reserved their hour
        assert not any(future.done() for future in held)
        limiter.lift()
        for future in held:
            future.result(timeout=10)  # released now, not in hours
    assert limiter.reserve(hour) == 0  # lifted: nothing waits
    limiter.reimpose()
    assert limiter.reserve(hour) > 3600


def test_concurrent_senders_share_one_rate() -> None:
    rate = 4 * MiB
    limiter = BandwidthLimiter(rate)
    chunk, chunks, senders = 16 * 1024, 64, 4

    def send() -> None:
        for _ in range(chunks):
            limiter.acquire(chunk)

    started = time.monotonic()
    with ThreadPoolExecutor(senders) as pool:
        for future in [pool.submit(send) for _ in range(senders)]:
            future.result()
    elapsed = time.monotonic() - started
    assert chunk * chunks * senders <= rate * elapsed + limiter.burst


# -- the config key -------------------------------------------------------------------------

@given(st.one_of(st.integers(-10**6, 10**12), st.text(max_size=12),
                 st.sampled_from(["200MB", "1MiB/s", " 64 KiB/s ", "2GB/s", "0", "10KB",
                                  "MB/s", "/s", "5 MB /s", "none", " None "])))
def test_continuous_bandwidth_is_a_rate_or_a_one_line_refusal(value: int | str) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "config.yaml"
        path.write_text(yaml.safe_dump({"watch": [{"path": root}],
                                        "sync": {"continuous_bandwidth": value}}))
        try:
            rate = load_config(path).sync.continuous_bandwidth
        except ConfigError as exc:
            assert "sync.continuous_bandwidth" in str(exc) and "\n" not in str(exc)
        else:
            if isinstance(value, str) and value.strip().lower() == "none":
                assert rate is None  # the README's word for no cap, as null is
            else:
                assert rate is not None and rate >= MIN_BANDWIDTH


def test_continuous_bandwidth_examples(tmp_path: Path) -> None:
    def loaded(value: Any) -> int | None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"watch": [{"path": str(tmp_path / "w")}],
                                        "sync": {"continuous_bandwidth": value}}))
        return load_config(path).sync.continuous_bandwidth

    assert loaded(None) is None
    assert loaded("200MB") == loaded("200MB/s") == 200 * MiB
    assert loaded(1048576) == MiB
    with pytest.raises(ConfigError, match="at least 65536 bytes per second"):
        loaded("1KB/s")
    with pytest.raises(ConfigError, match="is not a size"):
        loaded("fast")


def test_a_bad_cap_is_refused_by_the_cli_with_exit_2(workspace: Workspace) -> None:
    workspace.write_config(sync={"continuous_bandwidth": "lots/s"})
    done = workspace.cli("run", "-c", "config.yaml")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "sync.continuous_bandwidth" in done.stderr


# -- the store's upload paths, against moto over HTTP ----------------------------------------

class Recording:
    """A throttle that lets everything through and counts what it was asked for."""

    def __init__(self) -> None:
        self.sent = 0
        self._lock = threading.Lock()

    def acquire(self, size: int, cancelled: threading.Event | None = None) -> bool:
        with self._lock:
            self.sent += size
        return True


@pytest.fixture
def store_with(bucket: str) -> Iterator[Any]:
    stores: list[S3ObjectStore] = []

    def make(throttle: Any, transfer: TransferSettings = SMALL_PARTS) -> S3ObjectStore:
        stores.append(S3ObjectStore(make_s3_client(REGION, transfer), bucket, transfer,
                                    throttle))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.mark.parametrize("size", [300_000, 3 * MiB, 11 * MiB + 5])
def test_the_throttle_sees_each_file_byte_sent_once(tmp_path: Path, s3: Any, bucket: str,
                                                    store_with: Any, size: int) -> None:
    """Small, single-request and multipart files: botocore reads a body for its checksum and
    signature before sending it; only the sending counts against the cap."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(size))
    throttle = Recording()
    store_with(throttle).upload_file(path, "a/model.pt", size).future.result(timeout=60)
    assert throttle.sent == size
    assert object_bytes(s3, bucket, "a/model.pt") == path.read_bytes()


@pytest.mark.parametrize("size", [3 * MiB, 6 * MiB])
def test_uploads_through_a_capped_store_keep_to_the_cap(tmp_path: Path, s3: Any, bucket: str,
                                                        store_with: Any, size: int) -> None:
    rate = 4 * MiB
    limiter = BandwidthLimiter(rate)
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(size))
    started = time.monotonic()
    store_with(limiter).upload_file(path, "a/model.pt", size).future.result(timeout=60)
    elapsed = time.monotonic() - started
    parts = -(-size // SMALL_PARTS.multipart_chunksize)
    assert size <= rate * elapsed + limiter.burst + parts * PROGRESS_STEP
    assert object_bytes(s3, bucket, "a/model.pt") == path.read_bytes()


# -- the daemon: capped while continuous, lifted by a notice or a stop -----------------------

def open_uploads(s3: Any, bucket: str) -> list[Any]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])  # type: ignore[no-any-return]


def write_file(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def least_left(size: int, rate: int, since: float, burst: int, parts: int) -> float:
    """What is at least still to send of an upload begun after `since`: its size less the
    most the cap can have let through since then."""
    return size - rate * (time.monotonic() - since) - burst - parts * PROGRESS_STEP


def test_continuous_uploads_keep_to_the_cap_until_a_notice_lifts_it(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, transfer_client: str) -> None:
    """On both clients: while capped the CRT store uploads through the classic path, which the
    cap paces."""
    rate = 2 * MiB
    burst = BandwidthLimiter(rate).burst
    workspace.write_config(sync={"continuous_bandwidth": "2MB/s"},
                           transfer={"multipart_threshold": "5MB", "multipart_chunksize": "5MB"})
    daemon = workspace.start_daemon()
    assert wait_for(lambda: workspace.status().get("bandwidth_cap")) == rate
    assert workspace.status()["bandwidth_cap_lifted"] is False

    # A single PutObject and a multipart upload, capped together.
    sizes = {"step_1/small.pt": 3 * MiB, "step_1/large.pt": 6 * MiB}
    started = time.monotonic()
    for name, size in sizes.items():
        write_file(workspace.checkpoints / name, size)
    wait_for(lambda: {f"run1/{name}" for name in sizes} <= keys_in(s3, workspace.bucket),
             timeout=60)
    elapsed = time.monotonic() - started
    assert sum(sizes.values()) <= rate * elapsed + burst + 2 * PROGRESS_STEP

    # A large upload under way when the notice arrives finishes uncapped.
    size = 24 * MiB
    began = time.monotonic()
    data = write_file(workspace.checkpoints / "step_2" / "model.pt", size)
    wait_for(lambda: open_uploads(s3, workspace.bucket))
    left = least_left(size, rate, began, burst, parts=5)
    imds.fire_spot_interruption("terminate", in_seconds=120)
    noticed = time.monotonic()
    wait_for(lambda: "run1/step_2/model.pt" in keys_in(s3, workspace.bucket), timeout=60)
    assert time.monotonic() - noticed < left / rate / 2  # the cap would need twice as long
    assert object_bytes(s3, workspace.bucket, "run1/step_2/model.pt") == data
    lifted = daemon.wait_for_event("bandwidth_cap_lifted")
    assert lifted["reason"] == "spot-interruption"
    wait_for(lambda: workspace.status().get("bandwidth_cap_lifted") is True)
    assert daemon.stop() == 0
    assert not daemon.named("bandwidth_cap_reimposed")


def slow_upload_under_way(workspace: Workspace, s3: Any) -> tuple[Any, bytes, float]:
    """A daemon at the lowest cap with a 6 MiB multipart upload begun: (the daemon, the
    file's bytes, the fewest bytes the cap can have left to send); the cap allows 64 KiB/s."""
    workspace.write_config(sync={"continuous_bandwidth": MIN_BANDWIDTH},
                           transfer={"multipart_threshold": "5MB", "multipart_chunksize": "5MB"})
    daemon = workspace.start_daemon()
    size = 6 * MiB
    began = time.monotonic()
    data = write_file(workspace.checkpoints / "step_1" / "model.pt", size)
    wait_for(lambda: open_uploads(s3, workspace.bucket))
    left = least_left(size, MIN_BANDWIDTH, began, BandwidthLimiter(MIN_BANDWIDTH).burst,
                      parts=2)
    return daemon, data, left


def test_the_final_flush_on_sigterm_is_not_capped(workspace: Workspace, s3: Any) -> None:
    daemon, data, left = slow_upload_under_way(workspace, s3)
    stopping = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - stopping < left / MIN_BANDWIDTH / 2
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data
    assert daemon.named("bandwidth_cap_lifted")[0]["reason"] == "shutdown"


def test_spotwatch_flush_is_not_capped(workspace: Workspace, s3: Any) -> None:
    rate = MIN_BANDWIDTH
    workspace.write_config(sync={"continuous_bandwidth": rate})
    size = 4 * MiB
    data = write_file(workspace.checkpoints / "step_1" / "model.pt", size)
    started = time.monotonic()
    done = workspace.cli("flush", "-c", "config.yaml")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < (size - BandwidthLimiter(rate).burst) / rate / 2
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data


def test_spotwatch_flush_lifts_a_running_daemons_cap_until_it_is_done(
        workspace: Workspace, s3: Any) -> None:
    daemon, data, left = slow_upload_under_way(workspace, s3)
    asked = time.monotonic()
    done = workspace.cli("flush", "-c", "config.yaml")  # SIGUSR1 to the daemon, then waits
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - asked < left / MIN_BANDWIDTH / 2
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == data
    assert daemon.named("bandwidth_cap_lifted")[0]["reason"] == "manual-flush"
    daemon.wait_for_event("bandwidth_cap_reimposed")  # continuous uploads are capped again
    wait_for(lambda: workspace.status().get("bandwidth_cap_lifted") is False)
    assert daemon.stop() == 0


# -- a single-request upload under way: cancelled, or its file cut short ----------------------

def _capped_put_under_way(tmp_path: Path, store_with: Any) -> tuple[Path, Any]:
    """A 3 MiB single PutObject at the lowest cap (about 48 s to send), its first bytes sent."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(3 * MiB))
    limiter = Sending(MIN_BANDWIDTH)
    pending = store_with(limiter).upload_file(path, "a/model.pt", 3 * MiB)
    wait_for(lambda: limiter.sending.is_set() or pending.future.done())
    return path, pending


class Sending(BandwidthLimiter):
    """A cap that says when the first bytes are being sent."""

    def __init__(self, rate: int) -> None:
        super().__init__(rate)
        self.sending = threading.Event()

    def acquire(self, size: int, cancelled: threading.Event | None = None) -> bool:
        self.sending.set()
        return super().acquire(size, cancelled)


def test_a_single_request_upload_stops_when_cancelled(tmp_path: Path, s3: Any, bucket: str,
                                                      store_with: Any) -> None:
    """The engine cancels the upload of a file written to; the request stops sending."""
    _, pending = _capped_put_under_way(tmp_path, store_with)
    pending.cancel()
    with pytest.raises(CancelledError):
        pending.future.result(timeout=20)
    assert "a/model.pt" not in keys_in(s3, bucket)


def test_a_file_cut_short_while_sent_ends_its_upload_as_superseded(
        tmp_path: Path, s3: Any, bucket: str, store_with: Any) -> None:
    """A trainer rewriting the file truncates it: the request, which declared 3 MiB, must not
    wait for bytes the file no longer has (the read timeout, once per attempt)."""
    path, pending = _capped_put_under_way(tmp_path, store_with)
    os.truncate(path, 1000)
    with pytest.raises(CancelledError):
        pending.future.result(timeout=20)
    assert "a/model.pt" not in keys_in(s3, bucket)


def test_a_checkpoint_truncated_during_a_capped_upload_is_flushed_as_it_ends(
        workspace: Workspace, s3: Any) -> None:
    workspace.write_config(sync={"continuous_bandwidth": MIN_BANDWIDTH},
                           transfer={"multipart_threshold": "5MB"})
    daemon = workspace.start_daemon()
    path = workspace.checkpoints / "step_1" / "model.pt"
    write_file(path, 3 * MiB)
    wait_for(lambda: workspace.status().get("uploading"))
    with path.open("r+b") as handle:  # rewritten in place, shorter
        handle.truncate(0)
        handle.write(b"final bytes")
    flushed = workspace.cli("flush", "-c", "config.yaml", timeout=50)
    assert flushed.returncode == 0, flushed.stderr
    assert object_bytes(s3, workspace.bucket, "run1/step_1/model.pt") == b"final bytes"
    assert daemon.stop() == 0


def test_a_small_file_held_by_the_cap_is_cancelled_at_once_and_gives_its_bytes_back(
        tmp_path: Path, s3: Any, bucket: str, store_with: Any) -> None:
    """A file under IN_MEMORY_BODY_MAX waits for the cap as a whole before its request: a
    cancel (the file written to, deleted) ends that wait, nothing is sent, and its bytes go
    back to the bucket, so the uploads behind it do not wait for them."""
    path = tmp_path / "small.pt"
    path.write_bytes(os.urandom(IN_MEMORY_BODY_MAX - 1))  # some 16 s at the lowest cap
    limiter = Sending(MIN_BANDWIDTH)
    pending = store_with(limiter).upload_file(path, "a/small.pt", IN_MEMORY_BODY_MAX - 1)
    wait_for(lambda: limiter.sending.is_set())
    pending.cancel()
    with pytest.raises(CancelledError):
        pending.future.result(timeout=8)  # not the 16 s its bytes would have waited
    assert "a/small.pt" not in keys_in(s3, bucket)
    assert limiter.reserve(limiter.burst) == 0.0  # the bucket is full again


@pytest.mark.parametrize("how", ["cancelled", "truncated"])
def test_a_body_that_ends_before_its_signature_is_a_quiet_cancel(
        tmp_path: Path, s3: Any, bucket: str, store_with: Any, how: str,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The file is cut short (or its upload cancelled) after botocore read it for its checksum
    and before the request is signed: the upload ends cancelled, and nothing prints a
    traceback (on a plain-HTTP endpoint botocore's signer, awscrt's, used to read the body
    itself and print what the body raised)."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(3 * MiB))
    store = store_with(None)
    pending: list[Any] = []

    def cut_short(**_: Any) -> None:
        if how == "truncated":
            os.truncate(path, 1000)
        else:
            pending[0].cancel()

    store.client.meta.events.register("before-sign.s3.PutObject", cut_short)
    pending.append(store.upload_file(path, "a/model.pt", 3 * MiB))
    with pytest.raises(CancelledError):
        pending[0].future.result(timeout=20)
    assert "a/model.pt" not in keys_in(s3, bucket)
    assert "Traceback" not in capfd.readouterr().err
