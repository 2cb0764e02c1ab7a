"""An upload asked first whether it is needed (Uploader.submit's precheck, which judges a
file against its sealed set: sync.sets.sealed), on the in-memory store: a result the check
gives stands for the upload and sends nothing; a failed check is a failed upload, retried;
cancelled or withdrawn while the check runs, nothing is sent either."""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from spotwatch.aws.store import StoreError
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync.uploader import Uploader

from .conftest import wait_for
from .memory_store import InMemoryObjectStore


def _job(tmp_path: Path) -> UploadJob:
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(100))
    return UploadJob(path, "run1/step_1/model.pt", Snapshot.of(os.stat(path)))


def _submit(store: InMemoryObjectStore, job: UploadJob,
            precheck: object) -> tuple[Uploader, queue.Queue[UploadResult]]:
    results: queue.Queue[UploadResult] = queue.Queue()
    uploader = Uploader(store, results.put)
    uploader.submit(job, precheck)  # type: ignore[arg-type]
    return uploader, results


def test_a_result_from_the_precheck_stands_for_the_upload(tmp_path: Path) -> None:
    store, job = InMemoryObjectStore(), _job(tmp_path)
    adopted = UploadResult(job, Outcome.ADOPTED, 0.0, checksum="AAAAAA==", sealed_at=5.0)
    uploader, results = _submit(store, job, lambda: adopted)
    try:
        assert results.get(timeout=10) == adopted
        assert store.calls["upload_file"] == 0 and not store.objects
        assert not uploader.is_uploading(job.path)
    finally:
        uploader.shutdown()


def test_no_result_from_the_precheck_uploads(tmp_path: Path) -> None:
    store, job = InMemoryObjectStore(), _job(tmp_path)
    uploader, results = _submit(store, job, lambda: None)
    try:
        assert results.get(timeout=10).outcome is Outcome.DONE
        assert store.data(job.key) == job.path.read_bytes()
    finally:
        uploader.shutdown()


def test_a_precheck_that_cannot_reach_s3_fails_the_upload_for_a_retry(tmp_path: Path) -> None:
    store, job = InMemoryObjectStore(), _job(tmp_path)

    def unreachable() -> UploadResult | None:
        raise StoreError("could not connect")

    uploader, results = _submit(store, job, unreachable)
    try:
        result = results.get(timeout=10)
        assert (result.outcome, result.permanent) == (Outcome.FAILED, False)
        assert "could not connect" in (result.error or "")
        assert not store.objects
    finally:
        uploader.shutdown()


@pytest.mark.parametrize(("failure", "permanent"), [
    (StoreError("AccessDenied", permanent=True), True),
    (PermissionError(13, "Permission denied"), True),
    (StoreError("SlowDown"), False),
    (RuntimeError("cannot schedule new futures after shutdown"), False),
])
@pytest.mark.parametrize("answered", ["at once", "through a future"])
def test_a_failed_precheck_is_permanent_as_the_upload_failing_would_be(
        tmp_path: Path, failure: BaseException, permanent: bool, answered: str) -> None:
    """The precheck's failure, raised or from the held copy it waits for, counts as permanent
    exactly when the same failure of the upload itself would (Uploader._is_permanent)."""
    store, job = InMemoryObjectStore(), _job(tmp_path)

    def failing() -> UploadResult | Future[None] | None:
        if answered == "at once":
            raise failure
        waited: Future[None] = Future()
        waited.set_exception(failure)
        return waited

    uploader, results = _submit(store, job, failing)
    try:
        result = results.get(timeout=10)
        assert (result.outcome, result.permanent) == (Outcome.FAILED, permanent)
        assert not store.objects
    finally:
        uploader.shutdown()


@pytest.mark.parametrize("stop", ["withdraw", "cancel"])
def test_withdrawn_or_cancelled_during_the_precheck_sends_nothing(tmp_path: Path,
                                                                 stop: str) -> None:
    store, job = InMemoryObjectStore(), _job(tmp_path)
    checking, go_on = threading.Event(), threading.Event()

    def slow_check() -> UploadResult | None:
        checking.set()
        assert go_on.wait(10)
        return None  # would upload, were it still wanted

    uploader, results = _submit(store, job, slow_check)
    try:
        assert checking.wait(10)
        assert uploader.is_uploading(job.path)
        if stop == "withdraw":
            assert uploader.withdraw(job.path)
        else:
            uploader.cancel(job.path)
        go_on.set()
        assert results.get(timeout=10).outcome is Outcome.CANCELLED
        assert store.calls["upload_file"] == 0 and not store.objects
    finally:
        uploader.shutdown()


def test_an_upload_waiting_for_its_held_copy_is_no_stall_and_fails_with_it(
        tmp_path: Path) -> None:
    """A precheck that starts work (a held copy) returns at once: the upload waits for it off
    the precheck thread, counts as in flight but not as sending (no S3 stall while a copy of
    tens of GB runs), and starts once it is done; a copy that fails fails the upload."""
    store, job = InMemoryObjectStore(), _job(tmp_path)
    copying: Future[None] = Future()
    uploader, results = _submit(store, job, lambda: copying)
    try:
        wait_for(lambda: uploader.in_flight() == 1 and uploader.sending() == 0)
        assert store.calls["upload_file"] == 0
        copying.set_result(None)
        assert results.get(timeout=10).outcome is Outcome.DONE
        assert store.data(job.key) == job.path.read_bytes()
        wait_for(lambda: uploader.in_flight() == uploader.sending() == 0)
    finally:
        uploader.shutdown()
    failing: Future[None] = Future()
    uploader, results = _submit(InMemoryObjectStore(), job, lambda: failing)
    try:
        failing.set_exception(StoreError("copy refused"))
        result = results.get(timeout=10)
        assert result.outcome is Outcome.FAILED and "copy refused" in (result.error or "")
    finally:
        uploader.shutdown()
