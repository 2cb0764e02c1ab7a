"""Aborts the multipart uploads spotwatch left behind.

Parts of an upload that was never completed or aborted are stored (and billed) until someone
aborts it. The ledger notes each multipart upload's key before it starts and forgets it once
no upload of the key is left open; on the next start, unfinished uploads of the keys still
noted are aborted (the keys are under spotwatch's own prefix, so any such upload is a
leftover; the file itself is uploaded again). The uploader also aborts leftovers of a key as
soon as an upload of it completes (see Uploader._abort_leftovers). A bucket lifecycle rule
with AbortIncompleteMultipartUpload is the backstop for anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.sync.ledger import Ledger, LedgerError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("spotwatch.orphans")


def abort_orphaned_uploads(client: S3Client, bucket: str, ledger: Ledger) -> int:
    aborted = 0
    for key in ledger.unfinished_multipart(bucket):
        try:
            aborted += abort_open_uploads(client, bucket, key)
            ledger.multipart_finished(bucket, key)
        except (BotoCoreError, ClientError, LedgerError) as exc:
            # Left noted: the next start tries again.
            log.warning("multipart_abort_failed", key=key, error=str(exc))
    return aborted


def abort_open_uploads(client: S3Client, bucket: str, key: str) -> int:
    """Abort every multipart upload of exactly this key still in progress; how many.

    Only call it while no upload of the key is running: any open one is then a leftover.
    Raises BotoCoreError or ClientError when S3 cannot be asked.
    """
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                        Prefix=key):
        for upload in page.get("Uploads", []):
            if upload.get("Key") != key:
                continue  # the prefix matched a longer key
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key,
                                              UploadId=upload["UploadId"])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise
                continue  # completed or aborted since it was listed
            aborted += 1
            log.info("multipart_aborted", key=key, upload_id=upload["UploadId"])
    return aborted
