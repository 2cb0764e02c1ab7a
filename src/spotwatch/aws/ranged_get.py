"""Downloading an object in ranged GETs straight into its file, digesting each part on the way.

A range is one or more whole parts (range_size), and its worker takes each part's digest, which
is what a composite checksum is over. Each range is fetched by one worker, which reads the
response in chunks and writes each chunk at its offset (os.pwrite), digesting it first: the
bytes pass through Python once, and no single thread puts writes back into order (s3transfer
sends every write through one I/O thread, which held restores of large shards to half the speed
of `s5cmd cp`).

Where it can, a worker reads the response straight off the http.client response beneath
botocore's and urllib3's (see _raw_response) into one buffer it keeps: reading through them
makes two new 1 MiB objects and two more copies per chunk (a prototype took 0.8 CPU-seconds
per GiB straight off, 1.5-1.75 through them).

Every range must bring exactly its bytes, and the object must still have the size it was
listed with: otherwise the download fails with ContentMismatch (the object changed, or is not
the one expected), never with a file of another length.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Executor, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from botocore.exceptions import (
    ClientError,
    FlexibleChecksumError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.response import StreamingBody
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS
from urllib3.response import HTTPResponse as Urllib3Response

from spotwatch.checksums import ContentMismatch, Digest, PartDigests
from spotwatch.progress import Progress

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Read from a response this much at a time: large enough that per-call overhead vanishes,
# small enough that a chunk is still in the core's cache (1 MiB of L2 on the benchmark's
# machine) when it is digested and then copied into the page cache. 4 x 1 GiB restored in
# 4.2 s with 256 KiB, 4.5 s with 512 KiB, 4.9 s with 1 MiB (medians of 5; 128 KiB: 5.1).
READ_CHUNK = 256 << 10
# Write to the file at most this much at a time (as `s5cmd cp` writes). On a virtual machine
# whose host takes freed memory back (free page reporting), writing 1 GiB into the page cache
# in 1 MiB writes cost 2.0-2.2 system CPU-seconds, in 32 KiB writes 0.33-0.36; large writes
# get large page-cache folios, likely from the large free blocks the host took. (In other
# memory states the write size made no difference.)
WRITE_SLICE = 32 << 10
# The most one ranged GET fetches (s5cmd fetches 50 MiB parts).
MAX_RANGE = 64 << 20
# The pieces an object with a full-object CRC is digested in when it is fetched in ranges
# (checksums.Expected.matches_pieces): a range is one or more of them. S3 carries some 90 MB/s
# per connection, so a 48 MiB object fetched in one GET takes over half a second; in 8 MiB
# ranges, a sixth of that.
PIECE_SIZE = 8 << 20
_TOTAL_SIZE = re.compile(r"/(\d+)$")  # Content-Range: bytes 0-99/1234


@dataclass(frozen=True)
class ByteRange:
    start: int
    length: int

    @property
    def header(self) -> str:
        return f"bytes={self.start}-{self.start + self.length - 1}"


class Ranges(Sequence[ByteRange]):
    """Consecutive ranges of part_size covering size bytes (one empty range for an empty
    object, which is fetched whole), each made when asked for: the size is the listing's (or
    a manifest's), and one that claims exabytes costs nothing before the first response
    shows the object's real size."""

    def __init__(self, size: int, part_size: int) -> None:
        self._size = size
        self._part_size = part_size

    def __len__(self) -> int:
        return max(1, -(-self._size // self._part_size))

    @overload
    def __getitem__(self, index: int) -> ByteRange: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ByteRange]: ...

    def __getitem__(self, index: int | slice) -> ByteRange | Sequence[ByteRange]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        start = (index % len(self)) * self._part_size
        return ByteRange(start, min(self._part_size, self._size - start))


def split(size: int, part_size: int) -> Ranges:
    """The ranges of an object of size bytes, part_size each (see Ranges)."""
    return Ranges(size, part_size)


def range_size(size: int, part_size: int, workers: int) -> int:
    """How much one ranged GET fetches: whole parts (a composite checksum is over their
    digests), as many as keep at least `workers` ranges for the object, up to MAX_RANGE.
    Each GET costs about a millisecond of client CPU (and some of the server's): 64 MiB ranges
    instead of 16 MiB took about 0.3 user CPU-seconds off a 4 x 1 GiB restore. A single
    object still spreads over every worker, as on S3 each connection carries only some
    90 MB/s."""
    parts_per_range = max(1, min(MAX_RANGE // part_size, size // (part_size * max(1, workers))))
    return part_size * parts_per_range


def _parts(digest: Callable[[], Digest] | None,
           part_size: int) -> Callable[[], PartDigests] | None:
    if digest is None:
        return None
    return lambda: PartDigests(digest, part_size)


class _BodyBroke(Exception):
    """The response's body stopped arriving (with what reading it raised)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Shares:
    """The workers' even shares among the downloads that take them (ceil(workers / downloads);
    all of them for a download alone). A share is a bound on starting ranges: a download
    over it, as the first of several is once the others join, starts none until it is back
    under it."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._downloads = 0
        self._lock = threading.Lock()

    def join(self) -> None:
        with self._lock:
            self._downloads += 1

    def leave(self) -> None:
        with self._lock:
            self._downloads -= 1

    def each(self) -> int:
        with self._lock:
            return max(1, -(-self._workers // max(1, self._downloads)))


class RangedGetter:
    """Downloads objects of one bucket in ranges, on the given executor's workers (how many).

    attempts: how often a range is tried when its response breaks off mid-body. Only then:
    botocore has already retried the request itself (max_attempts), and trying its failures
    again here would multiply the attempts a stalled server gets."""

    def __init__(self, client: S3Client, bucket: str, executor: Executor, workers: int,
                 attempts: int) -> None:
        self._client = client
        self._bucket = bucket
        self._executor = executor
        self._workers = workers
        self._attempts = max(1, attempts)
        self._shares = _Shares(workers)

    def download(self, key: str, path: Path, size: int, part_size: int,
                 progress: Progress | None, digest: Callable[[], Digest] | None,
                 cancelled: threading.Event | None = None) -> list[bytes]:
        """Write the object (of this size) to path; returns the digest of each part of
        part_size in order (none without a digest factory). A range spans one or more parts
        (range_size). One range is fetched on the calling thread, several on the executor,
        up to the download's share of its workers at a time (_fetch_all). Once `cancelled` is
        set, every range stops at its next chunk (CancelledError)."""
        ranges = split(size, range_size(size, part_size, self._workers))
        # Not truncated on opening: truncating a file that exists (a temporary a stopped
        # restore left) has ext4 start writing all of it back when it is closed
        # (auto_da_alloc), which the download then waits for (10-60 ms per 256 MiB). What a
        # longer file held beyond the object is cut off once the object is written.
        # Never through a symlink: it could lead anywhere (see sync.restore.destination.cleared).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        target = _File(fd, cancelled or threading.Event())
        parts = _parts(digest, part_size)
        try:
            if len(ranges) == 1:
                digests = self._fetch(key, target, ranges[0], size, True, progress, parts)
            else:
                digests = self._fetch_all(key, target, ranges, size, progress, parts)
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
            return digests
        finally:
            os.close(fd)

    def _fetch_all(self, key: str, target: _File, ranges: Ranges, size: int,
                   progress: Progress | None, parts: Callable[[], PartDigests] | None
                   ) -> list[bytes]:
        """The digests of every range's parts, in order. The ranges run on the executor, at
        most the download's share of the workers at a time (_Shares): a file takes one write
        at a time, and 20 workers queued on the first of four 1 GiB shards made a restore up
        to 15% slower than five on each on the benchmark's machine (no slower in one A/B run
        of five); on a p5, all 256 would wait on one file. On the first failure no more
        ranges start, those under way are cancelled or awaited (none still writes to the file
        once it is closed), and the failure is raised."""
        results: dict[int, list[bytes]] = {}  # by range: never one slot per range ahead
        under_way: dict[Future[list[bytes]], int] = {}
        started = 0
        self._shares.join()
        sharing = True
        try:
            while started < len(ranges) or under_way:
                while started < len(ranges) and len(under_way) < self._shares.each():
                    if sharing and started == len(ranges) - 1:
                        # Its last ranges need no more workers than they have: the others
                        # may take the rest. Given up before the last is handed over, so
                        # whoever sees that range start sees the share given up too.
                        self._shares.leave()
                        sharing = False
                    under_way[self._submit(key, target, ranges[started], size, progress,
                                           parts)] = started
                    started += 1
                done, _ = wait(under_way, return_when=FIRST_COMPLETED)
                for future in done:
                    results[under_way.pop(future)] = future.result()
        except BaseException:
            for future in under_way:
                future.cancel()
            wait(under_way)
            raise
        finally:
            if sharing:
                self._shares.leave()
        return [part for index in range(len(ranges)) for part in results[index]]

    def _submit(self, key: str, target: _File, byte_range: ByteRange, size: int,
                progress: Progress | None, parts: Callable[[], PartDigests] | None
                ) -> Future[list[bytes]]:
        try:
            return self._executor.submit(self._fetch, key, target, byte_range, size, False,
                                         progress, parts)
        except RuntimeError as exc:  # shut down (the store closed): as a range cancelled
            raise CancelledError() from exc

    def _fetch(self, key: str, target: _File, byte_range: ByteRange, size: int, whole: bool,
               progress: Progress | None, parts: Callable[[], PartDigests] | None
               ) -> list[bytes]:
        """One range into the file, tried again from its start when the body breaks off
        (the last attempt's error is raised); progress is taken back for a broken attempt."""
        for attempt in range(1, self._attempts + 1):
            received = [0]
            try:
                return self._fetch_once(key, target, byte_range, size, whole,
                                        _counted(progress, received), parts)
            except _BodyBroke as broke:
                if progress is not None:
                    progress(-received[0])
                if attempt == self._attempts:
                    raise broke.cause from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _fetch_once(self, key: str, target: _File, byte_range: ByteRange, size: int, whole: bool,
                    progress: Progress, parts: Callable[[], PartDigests] | None) -> list[bytes]:
        if target.cancelled.is_set():  # a range begun after the download was cancelled
            raise CancelledError()
        args: dict[str, Any] = {} if whole else {"Range": byte_range.header}
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=key, **args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                raise ContentMismatch(f"{key}: the object ends before byte {byte_range.start} "
                                      f"of the {size} bytes listed") from None
            raise
        _check_size(key, response, size)
        body = response["Body"]
        state = parts() if parts is not None else None
        raw = _raw_response(body, checked_here=state is not None)
        chunks = _read_raw(raw, key, byte_range) if raw is not None else _read_body(body, key)
        offset, end = byte_range.start, byte_range.start + byte_range.length
        try:
            for chunk in chunks:
                if target.cancelled.is_set():
                    raise CancelledError()
                if offset + len(chunk) > end:
                    raise ContentMismatch(f"{key}: more bytes than the range asked for")
                if state is not None:
                    state.update(chunk)
                target.write_at(chunk, offset)
                offset += len(chunk)
                progress(len(chunk))
        finally:
            body.close()  # drops the connection unless it was read to its end and handed back
            if raw is not None:
                raw.release_conn()  # as urllib3 does after an error: the pool reconnects it
        if offset != end:
            raise ContentMismatch(f"{key}: {end - offset} bytes short of the listed size")
        return state.digests() if state is not None else []


def _raw_response(body: Any, checked_here: bool) -> Urllib3Response | None:
    """urllib3's response beneath botocore's body, when its bytes may be read straight off the
    http.client response beneath it: nothing would decode them (no Content-Encoding), and
    skipping botocore loses no check (its plain body, or the caller digests the bytes)."""
    if not checked_here and type(body) is not StreamingBody:
        return None
    response = getattr(body, "_raw_stream", None)
    if not isinstance(response, Urllib3Response) or response.headers.get("content-encoding"):
        return None
    return response if isinstance(getattr(response, "_fp", None),
                                  http.client.HTTPResponse) else None


_buffers = threading.local()


def _read_raw(response: Urllib3Response, key: str,
              byte_range: ByteRange) -> Iterator[memoryview]:
    """The response's bytes in chunks of one buffer this thread keeps (each chunk is valid
    until the next is asked for). http.client stops at the response's Content-Length, which
    must be the range's; a body that ends before it (closed early, or broken off) is
    _BodyBroke, as botocore's own read would have it. Read to its end, the connection goes
    back to urllib3's pool."""
    raw: http.client.HTTPResponse = response._fp  # type: ignore[assignment]
    if raw.length is not None and raw.length != byte_range.length:
        raise ContentMismatch(f"{key}: the response has {raw.length} bytes, the range "
                              f"{byte_range.length}")
    buffer: memoryview | None = getattr(_buffers, "chunk", None)
    if buffer is None:
        buffer = _buffers.chunk = memoryview(bytearray(READ_CHUNK))
    received = 0
    while True:
        try:
            count = raw.readinto(buffer)
        except (http.client.HTTPException, OSError) as exc:
            raise _BodyBroke(ResponseStreamingError(error=exc)) from exc
        if not count:
            break
        received += count
        yield buffer[:count]
    if raw.length:  # http.client ends a body closed early without a word
        raise _BodyBroke(IncompleteReadError(actual_bytes=received,
                                             expected_bytes=byte_range.length))
    if raw.isclosed():
        response.release_conn()


def _read_body(body: Any, key: str) -> Iterator[bytes]:
    """The response's bytes through botocore's body, which checks a checksum S3 sent."""
    try:
        while chunk := body.read(READ_CHUNK):
            yield chunk
    except FlexibleChecksumError as exc:
        raise ContentMismatch(f"{key}: checksum differs from S3's: {exc}") from exc
    except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
        raise _BodyBroke(exc) from exc


class _File:
    """The file a download writes, one write at a time: the kernel serialises writes to one
    file anyway, and threads queued on its lock spin (costing CPU, twice `s5cmd cp`'s for
    1 GiB in 20 ranges) where threads queued on this lock sleep. cancelled: set when the
    download is no longer wanted."""

    def __init__(self, fd: int, cancelled: threading.Event) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.cancelled = cancelled

    def write_at(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        with self._lock:
            while view:
                written = os.pwrite(self._fd, view[:WRITE_SLICE], offset)
                view, offset = view[written:], offset + written


def _counted(progress: Progress | None, received: list[int]) -> Progress:
    """progress, also adding up the bytes into received[0]."""
    def count(size: int) -> None:
        received[0] += size
        if progress is not None:
            progress(size)
    return count


def _check_size(key: str, response: Any, size: int) -> None:
    """The object as S3 serves it now must have the listed size."""
    content_range = response.get("ContentRange")
    match = _TOTAL_SIZE.search(content_range) if isinstance(content_range, str) else None
    total = int(match.group(1)) if match else response.get("ContentLength")
    if total != size:
        raise ContentMismatch(f"{key}: the object has {total} bytes, the listing {size}")
