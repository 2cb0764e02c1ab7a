"""Aborts the multipart uploads a killed spotwatch left behind.

Parts of an upload that was never completed or aborted are stored (and billed) until someone
aborts it. The ledger notes each multipart upload's key before it starts; on the next start,
unfinished uploads of those keys are aborted (the keys are under spotwatch's own prefix, so any
such upload is a leftover; the file itself is uploaded again). A bucket lifecycle rule with
AbortIncompleteMultipartUpload is the backstop for anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.ledger import Ledger, LedgerError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("spotwatch.orphans")


def abort_orphaned_uploads(client: S3Client, bucket: str, ledger: Ledger) -> int:
    aborted = 0
    for key in ledger.unfinished_multipart(bucket):
        try:
            for page in client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=bucket, Prefix=key):
                for upload in page.get("Uploads", []):
                    if upload.get("Key") != key:
                        continue  # the prefix matched a longer key
                    client.abort_multipart_upload(Bucket=bucket, Key=key,
                                                  UploadId=upload["UploadId"])
                    aborted += 1
                    log.info("multipart_aborted", key=key, upload_id=upload["UploadId"])
            ledger.multipart_finished(bucket, key)
        except (BotoCoreError, ClientError, LedgerError) as exc:
            # Left noted: the next start tries again.
            log.warning("multipart_abort_failed", key=key, error=str(exc))
    return aborted
