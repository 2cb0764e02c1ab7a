"""An ObjectStore in memory, with injected faults and held calls, and a clock tests advance.

For fast unit tests of failure paths (the engine, sealer, retry queue, restore); the S3 store
itself is tested against moto over HTTP. Checksums are CRC32 as S3 reports them (base64 of the
big-endian digest), so restore verifies downloads exactly as it does against S3.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from spotwatch.aws.store import (
    ListedObject,
    ObjectHead,
    ObjectMissing,
    OpenUpload,
    PendingDownload,
    PendingUpload,
    StoredObject,
    StoreError,
)
from spotwatch.checksums import Expected
from spotwatch.progress import Progress

_WRITES = itertools.count(1)


def crc32_checksum(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class FakeClock:
    """Monotonic seconds that move only when told; wall time an hour ahead of the real one, so
    files written by the test never look just created (see SetSealer's arriving check)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._wall_offset_ns = 3600 * 10**9

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wall_ns(self) -> int:
        return time.time_ns() + self._wall_offset_ns + int(self.now * 1e9)


@dataclass
class Fault:
    operation: str
    key: str | None  # None: any key
    remaining: int | None  # None: for good
    error: Callable[[], Exception]


@dataclass
class Gate:
    """Holds the first matching call until released."""

    operation: str
    key: str | None
    entered: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._released.set()

    def wait(self) -> None:
        self.entered.set()
        if not self._released.wait(30):
            raise AssertionError(f"held {self.operation} never released")


@dataclass
class StoredBytes:
    data: bytes
    checksum: str
    last_modified: datetime
    etag: str = field(default_factory=lambda: f"etag-{next(_WRITES)}")  # new on every write


class InMemoryObjectStore:
    """An ObjectStore whose objects live in a dict.

    fail(op, times=n, error=...) makes the next n calls of an operation raise (times=None: for
    good), optionally only for one key; hold(op) stops the next call until the gate is released.
    Uploads read the file before they wait at a gate, so a file changed meanwhile is caught by
    the uploader's check after upload, as a change during a real upload would be.
    """

    def __init__(self, bucket: str = "memory", max_concurrency: int = 4) -> None:
        self._bucket = bucket
        self._max_concurrency = max_concurrency
        self.objects: dict[str, StoredBytes] = {}
        self.uploads: list[OpenUpload] = []
        self.calls: Counter[str] = Counter()
        self._faults: list[Fault] = []
        self._gates: list[Gate] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="mem")
        # Objects larger than this are copied "in parts" (S3: over 5 GiB).
        self.copy_part_threshold = 5 << 30
        self.hurried = False  # a flush's deadline runs (ObjectStore.hurry)

    # -- test controls ---------------------------------------------------------------------

    def fail(self, operation: str, times: int | None = 1, key: str | None = None,
             error: Callable[[], Exception] | None = None, permanent: bool = False) -> None:
        def injected() -> Exception:
            return StoreError(f"injected {operation} failure", permanent=permanent)

        with self._lock:
            self._faults.append(Fault(operation, key, times, error or injected))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hold(self, operation: str, key: str | None = None) -> Gate:
        gate = Gate(operation, key)
        with self._lock:
            self._gates.append(gate)
        return gate

    def data(self, key: str) -> bytes:
        return self.objects[key].data

    def _enter(self, operation: str, key: str | None = None) -> None:
        """Count the call, wait at a gate set for it, raise a fault injected for it."""
        with self._lock:
            self.calls[operation] += 1
            gate = next((g for g in self._gates if _matches(g, operation, key)), None)
            if gate is not None:
                self._gates.remove(gate)
        if gate is not None:
            gate.wait()
        with self._lock:
            fault = next((f for f in self._faults if _matches(f, operation, key)), None)
            if fault is None:
                return
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
        raise fault.error()

    def put(self, key: str, data: bytes) -> StoredBytes:
        """Store an object directly, as another writer would (no fault, no gate)."""
        stored = StoredBytes(data, crc32_checksum(data), datetime.now(UTC))
        with self._lock:
            self.objects[key] = stored
        return stored

    def _read(self, key: str) -> StoredBytes:
        with self._lock:
            stored = self.objects.get(key)
        if stored is None:
            raise ObjectMissing(f"no object {key}", permanent=True, code="NoSuchKey")
        return stored

    # -- ObjectStore -----------------------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def downloads_at_once(self) -> int:
        return self._max_concurrency

    def uses_multipart(self, size: int) -> bool:
        return False

    def upload_file(self, path: Path, key: str, size: int,
                    progress: Progress | None = None) -> PendingUpload:
        cancelled = threading.Event()

        def upload() -> StoredObject:
            data = path.read_bytes()
            self._enter("upload_file", key)
            if cancelled.is_set():
                raise CancelledError()
            stored = self.put(key, data)
            if progress is not None:
                progress(len(data))
            return StoredObject(stored.checksum, len(data), etag=stored.etag)

        future = self._pool.submit(upload)

        def cancel() -> None:
            cancelled.set()
            future.cancel()

        return PendingUpload(future, cancel)

    def put_bytes(self, key: str, body: bytes, content_type: str) -> Future[None]:
        def put() -> None:
            self._enter("put_bytes", key)
            self.put(key, body)

        return self._pool.submit(put)

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        self._enter("get_bytes", key)
        data = self._read(key).data
        return data if limit is None else data[:limit]

    def copies_in_parts(self, size: int) -> bool:
        return size > self.copy_part_threshold

    def copy_if_match(self, source: str, key: str, etag: str, size: int) -> bool:
        """As S3's CopyObject with CopySourceIfMatch: False (S3's 412, or no source) unless
        source holds the version with this ETag; the copy is a write of its own (new ETag)."""
        self._enter("copy_if_match", source)
        with self._lock:
            stored = self.objects.get(source)
            if stored is None or stored.etag.strip('"') != etag.strip('"'):
                return False
            self.objects[key] = StoredBytes(stored.data, stored.checksum,
                                            datetime.now(UTC))
        return True

    def download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                 expected: Expected | None = None) -> bool:
        """Never checks on the way: restore reads the file back."""
        self._enter("download", key)
        data = self._read(key).data
        path.write_bytes(data)
        if progress is not None:
            progress(len(data))
        return False

    def start_download(self, key: str, path: Path, size: int, progress: Progress | None = None,
                       expected: Expected | None = None) -> PendingDownload:
        future = self._pool.submit(self.download, key, path, size, progress, expected)
        return PendingDownload(future, future.cancel)

    def head(self, key: str, part_number: int | None = None) -> ObjectHead:
        self._enter("head", key)
        stored = self._read(key)
        return ObjectHead(len(stored.data), stored.checksum)

    def list_objects(self, prefix: str) -> Iterator[ListedObject]:
        self._enter("list_objects", prefix)
        with self._lock:
            items = sorted(self.objects.items())
        for key, stored in items:
            if key.startswith(prefix):
                yield ListedObject(key, len(stored.data), stored.last_modified,
                                   stored.etag)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        with self._lock:
            self.objects.pop(key, None)

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        self._enter("delete_many")
        for key in keys:
            with self._lock:
                self.objects.pop(key, None)
        return {}

    def open_uploads(self, prefix: str) -> list[OpenUpload]:
        self._enter("open_uploads", prefix)
        with self._lock:
            return [u for u in self.uploads if u.key.startswith(prefix)]

    def abort_upload(self, upload: OpenUpload) -> bool:
        self._enter("abort_upload", upload.key)
        with self._lock:
            if upload not in self.uploads:
                return False
            self.uploads.remove(upload)
        return True

    def start_upload(self, key: str) -> OpenUpload:
        """A multipart upload left open (as a lost CreateMultipartUpload reply leaves one)."""
        upload = OpenUpload(key, f"upload-{next(self._ids)}")
        with self._lock:
            self.uploads.append(upload)
        return upload

    def hurry(self, hurried: bool) -> None:
        self.hurried = hurried

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def reopen(self) -> None:
        """After close: open again on the same objects, as S3 outlives the process using it."""
        self._pool = ThreadPoolExecutor(max_workers=self._max_concurrency,
                                        thread_name_prefix="mem")


def _matches(rule: Fault | Gate, operation: str, key: str | None) -> bool:
    return rule.operation == operation and rule.key in (None, key)
