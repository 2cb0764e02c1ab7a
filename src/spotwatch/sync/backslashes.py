"""Whether the object store keeps a key holding a backslash as it was sent.

S3 does. Some S3-compatible stores (SeaweedFS) take the backslash for a '/': `a\\b.pt` is
stored, and listed, as `a/b.pt`, over whatever object was there, and a restore (which lists a
set) never finds it. What the store does is learnt once, from a probe object under the watched
prefix's `.spotwatch/`, before the first such file is sent.
"""

from __future__ import annotations

import contextlib
import secrets
import threading

from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.keys import WRITE_PROBE, object_key

BACKSLASH = "\\"


class BackslashKeys:
    """Thread-safe; kept raises StoreError when the probe could not be made (asked again
    next time)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._kept: bool | None = None
        self._lock = threading.Lock()

    def kept(self, prefix: str) -> bool:
        """Whether the store keeps such a key as sent; the probe goes under prefix."""
        with self._lock:
            if self._kept is None:
                self._kept = self._probe(prefix)
            return self._kept

    def _probe(self, prefix: str) -> bool:
        folder = object_key(prefix, f"{WRITE_PROBE}backslash-{secrets.token_hex(6)}")
        key = f"{folder}{BACKSLASH}probe"
        self._store.put_bytes(key, b"", "application/octet-stream").result()
        try:
            return any(listed.key == key for listed in self._store.list_objects(folder))
        finally:
            for written in (key, key.replace(BACKSLASH, "/")):
                # A probe left behind costs nothing, under .spotwatch/.
                with contextlib.suppress(StoreError):
                    self._store.delete(written)
