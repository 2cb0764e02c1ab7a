"""File transfers through the AWS Common Runtime (awscrt) S3 client, and the one factory that
picks a store by `transfer.client`.

CrtObjectStore is an S3ObjectStore whose file uploads and downloads go through the CRT's native
client, which splits files into parts, signs, checksums and retries on its own event-loop
threads and sizes its connection pool for a target throughput; everything else (listing, HEAD,
deletes, manifests through put_bytes, multipart clean-up) stays on the boto3 client.
botocore builds each request (endpoint, addressing style, SSE headers) as it would for itself,
through s3transfer's BotocoreCRTRequestSerializer, once per kind of request (see crt_requests);
the CRT signs and sends it.

The CRT's part buffers are left at its own default pool (2 GiB and up): a pool bounded by
what its connections can send (400 MiB at 10 Gbit/s) cut the RSS of a 4 x 256 MiB upload from
880 to 350 MiB, but any explicit bound, even 2 GiB, made a notice's flush up to half again as
long in the benchmark (time to safety), and that is what spotwatch is for.

What the CRT path cannot report: its retries happen inside the CRT, and awscrt's Python binding
(0.38.x) exposes no per-attempt outcome (aws-c-s3's telemetry callback is bound in Java, not in
Python; S3Client takes no retry strategy of ours), so S3 error metrics count each failed file
transfer once (with its final error), not each failed attempt as the classic path does.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import awscrt.exceptions
import awscrt.s3
import msgspec
from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from s3transfer.crt import (
    BotocoreCRTCredentialsWrapper,
    BotocoreCRTRequestSerializer,
    acquire_crt_s3_process_lock,
)

from spotwatch.aws.crt_requests import CrtRequests
from spotwatch.aws.instance_network import network_gbps
from spotwatch.aws.ranged_get import PIECE_SIZE
from spotwatch.aws.s3 import bucket_region, encryption_args, session_of
from spotwatch.aws.store import (
    ObjectStore,
    PendingDownload,
    PendingUpload,
    S3ObjectStore,
    StoredObject,
    StoreError,
    Throttle,
    store_error,
)
from spotwatch.checksums import ContentMismatch, Expected
from spotwatch.config import MAX_CONCURRENCY, TransferSettings
from spotwatch.keys import is_utf8
from spotwatch.limits import open_files_limit
from spotwatch.logs import get_logger
from spotwatch.progress import Progress

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = get_logger("spotwatch.transfer")

# The CRT's client sizes itself to fill the host's network alone, so `auto` uploads through it
# only in the one spotwatch process on the host holding this lock (see make_store for restore).
CRT_PROCESS_LOCK = "spotwatch"
# Without a figure for the instance type, the CRT targets 10 Gbit/s (as boto3 does).
DEFAULT_TARGET_GBPS = 10.0
# The CRT opens about one connection per this many Gbit/s of its target (counted through a
# proxy: 4 Gbit/s -> 10 connections, 10 -> 25, 20 -> 51).
GBPS_PER_CONNECTION = 0.4
# Connections a restore keeps at least. Small objects are fetched in a round trip each (S3
# answers after 20-30 ms), so 25 connections (10 Gbit/s) fetch under 1,000 of them a second;
# this many let the client's own work be the limit, as `s5cmd cp` (256 workers) does. Through
# a proxy holding each answer 20 ms, 1,500 files of 64 KiB restored in about 2.0 s with 128
# connections, 3.4 s with 25.
RESTORE_CONNECTIONS = 128
# Open files a restore leaves for everything but its connections and the files they write
# (the interpreter's own, the state lock and ledger, logs): it used some 40.
FDS_HELD_BACK = 128
# Under fewer open files than this the CRT fails requests (AWS_ERROR_MAX_FDS_EXCEEDED) even
# with one connection: its event loops and resolver take descriptors of their own. A restore of
# 300 files failed on it under a limit of 20 or 25 and passed at 32, and on the classic client
# with one worker at 20; such a store takes the classic client.
CRT_MIN_OPEN_FILES = 64
# Open files per transfer.max_concurrency worker. Uploads: single-part and multipart ones run
# max_concurrency each at once, each holding a connection and the file it reads. A restore:
# its downloads (the file, and a connection for a small one), its ranged GETs (a connection
# each) and the read-back checks of files the store could not check on the way. The CRT's
# store has the same pools, which capped uploads and parts too large for its buffers take.
FDS_PER_WORKER = 4
# What one S3 connection carries (85-90 MB/s), in Gbit/s: a restore's ranged GETs of large
# objects, each on a thread of its own, need target / this many threads to fill the target.
GBPS_PER_S3_CONNECTION = 0.7
# Reported to on_outcome: None for a transfer S3 completed, else its error's class.
Outcome = Callable[[str | None], None]
# botocore sets Content-MD5 unless told otherwise; the serializer removes this placeholder and
# the CRT adds its own checksum instead.
_NO_MD5 = "override-to-be-removed"
_CANCELED = "AWS_ERROR_S3_CANCELED"
# The CRT's default part pool is sized by the target throughput and refuses a larger part
# size (over 128 MiB at 1 Gbit/s, 1 GiB at 10), which S3 allows up to 5 GiB; such a part
# size gets a pool of this many parts (the CRT needs a little over two). A file whose parts
# s3transfer's adjuster raises past the pool's limit (10,000 parts of 128 MiB at 1 Gbit/s)
# goes through the classic client.
_PART_SIZE_OVER_POOL = "AWS_ERROR_S3_PART_SIZE_EXCEEDS_MEMORY_LIMIT"
PARTS_IN_OWN_POOL = 4
_CHECKSUM_MISMATCH = "AWS_ERROR_S3_RESPONSE_CHECKSUM_MISMATCH"
# The CRT's words for a file it could not read, as the OSErrors the uploader understands.
_FILE_ERRORS: dict[str, int] = {
    "AWS_ERROR_FILE_INVALID_PATH": errno.ENOENT,
    "AWS_ERROR_NO_PERMISSION": errno.EACCES,
    "AWS_ERROR_FILE_OPEN_FAILURE": errno.EIO,
}

# The CRT's names for S3's throttling and failures, as the classes the S3 metrics count (see
# aws.health.s3_error_class); others are counted under the CRT's own name.
_ERROR_CLASSES = {
    "AWS_ERROR_S3_SLOW_DOWN": "SlowDown",
    "AWS_ERROR_S3_INTERNAL_ERROR": "InternalError",
    "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": "RequestTimeTooSkewed",
    "AWS_IO_SOCKET_TIMEOUT": "ReadTimeout",
    "AWS_IO_SOCKET_CONNECTION_REFUSED": "ConnectionError",
    "AWS_IO_SOCKET_CLOSED": "ConnectionError",
    "AWS_ERROR_HTTP_CONNECTION_CLOSED": "ConnectionError",
    "AWS_ERROR_HTTP_SERVER_CLOSED": "ConnectionError",
}


def _nothing_to_cancel() -> None:
    pass


class _PartsOverPool(Exception):
    """The CRT refused a request whose part size its buffer pool cannot hold."""


def _crt_error(exc: RuntimeError) -> BaseException:
    """make_request's refusal ("44 (AWS_ERROR_FILE_INVALID_PATH): Invalid file path.") as
    the AwsCrtError the CRT would have ended the request with."""
    name = str(exc).partition("(")[2].partition(")")[0]
    return awscrt.exceptions.AwsCrtError(code=0, name=name, message=str(exc)) if name else exc


def put_object_args(settings: TransferSettings, size: int) -> dict[str, Any]:
    """The arguments botocore builds a CRT upload's request from."""
    return {"ContentLength": size, "ContentMD5": _NO_MD5,
            # Only names the algorithm (x-amz-sdk-checksum-algorithm); the CRT computes it.
            "ChecksumAlgorithm": settings.checksum_algorithm,
            **encryption_args(settings)}


def target_throughput_gbps(settings: TransferSettings) -> float:
    """The configured target, else the CRT's own for this instance type (400 on p4d and p5,
    600 on trn1.32xlarge ...), else the instance type's network bandwidth where the CRT has
    none (100 on a g5.48xlarge: instance_network), else 10 Gbit/s."""
    if settings.target_throughput is not None:
        return settings.target_throughput
    recommended = awscrt.s3.get_recommended_throughput_target_gbps()
    if recommended:
        return float(recommended)
    # Read from DMI on EC2's Nitro instances, else asked of IMDS once (and cached); off EC2,
    # None at once.
    known = network_gbps(awscrt.s3.get_ec2_instance_type())
    return max(known, DEFAULT_TARGET_GBPS) if known is not None else DEFAULT_TARGET_GBPS


def crt_connections(settings: TransferSettings) -> int:
    """How many connections the CRT opens for these settings (it sizes its pool by target)."""
    return max(1, round(target_throughput_gbps(settings) / GBPS_PER_CONNECTION))


def within_open_files(settings: TransferSettings, open_files: int, *,
                      crt: bool) -> TransferSettings:
    """The settings with no more connections than `open_files` descriptors carry:
    FDS_PER_WORKER for each transfer.max_concurrency worker, two for each of the CRT's
    connections (crt: the store is the CRT's; a socket and the file it reads or writes), and
    descriptors_held_back() for everything else. Unchanged where they fit (the usual case,
    the limit raised to the hard one: limits.raise_open_files_limit).

    The CRT opens a download's file only once its bytes come (a restore of 1,500 files with
    ~900 under way peaked at 248 descriptors), so files queued behind the connections take
    none."""
    budget = max(0, open_files - descriptors_held_back())
    connections = crt_connections(settings) if crt else 0
    if 2 * connections + FDS_PER_WORKER * settings.max_concurrency <= budget:
        return settings
    # The CRT's store: half the budget for the workers, half for the CRT's connections.
    workers = max(1, min(settings.max_concurrency,
                         budget // (FDS_PER_WORKER * (2 if crt else 1))))
    if not crt:
        return msgspec.structs.replace(settings, max_concurrency=workers)
    fitting = max(1, (budget - FDS_PER_WORKER * workers) // 2)
    # Half a connection under the count, so that the CRT's rounding up never adds one.
    return msgspec.structs.replace(
        settings, max_concurrency=workers,
        target_throughput=min(target_throughput_gbps(settings),
                              (fitting - 0.5) * GBPS_PER_CONNECTION))


def descriptors_held_back() -> int:
    """Open files kept for all but the transfers: FDS_HELD_BACK, and two for each of the CRT's
    event loops (one per core at most)."""
    return FDS_HELD_BACK + 2 * (os.cpu_count() or 1)


def restore_workers(settings: TransferSettings) -> int:
    """How many ranged GETs of large objects a restore runs at once: enough S3 connections to
    fill the target throughput (the configured one, else the instance type's: 400 Gbit/s on a
    p4d or p5 takes MAX_CONCURRENCY, 256), never fewer than transfer.max_concurrency. Without
    an instance type's figure that is max_concurrency: 10 Gbit/s take 14 connections."""
    wanted = round(target_throughput_gbps(settings) / GBPS_PER_S3_CONNECTION)
    return max(settings.max_concurrency, min(wanted, MAX_CONCURRENCY))


def for_restore(settings: TransferSettings) -> TransferSettings:
    """The settings a restore downloads with.

    - Without a configured target throughput, one for at least RESTORE_CONNECTIONS of the
      CRT's connections (a restore's many small GETs are bound by S3's latency, not its
      bandwidth). A configured target is kept as it is.
    - max_concurrency: restore_workers, for the ranged GETs of objects over the multipart
      threshold (on Python threads, see store.S3ObjectStore), which at 20 would hold a
      restore on a p5 to some 1.7 GB/s (20 connections of S3's 85-90 MB/s).
    Both only as far as the open-files limit lets them (make_store)."""
    target = settings.target_throughput
    if target is None:
        target = max(target_throughput_gbps(settings), RESTORE_CONNECTIONS * GBPS_PER_CONNECTION)
    return msgspec.structs.replace(settings, max_concurrency=restore_workers(settings),
                                   target_throughput=target)


def make_store(client: S3Client, bucket: str, settings: TransferSettings,
               on_outcome: Outcome | None = None,
               throttle: Throttle | None = None, *, uploads: bool = True) -> ObjectStore:
    """The store for `transfer.client`: the CRT's (auto: wherever awscrt can be used) or the
    classic s3transfer one. on_outcome hears of every CRT transfer's end (for S3 metrics);
    throttle is the bandwidth cap on uploads (None: none). Its connections stay within the
    open-files limit (within_open_files): on a p4d the CRT keeps hundreds open for a notice's
    flush of large shards, each with the file its part is read from, and a thousand for a
    restore of many small files.

    uploads: False for a store that only downloads (a restore). Under `auto` it takes the CRT
    whichever process holds the host's CRT lock, and leaves the lock alone:
    - the lock is there so that one process on a host sizes the CRT to the NIC (boto3's rule);
      a restore's downloads and a running daemon's uploads go opposite ways over it;
    - taken by a restore, the lock would send a daemon started meanwhile to the classic
      client for its whole run;
    - beside a daemon, a restore on the classic client fetched 2,000 small files in 3.4 s
      against 1.3 s on the CRT (local object store, 2 cores).
    Two restores at once on one host each size a CRT to the NIC (128 connections at least),
    as each would alone. Under an open-files limit below CRT_MIN_OPEN_FILES, `crt` and `auto`
    take the classic client, and say so."""
    limit = open_files_limit()
    too_few_files = settings.uses_crt and limit < CRT_MIN_OPEN_FILES
    crt = settings.uses_crt and not too_few_files and (
        settings.client == "crt" or not uploads or _holds_crt_process_lock())
    settings = _fitted(settings, crt, limit, crt_refused=too_few_files)
    if crt:
        log.debug("transfer_client", client="crt", configured=settings.client,
                 target_gbps=target_throughput_gbps(settings))
        return CrtObjectStore(client, bucket, settings, on_outcome=on_outcome,
                              throttle=throttle)
    reason = ("too few open files for the CRT" if too_few_files
              else "another spotwatch process on this host uses the CRT" if settings.uses_crt
              else None)
    log.debug("transfer_client", client="classic", configured=settings.client, reason=reason)
    return S3ObjectStore(client, bucket, settings, throttle)


def _fitted(settings: TransferSettings, crt: bool, limit: int, *,
            crt_refused: bool) -> TransferSettings:
    """within_open_files under this process's limit. What the limit cost (the CRT refused
    for too few open files, fewer workers or connections) is said in one warning."""
    fitted = within_open_files(settings, limit, crt=crt)
    if crt_refused:
        log.warning("open_files_limit_low", limit=limit, client="classic",
                    workers=fitted.max_concurrency,
                    reason=f"the CRT needs at least {CRT_MIN_OPEN_FILES} open files",
                    action="the classic client instead; raise the hard limit (ulimit -Hn, "
                           "LimitNOFILE) for the CRT")
    elif fitted != settings:
        log.warning("open_files_limit_low", limit=limit, workers=fitted.max_concurrency,
                    connections=crt_connections(fitted) if crt else None,
                    action="fewer connections; raise the hard limit (ulimit -Hn, "
                           "LimitNOFILE) for more")
    return fitted


def _holds_crt_process_lock() -> bool:
    return acquire_crt_s3_process_lock(CRT_PROCESS_LOCK) is not None


class CrtObjectStore(S3ObjectStore):
    """An S3ObjectStore whose file uploads and downloads go through one CRT S3 client.

    The CRT reads files and reports progress on its own event-loop threads, where a sender
    cannot be held back without stalling every transfer; so while a bandwidth cap (throttle)
    is in force, uploads take the classic path, which the cap paces, and once it is lifted
    (a notice, a flush) new uploads go through the CRT at full speed.
    """

    def __init__(self, client: S3Client, bucket: str, settings: TransferSettings, *,
                 on_outcome: Outcome | None = None, throttle: Throttle | None = None) -> None:
        super().__init__(client, bucket, settings, throttle)
        self._on_outcome = on_outcome
        self._crt: CrtClient | None = None  # made on the first CRT transfer
        self._crt_lock = threading.Lock()
        self._requests: set[awscrt.s3.S3Request] = set()
        self._requests_lock = threading.Lock()

    @property
    def downloads_at_once(self) -> int:
        return crt_connections(self._settings)

    def crt(self) -> CrtClient:
        """The CRT's client, made on first use (from any of the threads that start
        transfers): a restore whose files are all ranged GETs never needs it."""
        crt = self._crt
        if crt is None:
            with self._crt_lock:
                if self._crt is None:
                    self._crt = CrtClient(self.client, self._bucket, self._settings)
                crt = self._crt
        return crt

    # -- uploads -----------------------------------------------------------------------------

    def upload_file(self, path: Path, key: str, size: int,
                    progress: Progress | None = None) -> PendingUpload:
        """One CRT request: a single PutObject below the threshold, parts from it on. The
        checksum S3 verified comes from the PutObject reply, else (multipart) a HEAD."""
        part_size = self.part_size(size)
        if self._throttle is not None and not self._throttle.lifted:
            return super().upload_file(path, key, size, progress)
        outer: Future[StoredObject] = Future()
        received: dict[str, str] = {}

        def keep_headers(status_code: int, headers: list[tuple[str, str]],
                         **kwargs: Any) -> None:
            received.update((name.lower(), value) for name, value in headers)

        def finished(error: BaseException | None, validated: bool) -> None:
            # On the CRT's event-loop thread, which must not wait on S3: a reply that carries
            # S3's checksum completes here, a HEAD (or an error's parsing) runs elsewhere.
            checksum = None if error is not None else self._checksum_in_reply(size, received)
            if checksum:
                outer.set_result(self._stored(checksum, received.get("etag")))
                return
            with suppress(RuntimeError):  # after close nobody waits any more
                self._finisher.submit(self._finish_upload, error, key, size, received, outer)

        try:
            cancel = self._start(
                "put_object", key, put_object_args(self._settings, size), finished, progress,
                type=awscrt.s3.S3RequestType.PUT_OBJECT, send_filepath=str(path),
                # In a header, not a trailer: S3 verifies either, but the trailer's aws-chunked
                # encoding is not spoken by every S3-compatible store (SeaweedFS refuses it).
                checksum_config=awscrt.s3.S3ChecksumConfig(
                    algorithm=awscrt.s3.S3ChecksumAlgorithm[self._settings.checksum_algorithm],
                    location=awscrt.s3.S3ChecksumLocation.HEADER),
                # The part size we record for the checksum is the one the CRT uses: it is
                # within S3's 10,000 parts already (s3transfer's adjuster), so the CRT keeps it.
                part_size=part_size or self._settings.multipart_chunksize,
                # The CRT's threshold is the largest single request; ours the smallest
                # multipart.
                multipart_upload_threshold=max(1, self._settings.multipart_threshold - 1),
                on_headers=keep_headers)
        except _PartsOverPool:
            # A file so large that s3transfer's adjuster raised its parts past what the pool
            # (sized for the configured part size) holds: the classic client sends it.
            log.debug("transfer_client", client="classic", key=key, part_size=part_size,
                      reason="part size over the CRT's pool")
            return super().upload_file(path, key, size, progress)
        if not self.uses_multipart(size):
            # Invariant (ObjectStore.upload_file): the future ends only once no request of the
            # upload can still change the object. Cancelling a PutObject whose body the CRT
            # has sent ends it at once while S3 may still apply it, after the new version's
            # upload or the stray object's removal: so a single PutObject is left to its
            # response (or a connection error), as s3transfer's would be; close() still cuts
            # it for a stop. Parts cancelled before CompleteMultipartUpload leave no object
            # (the CRT aborts the upload), and the CRT waits for a Complete in flight.
            return PendingUpload(outer, _nothing_to_cancel)
        return PendingUpload(outer, cancel)

    def _finish_upload(self, error: BaseException | None, key: str, size: int,
                       headers: dict[str, str], outer: Future[StoredObject]) -> None:
        try:
            if error is not None:
                raise self._translated(error)
            checksum = self._checksum_in_reply(size, headers)
            stored = (self._stored(checksum, headers.get("etag")) if checksum
                      else self._verified(key, size))
        except BaseException as exc:  # whoever waits on outer gets it
            outer.set_exception(exc)
        else:
            outer.set_result(stored)

    def _checksum_in_reply(self, size: int, headers: dict[str, str]) -> str | None:
        """The checksum S3 computed, from a single PutObject's reply (a multipart upload's
        reply has none of the whole object: a HEAD asks for it)."""
        if self.uses_multipart(size):
            return None
        return headers.get(f"x-amz-checksum-{self._settings.checksum_algorithm.lower()}")

    # -- downloads ---------------------------------------------------------------------------

    def download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                 expected: Expected | None = None) -> bool:
        return self.start_download(key, path, size, progress, expected).future.result()

    def start_download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                       expected: Expected | None = None) -> PendingDownload:
        """A (non-empty) object below the multipart threshold: one CRT GetObject straight
        into path, checked by the CRT against the expected full-object checksum as it arrives;
        no thread waits on it. A larger one, or one over two pieces (ranged_get.PIECE_SIZE)
        whose full-object CRC can be checked from its pieces: the classic store's ranged GETs,
        which on the benchmark's server were faster than the CRT's (a single GET takes a
        connection, some 90 MB/s on S3, per object) and check a composite checksum part by
        part."""
        # An empty object: the CRT's GET with an expected checksum asks for a range, which
        # S3 refuses for no bytes (InvalidRange).
        # A path that is not UTF-8 (a name in another encoding): the CRT takes text paths only.
        if size == 0 or self.uses_multipart(size) or not is_utf8(str(path)) or (
                expected is not None and expected.splittable and size > 2 * PIECE_SIZE):
            return super().start_download(key, path, size, progress, expected)
        done: Future[bool] = Future()
        checking = expected if expected is not None and not expected.composite \
            and expected.algorithm in awscrt.s3.S3ChecksumAlgorithm.__members__ else None

        def finished(error: BaseException | None, validated: bool) -> None:
            # On the CRT's event-loop thread, settled here (a stat, or an error's parsing):
            # no pool that close() may shut down stands between the CRT and the caller.
            if error is None:
                self._settle_download(key, path, size, validated and checking is not None, done)
            else:
                self._fail_download(key, error, done)

        cancel = self._start("get_object", key, {}, finished, progress,
                             type=awscrt.s3.S3RequestType.GET_OBJECT, recv_filepath=str(path),
                             checksum_config=_expecting(checking))
        return PendingDownload(done, cancel)

    @staticmethod
    def _settle_download(key: str, path: Path, size: int, checked: bool,
                         done: Future[bool]) -> None:
        try:
            received = os.stat(path).st_size
        except OSError as exc:
            done.set_exception(exc)
            return
        if received != size:
            done.set_exception(
                ContentMismatch(f"{key}: the object has {received} bytes, the listing {size}"))
        else:
            done.set_result(checked)

    def _fail_download(self, key: str, error: BaseException, done: Future[bool]) -> None:
        translated = self._translated(error)
        if isinstance(translated, ContentMismatch):
            translated = ContentMismatch(f"{key}: {translated}")
        translated.__cause__ = error
        done.set_exception(translated)

    # -- the CRT's requests ------------------------------------------------------------------

    def _start(self, operation: str, key: str, args: dict[str, Any],
               finished: Callable[[BaseException | None, bool], None],
               progress: Progress | None, **request: Any) -> Callable[[], None]:
        """Send one request through the CRT; finished(error, whether the CRT validated the
        response's checksum) runs once it ended. Returns what cancels it."""
        crt = self.crt()
        http = crt.requests.request(operation, key, args)
        handle: list[awscrt.s3.S3Request] = []

        def on_done(error: BaseException | None = None, did_validate_checksum: bool = False,
                    **kwargs: Any) -> None:
            with self._requests_lock:
                self._requests.difference_update(handle)
            # The request holds this callback and it held the request: a cycle that only the
            # cyclic collector's rare full collections freed, with the CRT's native state.
            handle.clear()
            self._report(error)
            finished(error, did_validate_checksum)

        def on_progress(progress_bytes: int, **kwargs: Any) -> None:
            if progress is not None:
                progress(progress_bytes)

        with self._requests_lock:
            try:
                crt_request = crt.client.make_request(request=http, on_done=on_done,
                                                      on_progress=on_progress, **request)
            except RuntimeError as exc:  # refused at once, e.g. the file is gone
                crt_request = None
                refused = _crt_error(exc)
            else:
                handle.append(crt_request)
                if not crt_request.finished_future.done():
                    self._requests.add(crt_request)
        if crt_request is None:
            if getattr(refused, "name", None) == _PART_SIZE_OVER_POOL:
                raise _PartsOverPool(str(refused))
            finished(refused, False)
            return _nothing_to_cancel
        return crt_request.cancel  # type: ignore[no-any-return]

    def _translated(self, error: BaseException) -> BaseException:
        """A CRT error as the ObjectStore contract has it: CancelledError, or StoreError."""
        if isinstance(error, awscrt.exceptions.AwsCrtError) and error.name == _CANCELED:
            return CancelledError()
        if isinstance(error, awscrt.exceptions.AwsCrtError) and error.name == _CHECKSUM_MISMATCH:
            return ContentMismatch(f"checksum differs from the expected one ({error.message})")
        if isinstance(error, awscrt.s3.S3ResponseError):
            with suppress(Exception):  # botocore's parser; its own message when it can't
                parsed = self.crt().serializer.translate_crt_exception(error)
                if isinstance(parsed, ClientError):
                    return store_error(parsed)
            return StoreError(str(error), permanent=400 <= error.status_code < 500)
        if isinstance(error, awscrt.exceptions.AwsCrtError):
            number = _FILE_ERRORS.get(error.name)
            if number is not None:  # OSError picks the subclass (PermissionError ...)
                return OSError(number, os.strerror(number))
            return StoreError(f"{error.name}: {error.message}")
        return error

    def _report(self, error: BaseException | None) -> None:
        if self._on_outcome is None:
            return
        if error is None:
            self._on_outcome(None)
            return
        translated = self._translated(error)
        if isinstance(translated, (CancelledError, OSError, ContentMismatch)):
            return  # ours or the file's, not S3's
        code = translated.code if isinstance(translated, StoreError) else None
        name = str(getattr(error, "name", type(error).__name__))
        self._on_outcome(code or _ERROR_CLASSES.get(name, name))

    def close(self) -> None:
        """Cancel every CRT request and return at once; the CRT's threads wind down on their
        own (the CLI exits with os._exit, which waits for none of them)."""
        with self._requests_lock:
            requests = list(self._requests)
        for request in requests:
            request.cancel()
        super().close()


class CrtClient:
    """The CRT's S3 client and the serializer its requests are built with (through botocore,
    a second client of the S3 model: 3 ms of a store's start, together with the CRT's)."""

    def __init__(self, client: S3Client, bucket: str, settings: TransferSettings) -> None:
        endpoint = client.meta.endpoint_url
        # The CRT neither follows S3's redirect to a bucket's own region, as botocore does,
        # nor signs for it: a bucket in another region (aws.allow_cross_region) would refuse
        # every CRT request made for the client's.
        region = bucket_region(client, bucket) or client.meta.region_name
        # One session for the client, the serializer and the CRT: credentials resolved once,
        # and the CRT signs with the very ones the client does, as they are refreshed.
        session = session_of(client)
        self.client = _crt_client(region, settings, session.get_credentials(),
                                  use_tls=endpoint.startswith("https:"))
        self.serializer = BotocoreCRTRequestSerializer(session, {
            "region_name": region, "endpoint_url": endpoint,
            "config": BotoConfig(s3=getattr(client.meta.config, "s3", None))})
        self.requests = CrtRequests(self.serializer, bucket)


def _expecting(expected: Expected | None) -> awscrt.s3.S3ChecksumConfig:
    """What a GET validates: the expected full-object checksum, else whatever S3 reports."""
    if expected is None:
        return awscrt.s3.S3ChecksumConfig(validate_response=True)
    return awscrt.s3.S3ChecksumConfig(
        validate_response=True, expected_checksum=expected.encoded,
        expected_checksum_algorithm=awscrt.s3.S3ChecksumAlgorithm[expected.algorithm])


def _crt_client(region: str, settings: TransferSettings, credentials: Credentials | None, *,
                use_tls: bool) -> awscrt.s3.S3Client:
    """The CRT's S3 client, signing with these botocore credentials (read afresh for every
    request, so a refresh of them reaches the CRT); None: unsigned."""
    provider = (BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider()
                if credentials is not None else None)
    event_loops = EventLoopGroup()
    bootstrap = ClientBootstrap(event_loops, DefaultHostResolver(event_loops))
    options: dict[str, Any] = {
        "bootstrap": bootstrap, "region": region, "credential_provider": provider,
        "tls_mode": (awscrt.s3.S3RequestTlsMode.ENABLED if use_tls
                     else awscrt.s3.S3RequestTlsMode.DISABLED),
        "part_size": settings.multipart_chunksize,
        "multipart_upload_threshold": settings.multipart_threshold,
        "throughput_target_gbps": target_throughput_gbps(settings),
        "retry_config": awscrt.s3.S3RetryConfig(max_retries=settings.max_attempts - 1),
        "enable_s3express": True}
    try:
        return awscrt.s3.S3Client(**options)
    except RuntimeError as exc:
        if _PART_SIZE_OVER_POOL not in str(exc):
            raise
    # Only then a pool of our own (any explicit bound slowed the flush, see above).
    return awscrt.s3.S3Client(
        **options, memory_limit=PARTS_IN_OWN_POOL * settings.multipart_chunksize)
