"""Uploads files to S3 with one shared s3transfer manager; knows nothing of IMDS or watchdog.

Each upload is checked after it completes: if the file changed while it was read, the outcome
says so and the caller uploads it again, so the final object always equals the final file.
Files below the multipart threshold go up in one PutObject of our own, whose reply carries the
checksum S3 verified; that saves the HEAD a managed transfer needs, which matters for many
small files. Larger files go through s3transfer's multipart machinery.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from boto3.s3.transfer import create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.futures import TransferFuture
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster

from spotwatch.aws.s3 import encryption_args, transfer_config
from spotwatch.config import TransferSettings
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync.orphans import abort_open_uploads

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("spotwatch.uploader")


IN_MEMORY_BODY_MAX = 1 << 20


class _DoneSubscriber(BaseSubscriber):
    def __init__(self, callback: Callable[[TransferFuture], None],
                 progress: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._progress = progress

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress(bytes_transferred)

    def on_done(self, future: TransferFuture, **kwargs: Any) -> None:
        self._callback(future)


class Uploader:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        settings: TransferSettings,
        on_result: Callable[[UploadResult], None],
    ) -> None:
        self.client = client
        self.bucket = bucket
        self._settings = settings
        self._on_result = on_result
        self._manager = create_transfer_manager(client, transfer_config(settings))
        # Verification (stat + HEAD) runs off s3transfer's own threads so they keep uploading.
        self._verifier = ThreadPoolExecutor(max_workers=4, thread_name_prefix="verify")
        self._single_part = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                               thread_name_prefix="put")
        self._futures: dict[Path, TransferFuture | Future[Any]] = {}
        self._lock = threading.Lock()
        # Bytes sent, as s3transfer reports them (a progress bar's feed).
        self.on_progress: Callable[[int], None] | None = None

    @property
    def max_concurrency(self) -> int:
        return self._settings.max_concurrency

    def uses_multipart(self, size: int) -> bool:
        return size >= self._settings.multipart_threshold

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer splits a file of this size into (None: one request)."""
        if not self.uses_multipart(size):
            return None
        return ChunksizeAdjuster().adjust_chunksize(self._settings.multipart_chunksize, size)

    @property
    def checksum_field(self) -> str:
        return f"Checksum{self._settings.checksum_algorithm}"

    def in_flight(self) -> int:
        with self._lock:
            return len(self._futures)

    def is_uploading(self, path: Path) -> bool:
        with self._lock:
            return path in self._futures

    def _extra_args(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": self._settings.checksum_algorithm,
                **encryption_args(self._settings)}

    def submit(self, job: UploadJob) -> None:
        started = time.monotonic()

        def finished(future: TransferFuture | Future[Any]) -> None:
            # May run at once on this thread, under self._lock: take no lock here. After
            # shutdown the verifier refuses work (RuntimeError): a request abandoned then has
            # ended, and nobody handles results any more.
            with contextlib.suppress(RuntimeError):
                self._verifier.submit(self._verify, job, future, started)

        with self._lock:
            future: TransferFuture | Future[Any]
            if self.uses_multipart(job.snapshot.size):
                future = self._manager.upload(
                    str(job.path), self.bucket, job.key, extra_args=self._extra_args(),
                    subscribers=[_DoneSubscriber(finished, self.on_progress)],
                )
            else:
                future = self._single_part.submit(self._put_file, job)
                future.add_done_callback(finished)
            self._futures[job.path] = future

    def _put_file(self, job: UploadJob) -> dict[str, Any]:
        with job.path.open("rb") as handle:
            # A small file is read once; botocore then checksums and signs the bytes in memory
            # instead of reading the file three times, seeking back in between.
            # (Bounded: a file that grew since is caught by the check after upload.)
            small = job.snapshot.size < IN_MEMORY_BODY_MAX
            body = handle.read(IN_MEMORY_BODY_MAX) if small else handle
            response = self.client.put_object(Bucket=self.bucket, Key=job.key, Body=body,
                                              **self._extra_args())  # type: ignore[arg-type]
        if self.on_progress is not None:
            self.on_progress(job.snapshot.size)
        return dict(response)

    def put_small(self, key: str, body: bytes, content_type: str) -> None:
        """A small object in one request (manifests); raises on failure."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type,
                               ChecksumAlgorithm=self._settings.checksum_algorithm,
                               **encryption_args(self._settings))  # type: ignore[arg-type]

    def put_small_async(self, key: str, body: bytes, content_type: str) -> Future[None]:
        """put_small on an upload thread; the future holds the error, if any."""
        return self._single_part.submit(self.put_small, key, body, content_type)

    def cancel(self, path: Path) -> bool:
        """Cancel one upload; s3transfer's shutdown(cancel=True) is broken, so per future."""
        with self._lock:
            future = self._futures.get(path)
        if future is None:
            return False
        future.cancel()
        return True

    def cancel_all(self) -> None:
        with self._lock:
            futures = list(self._futures.values())
        for future in futures:
            future.cancel()

    def shutdown(self) -> None:
        """Cancel everything and return at once, without waiting for requests in flight.

        A request S3 holds (slow replies, a 60 s read timeout) must not stretch a stop past
        sync.stop_timeout; the CLI exits with os._exit, which joins no thread."""
        self.cancel_all()
        self._single_part.shutdown(wait=False, cancel_futures=True)
        self._verifier.shutdown(wait=False, cancel_futures=True)
        if not self.in_flight():
            # s3transfer's shutdown waits for every transfer's requests: only when none run.
            self._manager.shutdown()

    def _verify(self, job: UploadJob, future: TransferFuture | Future[Any],
                started: float) -> None:
        result = self._check(job, future, started)
        if self.uses_multipart(job.snapshot.size):
            result = replace(result, multipart_leftovers=not self._abort_leftovers(job.key,
                                                                                   future))
        with self._lock:
            self._futures.pop(job.path, None)
        self._on_result(result)

    def _check(self, job: UploadJob, future: TransferFuture | Future[Any],
               started: float) -> UploadResult:
        def result(outcome: Outcome, **extra: Any) -> UploadResult:
            return UploadResult(job, outcome, time.monotonic() - started, **extra)

        try:
            reply = future.result()
        except Exception as exc:  # s3transfer re-raises whatever the transfer hit
            if type(exc).__name__ == "CancelledError":
                return result(Outcome.CANCELLED)
            if isinstance(exc, FileNotFoundError):
                return result(Outcome.VANISHED)
            return result(Outcome.FAILED, error=_describe(exc), permanent=_is_permanent(exc))
        try:
            after = Snapshot.of(os.stat(job.path, follow_symlinks=False))
        except FileNotFoundError:
            return result(Outcome.VANISHED, object_removed=self._remove_stray(job.key))
        if after != job.snapshot:
            return result(Outcome.CHANGED)
        sent_checksum = reply.get(self.checksum_field) if isinstance(reply, dict) else None
        if isinstance(sent_checksum, str):
            # One PutObject of a file unchanged throughout: S3 checked the bytes against it.
            return result(Outcome.DONE, checksum=sent_checksum)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=job.key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            return result(Outcome.FAILED, error=_describe(exc), permanent=_is_permanent(exc))
        if head["ContentLength"] != job.snapshot.size:
            # Another writer of the same key raced us: the object is not our file.
            return result(Outcome.FAILED, error="object size differs from the file after upload")
        checksum = head.get(self.checksum_field)
        return result(Outcome.DONE, checksum=checksum if isinstance(checksum, str) else None,
                      part_size=self.part_size(job.snapshot.size))

    def _abort_leftovers(self, key: str, future: TransferFuture | Future[Any]) -> bool:
        """After a completed multipart upload, abort any other upload of the key left open;
        True when none is left.

        Invariant: no multipart upload stays open after its file is uploaded. When the reply
        to CreateMultipartUpload is lost, botocore's retry starts a second upload and the
        first stays open with no parts, unknown to s3transfer. Listing this one key right
        after its own upload completed, and before another upload of the file can start, finds
        it at once and knows that every open upload of the key is ours. (A prefix-wide listing
        at startup could not tell ours from those of another writer under the same prefix,
        and would leave the orphan until a restart.) It costs one request per multipart file.
        """
        try:
            future.result()
        except Exception:
            # Cut short: s3transfer aborted its own upload; a lost-reply leftover is aborted
            # after the next completed upload of the key, or at the next start.
            return False
        try:
            abort_open_uploads(self.client, self.bucket, key)
        except (BotoCoreError, ClientError) as exc:
            log.warning("multipart_cleanup_failed", key=key, error=_describe(exc))
            return False
        return True

    def _remove_stray(self, key: str) -> bool:
        """Delete the object just written for a file deleted (or renamed away) meanwhile.

        Invariant: a file gone before its upload finished leaves no object. This runs before
        the upload counts as finished, so no newer upload of the same file has written the key
        since; any older object there was overwritten by this upload anyway.
        """
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            log.warning("stray_object_left", key=key, error=_describe(exc))
            return False
        return True


# Client errors that are worth retrying at the same pace: timeouts and throttling.
_TRANSIENT_STATUSES = {408, 429}


def _is_permanent(exc: BaseException) -> bool:
    """Failures that retrying alone will not fix: S3 refusing the request (403 AccessDenied and
    other 4xx), or the file unreadable (permission denied, a directory). Network errors, 5xx,
    throttling and timeouts are transient."""
    if isinstance(exc, BotoCoreError):  # checked first: some are OSErrors too (timeouts)
        return False
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return 400 <= status < 500 and status not in _TRANSIENT_STATUSES
    return isinstance(exc, OSError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
