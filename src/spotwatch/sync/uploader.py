"""Uploads files to an ObjectStore; knows nothing of IMDS or watchdog.

Each upload is checked after it completes: if the file changed while it was read, the outcome
says so and the caller uploads it again, so the final object always equals the final file.
How a file goes up (one request, or parts) is the store's business (see aws.store).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from spotwatch.aws.health import Liveness
from spotwatch.aws.store import ObjectStore, Pending, PendingUpload, StoreError
from spotwatch.logs import get_logger
from spotwatch.model import Outcome, Snapshot, UploadJob, UploadResult
from spotwatch.sync.orphans import abort_open_uploads

log = get_logger("spotwatch.uploader")

# Asked before a file is uploaded: a result here is the upload's, and nothing is sent.
# A precheck's answer: the upload's result (nothing is sent), None (it starts now), or work it
# waits for first, done off the precheck thread (a held copy, sync.sets.held).
Precheck = Callable[[], "UploadResult | Future[None] | None"]


class Uploader:
    def __init__(
        self,
        store: ObjectStore,
        on_result: Callable[[UploadResult], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.bucket = store.bucket
        self._on_result = on_result
        self._clock = clock
        # Checks after upload (stat, cleanup) run off the store's threads so they keep uploading.
        self._verifier = ThreadPoolExecutor(max_workers=4, thread_name_prefix="verify")
        # Prechecks run one at a time, in the order submitted: the uploads they let start
        # are handed to the store in the planner's order (newest set first), as without one.
        self._prechecker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="precheck")
        self._uploads: dict[Path, PendingUpload] = {}
        # Those of them waiting for what their precheck started (a held copy): none of their
        # bytes move until it ends, so they are no sign of S3 stalling (see sending).
        self._waiting: set[Path] = set()
        self._lock = threading.Lock()
        # Bytes sent, as the store reports them (a progress bar's feed).
        self.on_progress: Callable[[int], None] | None = None
        # When the uploads in flight last moved: a start, bytes sent, an end (S3 hanging).
        self.liveness = Liveness("uploads", clock)

    @property
    def max_concurrency(self) -> int:
        return self.store.max_concurrency

    def uses_multipart(self, size: int) -> bool:
        return self.store.uses_multipart(size)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._uploads)

    def sending(self) -> int:
        """Uploads in flight less those waiting for a held copy: the ones whose stalling says
        S3 stalls (a copy of tens of GB moves no bytes here for a minute)."""
        with self._lock:
            return len(self._uploads) - len(self._waiting)

    def is_uploading(self, path: Path) -> bool:
        with self._lock:
            return path in self._uploads

    def submit(self, job: UploadJob, precheck: Precheck | None = None) -> None:
        """Upload the file. precheck: asked first, on the precheck thread; a result it returns
        is the upload's, and nothing is sent (see sync.sets.sealed); work it returns (a held
        copy's future, sync.sets.held) is waited for off that thread, and its failure fails
        the upload. Until then the job counts as uploading, and cancel or withdraw end it as
        CANCELLED (VANISHED when its file went)."""
        self.liveness.moved()  # before it counts as in flight (Liveness's invariant)
        if precheck is None:
            self._start(job, self._clock())
            return
        gate = _Gate()
        with self._lock:
            self._uploads[job.path] = gate.pending
        with contextlib.suppress(RuntimeError):  # shut down: nobody handles results any more
            self._prechecker.submit(self._precheck, job, gate, precheck)

    def _start(self, job: UploadJob, started: float) -> PendingUpload:
        def finished(_: Any) -> None:
            # May run at once on this thread, under self._lock: take no lock here. After
            # shutdown the verifier refuses work (RuntimeError): a request abandoned then has
            # ended, and nobody handles results any more.
            self.liveness.moved()
            with contextlib.suppress(RuntimeError):
                self._verifier.submit(self._verify, job, upload, started)

        with self._lock:
            upload = self.store.upload_file(job.path, job.key, job.snapshot.size,
                                            self._report_progress)
            self._uploads[job.path] = upload
            upload.future.add_done_callback(finished)
        return upload

    def _precheck(self, job: UploadJob, gate: _Gate, precheck: Precheck) -> None:
        started = self._clock()
        answer: UploadResult | Future[None] | None = None
        if not gate.stopped:
            try:
                answer = precheck()
            except Exception as exc:  # S3 not reachable, say: retried as a failed upload is
                answer = self._failure(job, started, exc)
        if isinstance(answer, Future):
            # Not waited for here: the next upload's precheck goes on meanwhile.
            with self._lock:
                self._waiting.add(job.path)
            answer.add_done_callback(partial(self._first_done, job, gate, started))
            return
        self._after_precheck(job, gate, started, answer)

    def _first_done(self, job: UploadJob, gate: _Gate, started: float,
                    first: Future[None]) -> None:
        """What the upload waited for has ended: a failure, or one never run (a stop), fails
        the upload, to be retried; never sent without it."""
        with self._lock:
            self._waiting.discard(job.path)
        self.liveness.moved()  # counts as a start: the upload has the whole threshold
        error = CancelledError() if first.cancelled() else first.exception()
        self._after_precheck(job, gate, started, None if error is None
                             else self._failure(job, started, error))

    def _failure(self, job: UploadJob, started: float,
                         exc: BaseException) -> UploadResult:
        """A failure outside the upload's requests (its precheck, starting it, the check after
        it): permanent as an upload's own failure would be (an unreadable file, S3 refusing
        the request)."""
        return UploadResult(job, Outcome.FAILED, self._clock() - started, error=_describe(exc),
                            permanent=_is_permanent(exc))

    def _after_precheck(self, job: UploadJob, gate: _Gate, started: float,
                        early: UploadResult | None) -> None:
        """Start the upload, unless the precheck answered for it or it was stopped meanwhile;
        either way its result is handed on once."""
        with gate.lock:
            if early is None and not gate.stopped:
                try:
                    gate.started = self._start(job, started)
                    return
                except Exception as exc:  # never a job left counted as uploading for good
                    early = self._failure(job, started, exc)
        self.liveness.moved()
        if early is None:  # stopped before it started: nothing was written
            # As _check says of an upload cut short: VANISHED when the file went (deleted,
            # renamed away), so that it is not taken for a newer version to send.
            early = UploadResult(job, Outcome.CANCELLED if os.path.lexists(job.path)
                                 else Outcome.VANISHED, self._clock() - started)
        # As _verify: the result is on its way before the path stops counting as uploading.
        self._on_result(early)
        with self._lock:
            if self._uploads.get(job.path) is gate.pending:
                del self._uploads[job.path]

    def _report_progress(self, sent: int) -> None:
        self.liveness.moved()
        if self.on_progress is not None:
            self.on_progress(sent)

    def cancel(self, path: Path) -> bool:
        """Cancel one upload."""
        with self._lock:
            upload = self._uploads.get(path)
        if upload is None:
            return False
        upload.cancel()
        return True

    def withdraw(self, path: Path) -> bool:
        """Cancel an upload only if it has not begun; True when it never will (its result
        comes as CANCELLED)."""
        with self._lock:
            upload = self._uploads.get(path)
        return upload is not None and upload.withdraw()

    def cancel_all(self) -> None:
        with self._lock:
            uploads = list(self._uploads.values())
        for upload in uploads:
            upload.cancel()

    def shutdown(self) -> None:
        """Cancel everything and return at once, without waiting for requests in flight."""
        self.cancel_all()
        self._prechecker.shutdown(wait=False, cancel_futures=True)
        self._verifier.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def _verify(self, job: UploadJob, upload: PendingUpload, started: float) -> None:
        try:
            result = self._check(job, upload, started)
        except Exception as exc:  # never a job left counted as uploading for good
            result = self._failure(job, started, exc)
        if self.uses_multipart(job.snapshot.size):
            result = replace(result, multipart_leftovers=not self._abort_leftovers(job.key,
                                                                                   upload))
        # Invariant: the engine handles an upload's result before it can start the next
        # upload of the same path, so their ledger notes keep their order (a multipart
        # upload's note that it is finished never removes the next one's that it started,
        # which a restart needs to abort what a kill -9 left open). So the path counts as
        # uploading until the result is on its way, and only this upload's entry goes.
        self._on_result(result)
        with self._lock:
            if self._uploads.get(job.path) is upload:
                del self._uploads[job.path]

    def _check(self, job: UploadJob, upload: PendingUpload, started: float) -> UploadResult:
        def result(outcome: Outcome, **extra: Any) -> UploadResult:
            return UploadResult(job, outcome, self._clock() - started, **extra)

        failure: Exception | None = None
        # The future ends only once no request of the upload can still change the object
        # (ObjectStore.upload_file), so the outcome (and the requeue or stray removal it
        # leads to) comes after anything this upload can write.
        try:
            stored = upload.future.result()
        except CancelledError:
            if not os.path.lexists(job.path):  # cut short because the file went
                return result(Outcome.VANISHED, object_removed=self._remove_stray(job.key))
            return result(Outcome.CANCELLED)
        except FileNotFoundError:
            return result(Outcome.VANISHED)
        except Exception as exc:  # the store's, or reading the file failed
            failure = exc
        try:
            after = Snapshot.of(os.stat(job.path, follow_symlinks=False))
        except FileNotFoundError:
            if failure is not None:  # nothing written: an older version's object stays
                return result(Outcome.VANISHED)
            return result(Outcome.VANISHED, object_removed=self._remove_stray(job.key))
        except OSError:
            if failure is None:
                raise
            after = job.snapshot  # unreadable: the failure says why
        # Invariant: an upload that failed while its file changed failed by the change (the
        # CRT's body no longer as long as it declared) and is no failure: the new version
        # goes up, as after a change caught once the upload completed.
        if after != job.snapshot:
            return result(Outcome.CHANGED)
        if failure is not None:
            return result(Outcome.FAILED, error=_describe(failure),
                          permanent=_is_permanent(failure))
        if stored.size is not None and stored.size != job.snapshot.size:
            # Another writer of the same key raced us: the object is not our file.
            return result(Outcome.FAILED, error="object size differs from the file after upload")
        return result(Outcome.DONE, checksum=stored.checksum, part_size=stored.part_size,
                      checksum_algorithm=stored.algorithm, etag=stored.etag)

    def _abort_leftovers(self, key: str, upload: PendingUpload) -> bool:
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
        if upload.future.cancelled() or upload.future.exception() is not None:
            # Cut short: s3transfer aborted its own upload; a lost-reply leftover is aborted
            # after the next completed upload of the key, or at the next start.
            return False
        try:
            abort_open_uploads(self.store, key)
        except StoreError as exc:
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
            self.store.delete(key)
        except StoreError as exc:
            log.warning("stray_object_left", key=key, error=_describe(exc))
            return False
        return True


class _Gate:
    """An upload waiting for its precheck: cancelled or withdrawn before the check let it
    start, it never starts; after, the upload itself is cancelled or withdrawn."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopped = False
        self.started: PendingUpload | None = None
        self.pending: PendingUpload = Pending(Future(), self._cancel, self._withdraw)

    def _cancel(self) -> None:
        with self.lock:
            self.stopped = True
            started = self.started
        if started is not None:
            started.cancel()

    def _withdraw(self) -> bool:
        with self.lock:
            if self.started is None:
                self.stopped = True
                return True
            started = self.started
        return started.withdraw()


def _is_permanent(exc: BaseException) -> bool:
    """Failures that retrying alone will not fix: the store refusing the request (see
    aws.store.store_error), or the file unreadable (permission denied, a directory)."""
    if isinstance(exc, StoreError):
        return exc.permanent
    return isinstance(exc, OSError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
