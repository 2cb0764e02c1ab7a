"""Where spotwatch keeps objects: the ObjectStore protocol, and its S3 implementation.

The sync layer (uploader, sealer, remote sets, pruner, restore, orphan cleanup) talks to an
ObjectStore only, in the terms it thinks in: upload this file, put these bytes, list this
prefix. Everything S3-specific stays in S3ObjectStore: boto3 requests, s3transfer's multipart
machinery, checksum headers, server-side encryption, and the translation of botocore's errors
into StoreError, which says whether retrying can help. A store is bound to one bucket (as
litestream's ReplicaClient is bound to one replica).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, Protocol, TypeVar, cast

from boto3.s3.transfer import create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.futures import TransferFuture
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import (
    S3_RETRYABLE_DOWNLOAD_ERRORS,
    ChunksizeAdjuster,
    OSUtils,
    ReadFileChunk,
)

from spotwatch.aws.ranged_get import PIECE_SIZE, RangedGetter
from spotwatch.aws.retry_pace import RetryPace, pace_retries
from spotwatch.aws.s3 import encryption_args, transfer_config
from spotwatch.checksums import ContentMismatch, Expected
from spotwatch.config import TransferSettings
from spotwatch.progress import Progress

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")


class Throttle(Protocol):
    """Holds a sender until its bytes may go out (a bandwidth cap; see sync.bandwidth)."""

    def acquire(self, size: int, cancelled: threading.Event | None = None) -> bool:
        """Return once `size` more bytes may be sent (True), or once `cancelled` is set
        (False: the bytes are not to be sent)."""
        ...

    @property
    def lifted(self) -> bool:
        """Whether the cap is off for now (a notice or a flush lifted it)."""
        ...

# A file this small is read into memory for its single request (see S3ObjectStore._put_file).
IN_MEMORY_BODY_MAX = 1 << 20
# DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
# Threads writing manifests (and the peers' notices): each write is small.
MANIFEST_WRITERS = 4
# The largest object one CopyObject copies; a larger one is copied in parts (UploadPartCopy).
COPY_OBJECT_MAX = 5 << 30
# How S3 says that a conditional request's precondition failed (CopySourceIfMatch).
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})


@dataclass(frozen=True)
class StoredObject:
    """What the store confirmed about an object it just wrote."""

    checksum: str | None  # the checksum the store verified the bytes against
    size: int | None = None  # the object's size, when the store reported it
    part_size: int | None = None  # multipart: the checksum is over parts of this size
    algorithm: str | None = None  # what made the checksum
    etag: str | None = None  # the ETag S3 gave this write (None: the store did not say)


@dataclass(frozen=True)
class ObjectHead:
    size: int
    checksum: str | None = None  # when the store reports it without being asked


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    last_modified: datetime
    etag: str | None = None  # changes with every write of the object


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload begun and neither completed nor aborted."""

    key: str
    upload_id: str


class StoreError(Exception):
    """A request the store did not carry out; str() is the store's own message.

    permanent: retrying alone will not fix it (access denied, no such bucket).
    """

    def __init__(self, message: str, *, permanent: bool = False,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class ObjectMissing(StoreError):
    """No object (or no such upload) under the key."""


class Pending(Generic[T]):
    """A transfer under way: its future holds the result or the error (CancelledError after
    cancel, OSError when the file could not be read or written, StoreError)."""

    def __init__(self, future: Future[T], cancel: Callable[[], object],
                 withdraw: Callable[[], bool] | None = None) -> None:
        self.future = future
        self._cancel = cancel
        self._withdraw = withdraw

    def cancel(self) -> None:
        self._cancel()

    def withdraw(self) -> bool:
        """Cancel the transfer only if it has not begun; True when it will never begin (its
        future then ends cancelled). A store that cannot tell withdraws nothing."""
        return self._withdraw is not None and self._withdraw()


# An upload's result: the object S3 stored.
PendingUpload = Pending[StoredObject]
# A download's result: whether its bytes were checked on the way (see ObjectStore.download).
PendingDownload = Pending[bool]


class ObjectStore(Protocol):
    """The operations spotwatch needs from an object store; every key is a full object key."""

    @property
    def bucket(self) -> str: ...

    @property
    def max_concurrency(self) -> int:
        """How many uploads the store runs at once."""
        ...

    @property
    def downloads_at_once(self) -> int:
        """How many downloads the store runs at once."""
        ...

    def uses_multipart(self, size: int) -> bool:
        """Whether a file of this size goes up in parts (its upload may leave parts behind)."""
        ...

    def upload_file(self, path: Path, key: str, size: int,
                    progress: Progress | None = None) -> PendingUpload:
        """Upload the file (of this size when it was looked at) on the store's threads.

        Invariant: the future ends (cancelled too) only once no request of this upload can
        still change the object, so what the caller does next to the key (the new version's
        upload, a stray object's removal) lands after it. A cancel may stop the body being
        sent or abort parts not yet completed, never end the future while a request whose
        body S3 has in full is unanswered; only close() abandons such requests (a stop)."""
        ...

    def put_bytes(self, key: str, body: bytes, content_type: str) -> Future[None]:
        """Write a small object on the store's threads; the future holds the error, if any."""
        ...

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes, or only its first `limit` bytes (the rest is left unread);
        ObjectMissing when there is none."""
        ...

    def copies_in_parts(self, size: int) -> bool:
        """Whether copy_if_match copies an object of this size in parts (a multipart upload,
        which a crash may leave open)."""
        ...

    def copy_if_match(self, source: str, key: str, etag: str, size: int) -> bool:
        """Copy the object at source (of this size) to key, server-side, with the store's
        write settings (encryption, checksum), only while source is the version with this
        ETag; returns whether it was copied: False when source is another version now (S3's
        412) or gone. Any other failure raises StoreError. Waits for the copy."""
        ...

    def download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                 expected: Expected | None = None) -> bool:
        """Write the object, listed with this size, to path. With `expected`, its bytes are
        checked on the way when the store can (ContentMismatch when they differ, or when the
        object no longer has that size); returns whether they were."""
        ...

    def start_download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                       expected: Expected | None = None) -> PendingDownload:
        """download(), under way once this returns (on the store's threads, or the CRT's);
        the caller may start many at once, and cancel any (CancelledError)."""
        ...

    def head(self, key: str, part_number: int | None = None) -> ObjectHead:
        """The object's size (of one part, given its number); ObjectMissing when there is none."""
        ...

    def list_objects(self, prefix: str) -> Iterator[ListedObject]: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Delete the keys; returns those the store refused to delete, each with its reason
        (S3's code and message: a missing grant is not an outage)."""
        ...

    def open_uploads(self, prefix: str) -> list[OpenUpload]: ...

    def abort_upload(self, upload: OpenUpload) -> bool:
        """Abort it; False when it was completed or aborted already."""
        ...

    def hurry(self, hurried: bool) -> None:
        """While a flush's deadline runs (hurried), a request failing is tried again within a
        second, not after the SDK's backoff (aws.retry_pace)."""
        ...

    def close(self) -> None:
        """Cancel uploads and return at once; requests outside uploads keep working."""
        ...


def _refusal(error: Mapping[str, object]) -> str:
    """A DeleteObjects error entry as one reason: its code and message, as S3 gives them."""
    said = [str(error[name]) for name in ("Code", "Message") if error.get(name)]
    return ": ".join(said) or "refused, no reason given"


# Client errors that are worth retrying at the same pace: timeouts and throttling.
_TRANSIENT_STATUSES = {408, 429}
# 4xx answers that are no refusal: S3's own timeout (400 RequestTimeout), a body cut short
# (IncompleteBody), throttling, and credentials or a clock that a refresh or NTP puts right.
# A later attempt can succeed.
_TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "IncompleteBody", "PriorRequestNotComplete",
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "TooManyRequestsException",
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "RequestTimeTooSkewed",
})
_MISSING_CODES = {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}


def store_error(exc: BotoCoreError | ClientError) -> StoreError:
    """botocore's error as a StoreError with the same message.

    Permanent: S3 refusing the request (403 AccessDenied and other 4xx). Network errors, 5xx,
    throttling and timeouts (S3's come as 400 RequestTimeout) are transient.
    """
    if isinstance(exc, BotoCoreError):  # checked first: some are OSErrors too (timeouts)
        return StoreError(str(exc))
    code = str(exc.response.get("Error", {}).get("Code", "")) or None
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    permanent = (400 <= status < 500 and status not in _TRANSIENT_STATUSES
                 and code not in _TRANSIENT_CODES)
    kind = ObjectMissing if code in _MISSING_CODES else StoreError
    return kind(str(exc), permanent=permanent, code=code)


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise store_error(exc) from exc


class _ProgressSubscriber(BaseSubscriber):
    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress(bytes_transferred)


class _DoneSubscriber(_ProgressSubscriber):
    def __init__(self, callback: Callable[[TransferFuture], None],
                 progress: Progress | None, begun: threading.Event) -> None:
        super().__init__(progress)
        self._callback = callback
        self._begun = begun

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        self._begun.set()
        super().on_progress(future, bytes_transferred, **kwargs)

    def on_done(self, future: TransferFuture, **kwargs: Any) -> None:
        self._callback(future)


class _Throttled(BaseSubscriber):
    """Holds s3transfer's sending thread after each read of the file: s3transfer reports
    progress from its reads only while the bytes go to S3 (not while botocore checksums or
    signs them), so the cap counts bytes sent, and a retry's re-sent bytes count again."""

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        self._throttle.acquire(bytes_transferred)  # negative on a retry's rewind: no wait


class S3ObjectStore:
    """An ObjectStore on one S3 bucket, through a boto3 client and one s3transfer manager.

    Files below the multipart threshold go up in one PutObject of our own, whose reply carries
    the checksum S3 verified; that saves the HEAD a managed transfer needs, which matters for
    many small files. Larger files go through s3transfer's multipart machinery.
    """

    def __init__(self, client: S3Client, bucket: str, settings: TransferSettings,
                 throttle: Throttle | None = None) -> None:
        """throttle: a bandwidth cap on uploads (file bytes only; None: no cap)."""
        self.client = client
        self._bucket = bucket
        self._settings = settings
        self._throttle = throttle
        self._pace = RetryPace()
        pace_retries(client, self._pace)
        self._manager = create_transfer_manager(client, transfer_config(settings),
                                                osutil=_WholeParts())
        # The HEAD after a multipart upload runs off s3transfer's own threads so they keep
        # uploading.
        self._finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="verify")
        self._single_part = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                               thread_name_prefix="put")
        # Manifests and other small writes: never queued behind file uploads, so a flush
        # seals the newest set while older sets' files are still going up.
        self._small_writes = ThreadPoolExecutor(max_workers=MANIFEST_WRITERS,
                                                thread_name_prefix="put-small")
        self._ranges = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                          thread_name_prefix="get")
        self._ranged = RangedGetter(client, bucket, self._ranges, settings.max_concurrency,
                                    settings.max_attempts)
        # Whole downloads wait on their ranges: they run apart from the range workers.
        self._downloads = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                             thread_name_prefix="download")
        self._transfers: set[TransferFuture] = set()
        self._closing = False  # close() began: no copy begins any more
        self._lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def max_concurrency(self) -> int:
        return self._settings.max_concurrency

    @property
    def downloads_at_once(self) -> int:
        return self._settings.max_concurrency

    def uses_multipart(self, size: int) -> bool:
        return size >= self._settings.multipart_threshold

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer splits a file of this size into (None: one request)."""
        if not self.uses_multipart(size):
            return None
        return ChunksizeAdjuster().adjust_chunksize(self._settings.multipart_chunksize, size)

    @property
    def _checksum_field(self) -> str:
        return f"Checksum{self._settings.checksum_algorithm}"

    def _stored(self, checksum: object, etag: object, size: int | None = None,
                part_size: int | None = None) -> StoredObject:
        """What S3 confirmed, from a reply's checksum of the configured algorithm (every
        write asks for that one, so it names what made the checksum) and its ETag."""
        etag = etag if isinstance(etag, str) else None
        if not isinstance(checksum, str):
            return StoredObject(None, size, part_size, etag=etag)
        return StoredObject(checksum, size, part_size, self._settings.checksum_algorithm, etag)

    def _write_args(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": self._settings.checksum_algorithm,
                **encryption_args(self._settings)}

    # -- uploads -----------------------------------------------------------------------------

    def upload_file(self, path: Path, key: str, size: int,
                    progress: Progress | None = None) -> PendingUpload:
        if not self.uses_multipart(size):
            cancelled = threading.Event()
            future = self._single_part.submit(self._put_file, path, key, size, progress,
                                              cancelled)

            def cancel() -> None:  # one not yet begun never begins, one under way stops
                cancelled.set()
                future.cancel()

            return PendingUpload(future, cancel, future.cancel)
        outer: Future[StoredObject] = Future()
        begun = threading.Event()  # a byte of the file was read for sending

        def finished(transfer: TransferFuture) -> None:
            with self._lock:
                self._transfers.discard(transfer)
            # After close the finisher refuses work (RuntimeError): nobody waits any more.
            with suppress(RuntimeError):
                self._finisher.submit(self._finish_multipart, transfer, key, size, outer)

        subscribers: list[BaseSubscriber] = [_DoneSubscriber(finished, progress, begun)]
        if self._throttle is not None:
            subscribers.append(_Throttled(self._throttle))
        with self._lock:
            transfer = self._manager.upload(
                str(path), self._bucket, key, extra_args=self._write_args(),
                subscribers=subscribers)
            self._transfers.add(transfer)

        def withdraw() -> bool:  # a part may start meanwhile: at most it is sent in vain
            if begun.is_set():
                return False
            transfer.cancel()
            return True

        # s3transfer's shutdown(cancel=True) is broken: cancelled per future.
        return PendingUpload(outer, transfer.cancel, withdraw)

    def _put_file(self, path: Path, key: str, size: int, progress: Progress | None,
                  cancelled: threading.Event) -> StoredObject:
        with path.open("rb") as handle, _translated():
            # A small file is read once; botocore then checksums and signs the bytes in memory
            # instead of reading the file three times, seeking back in between.
            # (Bounded: a file that grew since is caught by the check after upload.)
            body = self._small_body(handle, cancelled) if size < IN_MEMORY_BODY_MAX \
                else self._sent_from(handle, cancelled)
            reply = self.client.put_object(Bucket=self._bucket, Key=key, Body=body,
                                           **self._write_args())  # type: ignore[arg-type]
        if progress is not None:
            progress(size)
        checksum = reply.get(self._checksum_field)
        if isinstance(checksum, str):
            # One PutObject: S3 checked the bytes against this checksum.
            return self._stored(checksum, reply.get("ETag"))
        return self._verified(key, size)

    def _small_body(self, handle: BinaryIO, cancelled: threading.Event) -> bytes:
        """A small file's bytes, let through the throttle as a whole before the request; a
        cancel while the throttle holds them ends the upload there, nothing sent."""
        body = handle.read(IN_MEMORY_BODY_MAX)
        if self._throttle is not None and not self._throttle.acquire(len(body), cancelled):
            raise CancelledError()
        return body

    def _sent_from(self, handle: BinaryIO, cancelled: threading.Event) -> BinaryIO:
        """The file as a request body of the size it has now (see _FileBody); with a throttle,
        its reads report their size (and so wait for the throttle) only while the request is
        sent: s3transfer's request-created handlers on this client switch that on and off."""
        throttle = self._throttle
        callbacks: list[Callable[..., None]] = []
        if throttle is not None:
            def sent(bytes_transferred: int) -> None:  # s3transfer passes it by name
                if not throttle.acquire(bytes_transferred, cancelled):
                    raise CancelledError()  # before the chunk read goes out

            callbacks.append(sent)
        size = os.fstat(handle.fileno()).st_size
        body = _FileBody(handle, size, callbacks, cancelled)
        return cast(BinaryIO, body)  # file-like as botocore needs it: read, seek, tell

    def _finish_multipart(self, transfer: TransferFuture, key: str, size: int,
                          outer: Future[StoredObject]) -> None:
        try:
            transfer.result()
            stored = self._verified(key, size)
        except Exception as exc:  # s3transfer re-raises whatever the transfer hit
            outer.set_exception(_as_store_error(exc))
        else:
            outer.set_result(stored)

    def _verified(self, key: str, size: int) -> StoredObject:
        """The object as S3 has it, with the checksum S3 computed on receipt (and the ETag:
        a multipart upload's own reply, in s3transfer or the CRT, is not at hand)."""
        with _translated():
            head = self.client.head_object(Bucket=self._bucket, Key=key,
                                           ChecksumMode="ENABLED")
        checksum = head.get(self._checksum_field)
        return self._stored(checksum, head.get("ETag"), head["ContentLength"],
                            self.part_size(size))

    def put_bytes(self, key: str, body: bytes, content_type: str) -> Future[None]:
        return self._small_writes.submit(self._put_bytes, key, body, content_type)

    def _put_bytes(self, key: str, body: bytes, content_type: str) -> None:
        with _translated():
            self.client.put_object(Bucket=self._bucket, Key=key, Body=body,
                                   ContentType=content_type,
                                   **self._write_args())  # type: ignore[arg-type]

    def hurry(self, hurried: bool) -> None:
        self._pace.hurry(hurried)

    def close(self) -> None:
        """Cancel every transfer and return at once, without waiting for requests in flight.

        A request S3 holds (slow replies, a 60 s read timeout) must not stretch a stop past
        sync.stop_timeout; the CLI exits with os._exit, which joins no thread."""
        with self._lock:
            self._closing = True
            transfers = list(self._transfers)
        for transfer in transfers:
            transfer.cancel()
        self._single_part.shutdown(wait=False, cancel_futures=True)
        self._small_writes.shutdown(wait=False, cancel_futures=True)
        self._ranges.shutdown(wait=False, cancel_futures=True)
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        if not transfers:
            # s3transfer's shutdown waits for every transfer's requests: only when none run.
            self._manager.shutdown()

    def _managed_copy(self, copy_source: Any, key: str, args: dict[str, Any]) -> None:
        """s3transfer's multipart copy, counted among the transfers close() cancels (a stop
        never waits for a copy of tens of GB; s3transfer aborts its multipart upload)."""
        with self._lock:  # as an upload's: close() sees it, or it never begins
            if self._closing:
                raise CancelledError()
            transfer = self._manager.copy(copy_source, self._bucket, key, extra_args=args)
            self._transfers.add(transfer)
        try:
            transfer.result()
        finally:
            with self._lock:
                self._transfers.discard(transfer)

    def copies_in_parts(self, size: int) -> bool:
        return size > COPY_OBJECT_MAX

    def copy_if_match(self, source: str, key: str, etag: str, size: int) -> bool:
        # Invariant: the copy is of the version with this ETag or nothing. CopySourceIfMatch
        # goes with every request that reads the source: the one CopyObject, or s3transfer's
        # HEAD and every UploadPartCopy of an object too large for one.
        args: dict[str, Any] = {"CopySourceIfMatch": etag, **self._write_args()}
        copy_source: Any = {"Bucket": self._bucket, "Key": source}
        try:
            with _translated():
                # Asked first, and compared here: a store that ignores CopySourceIfMatch (moto,
                # some S3-compatible servers) would copy another version over a held copy of
                # the sealed one (a second crash in the same window).
                found = self.client.head_object(Bucket=self._bucket, Key=source)["ETag"]
                if found.strip('"') != etag.strip('"'):
                    return False
                if not self.copies_in_parts(size):
                    self.client.copy_object(Bucket=self._bucket, Key=key,
                                            CopySource=copy_source, **args)
                else:
                    self._managed_copy(copy_source, key, args)
        except ObjectMissing:
            return False
        except StoreError as exc:
            if exc.code in _PRECONDITION_CODES:
                return False
            raise
        return True

    # -- reading, listing, deleting ----------------------------------------------------------

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """A body that breaks off (a reset, a short read) is asked for again, as a range of a
        download is (ranged_get): botocore retries the request, never the reading of its body.
        A manifest read must not fail a restore over one dropped connection."""
        attempts = max(1, self._settings.max_attempts)
        for attempt in range(1, attempts + 1):
            with _translated():
                body = self.client.get_object(Bucket=self._bucket, Key=key)["Body"]
                try:
                    return body.read() if limit is None else body.read(limit)
                except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
                    if attempt == attempts:
                        raise StoreError(f"reading s3://{self._bucket}/{key}: {exc}") from exc
                finally:
                    body.close()  # unread bytes are dropped with the connection
        raise AssertionError("unreachable: the last attempt returns or raises")

    def download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                 expected: Expected | None = None) -> bool:
        return self._download_in_ranges(key, path, size, progress, expected)

    def _download_in_ranges(self, key: str, path: Path, size: int, progress: Progress | None,
                            expected: Expected | None,
                            cancelled: threading.Event | None = None) -> bool:
        """In ranged GETs on the store's range workers (one GET below the multipart
        threshold, unless its full-object CRC can be checked from its pieces). Checked on the
        way: a full-object checksum of an object fetched in one GET, or a CRC's of one fetched
        in pieces (combined from theirs), or a composite one, whose parts are fetched as the
        ranges."""
        if expected is not None and expected.part_size is not None:
            part_size = expected.part_size
        elif expected is not None and expected.splittable and size > PIECE_SIZE:
            part_size = PIECE_SIZE
        else:
            part_size = self.part_size(size) or max(size, 1)
        checking = expected if expected is not None and (
            expected.composite or expected.splittable or part_size >= size) else None
        try:
            with _translated():
                digests = self._ranged.download(
                    key, path, size, part_size, progress,
                    checking.new_digest if checking is not None else None, cancelled)
        except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:  # the body kept breaking off
            raise StoreError(f"{key}: {exc}") from exc
        if checking is None:
            return False
        if not checking.composite and len(digests) > 1:
            # Pieces of a full-object CRC. No match may also be a multipart object's composite
            # checksum that was recorded without its part count: left to reading the file
            # back, which tries both (checksums.file_matches) and finds a corrupt one.
            return checking.matches_pieces(digests, part_size, size)
        if not checking.matches(digests):
            raise ContentMismatch(f"{key}: checksum differs from the expected one")
        return True

    def start_download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                       expected: Expected | None = None) -> PendingDownload:
        cancelled = threading.Event()
        future = self._downloads.submit(self._download_in_ranges, key, path, size, progress,
                                        expected, cancelled)

        def cancel() -> None:  # one not yet begun never begins, one under way stops
            cancelled.set()
            future.cancel()

        return PendingDownload(future, cancel)

    def head(self, key: str, part_number: int | None = None) -> ObjectHead:
        extra: dict[str, Any] = {} if part_number is None else {"PartNumber": part_number}
        with _translated():
            head = self.client.head_object(Bucket=self._bucket, Key=key, **extra)
        checksum = head.get(self._checksum_field)
        return ObjectHead(head["ContentLength"], checksum if isinstance(checksum, str) else None)

    def list_objects(self, prefix: str) -> Iterator[ListedObject]:
        with _translated():
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self._bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ListedObject(item["Key"], item["Size"], item["LastModified"],
                                         item.get("ETag"))

    def delete(self, key: str) -> None:
        with _translated():
            self.client.delete_object(Bucket=self._bucket, Key=key)

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        """DeleteObjects in batches; a key its XML body cannot carry as it is goes alone."""
        failed: dict[str, str] = {}
        batched: list[str] = []
        for key in keys:
            if fits_xml(key):
                batched.append(key)
                continue
            try:
                self.delete(key)
            except StoreError as exc:  # refused: as DeleteObjects reports it; else raised
                if not exc.permanent:
                    raise
                failed[key] = str(exc)
        for start in range(0, len(batched), DELETE_BATCH):
            batch = batched[start:start + DELETE_BATCH]
            with _translated():
                response = self.client.delete_objects(Bucket=self._bucket, Delete={
                    "Objects": [{"Key": key} for key in batch], "Quiet": True})
            failed |= {error["Key"]: _refusal(error) for error in response.get("Errors", [])}
        return failed

    def open_uploads(self, prefix: str) -> list[OpenUpload]:
        uploads: list[OpenUpload] = []
        with _translated():
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self._bucket, Prefix=prefix):
                uploads += [OpenUpload(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        return uploads

    def abort_upload(self, upload: OpenUpload) -> bool:
        try:
            with _translated():
                self.client.abort_multipart_upload(Bucket=self._bucket, Key=upload.key,
                                                   UploadId=upload.upload_id)
        except ObjectMissing:
            return False  # completed or aborted since it was listed
        return True


class FileShrank(CancelledError):
    """The file ended before the size its request declared (truncated while it was sent)."""


class _WholeChunk(ReadFileChunk):
    """s3transfer's reader of (a part of) a file, which refuses to end short.

    Invariant: a request never waits for bytes its file no longer has. The request declares
    the file's size (a part's) when it is made; were the file truncated (a trainer rewriting
    it) and the body simply to end, S3 would wait for the missing bytes until the read
    timeout, and botocore send it again, as short, max_attempts times, holding the file (and
    a flush) for up to ten minutes. This ends the request at once as a CancelledError, which
    botocore neither wraps nor retries; the uploader then uploads the file's newer version."""

    def read(self, amount: int | None = None) -> bytes:
        data: bytes = super().read(amount)
        if not data and amount != 0 and self.tell() < len(self):
            raise FileShrank(f"the file ended after {self.tell()} of {len(self)} bytes")
        return data


class _FileBody(_WholeChunk):
    """A single PutObject's body, which a cancel stops too."""

    def __init__(self, handle: BinaryIO, size: int, callbacks: list[Callable[..., None]],
                 cancelled: threading.Event) -> None:
        super().__init__(handle, size, size, callbacks=callbacks, enable_callbacks=False)
        self.cancelled = cancelled

    def read(self, amount: int | None = None) -> bytes:
        if self.cancelled.is_set():
            raise CancelledError()
        return super().read(amount)


class _WholeParts(OSUtils):
    """s3transfer's file access, reading each part of a multipart upload as a _WholeChunk (a
    part read after its file was truncated would otherwise be sent short)."""

    def open_file_chunk_reader_from_fileobj(
            self, fileobj: Any, chunk_size: int, full_file_size: int,
            callbacks: Iterable[Callable[..., Any]],
            close_callbacks: Iterable[Callable[..., Any]] | None = None) -> ReadFileChunk:
        return _WholeChunk(fileobj, chunk_size, full_file_size, callbacks=callbacks,
                           enable_callbacks=False, close_callbacks=close_callbacks)


# What XML 1.0 may carry (its Char production) less carriage returns, which an XML parser
# turns into line feeds: a DeleteObjects body naming a key outside it is refused as a whole
# (MalformedXML), or would name another key.
_XML_SAFE = re.compile("[\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")


def fits_xml(key: str) -> bool:
    """Whether a DeleteObjects request can name the key (else DeleteObject takes it alone)."""
    return _XML_SAFE.fullmatch(key) is not None


def _as_store_error(exc: Exception) -> Exception:
    """What a transfer raised, as the PendingUpload contract has it."""
    if type(exc).__name__ == "CancelledError":  # s3transfer's own, or concurrent.futures'
        return CancelledError()
    if isinstance(exc, (BotoCoreError, ClientError)):
        return store_error(exc)
    return exc
