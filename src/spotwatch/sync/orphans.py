"""Aborts the multipart uploads spotwatch left behind.

Parts of an upload that was never completed or aborted are stored (and billed) until someone
aborts it. The ledger notes each multipart upload's key before it starts and forgets it once
no upload of the key is left open; on the next start, unfinished uploads of the keys still
noted are aborted (the keys are under spotwatch's own prefix, so any such upload is a
leftover; the file itself is uploaded again). The uploader also aborts leftovers of a key as
soon as an upload of it completes (see Uploader._abort_leftovers). Held copies of objects
too large for one CopyObject are multipart uploads too, noted the same way (MultipartNotes).
A bucket lifecycle rule with AbortIncompleteMultipartUpload is the backstop for anything else.
"""

from __future__ import annotations

from collections.abc import Callable

from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.logs import get_logger
from spotwatch.sync.ledger import Ledger, LedgerError

log = get_logger("spotwatch.orphans")


class MultipartNotes:
    """The ledger's notes of multipart uploads under way, for those started outside the
    engine (held copies made in parts). A note that cannot be written is logged: the upload
    itself is safe, and only its cleanup after a crash is lost."""

    def __init__(self, ledger: Ledger, bucket: str) -> None:
        self._ledger = ledger
        self._bucket = bucket

    def started(self, key: str) -> None:
        self._write(self._ledger.multipart_started, key)

    def finished(self, key: str) -> None:
        self._write(self._ledger.multipart_finished, key)

    def _write(self, write: Callable[[str, str], None], key: str) -> None:
        try:
            write(self._bucket, key)
        except LedgerError as exc:
            log.error("ledger_write_failed", error=str(exc), key=key)


def abort_orphaned_uploads(store: ObjectStore, ledger: Ledger) -> int:
    aborted = 0
    for key in ledger.unfinished_multipart(store.bucket):
        try:
            aborted += abort_open_uploads(store, key)
            ledger.multipart_finished(store.bucket, key)
        except (StoreError, LedgerError) as exc:
            # Left noted: the next start tries again.
            log.warning("multipart_abort_failed", key=key, error=str(exc))
    return aborted


def abort_open_uploads(store: ObjectStore, key: str) -> int:
    """Abort every multipart upload of exactly this key still in progress; how many.

    Only call it while no upload of the key is running: any open one is then a leftover.
    Raises StoreError when the store cannot be asked.
    """
    aborted = 0
    for upload in store.open_uploads(key):
        if upload.key != key:
            continue  # the prefix matched a longer key
        if not store.abort_upload(upload):
            continue  # completed or aborted since it was listed
        aborted += 1
        log.info("multipart_aborted", key=key, upload_id=upload.upload_id)
    return aborted
