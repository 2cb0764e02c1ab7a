"""`spotwatch check`, also run before `run` starts: is the bucket safe and right to use?

Same region as configured and as the instance (cross-region is slow and costs money), not
public, writable, readable and listable under the watched prefixes, credentials present, IMDS
reachable.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from spotwatch.aws.imds import REGION_PATH, ImdsError, disabled_reason, probe_client
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import (
    encryption_args,
    make_s3_client,
    region_of_location,
    sdk_settings_checked,
)
from spotwatch.aws.store import store_error
from spotwatch.config import Config
from spotwatch.keys import WRITE_PROBE, object_key

# No answer from S3: refused, reset or timed out connections, a name that does not resolve.
# Other botocore errors (no credentials, say) are no outage and still refuse.
_NO_ANSWER = (BotoConnectionError, HTTPClientError)

_NOT_IMPLEMENTED = 501

T = TypeVar("T")

PUBLIC_ACCESS_FLAGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                       "RestrictPublicBuckets")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fatal: bool = True  # a failed non-fatal check is a warning
    # Failed only because S3 did not answer (or answered 5xx, throttling, a timeout): says
    # nothing of the bucket, so `run` waits and checks again rather than refusing.
    unreachable: bool = False

    @property
    def symbol(self) -> str:
        return "ok  " if self.ok else ("FAIL" if self.fatal else "warn")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))


def _refusal(exc: ClientError) -> str:
    """The code of S3's refusal. A transient answer (5xx, SlowDown, throttling, a timeout) is
    raised again: it is no verdict on the bucket (a 503 on GetPublicAccessBlock is not a
    public bucket), and run_checks reports S3 as unreachable instead. 501 NotImplemented is
    a verdict: a store without the feature (SeaweedFS has no public access block) answers it
    every time, and waiting for S3 would wait for good."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if not store_error(exc).permanent and status != _NOT_IMPLEMENTED:
        raise exc
    return _error_code(exc)


def _in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def check_credentials() -> CheckResult:
    with sdk_settings_checked():
        credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        return CheckResult("credentials", False, "no AWS credentials found")
    key = credentials.access_key or ""
    return CheckResult("credentials", True,
                       f"from {credentials.method} (access key ...{key[-4:]})")


def check_bucket_region(s3: Any, bucket: str, config: Config, expected: str) -> CheckResult:
    try:
        location = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint")
    except ClientError as exc:
        return CheckResult("bucket", False, f"cannot reach s3://{bucket}: {_refusal(exc)}")
    region = region_of_location(location)
    if region == expected:
        return CheckResult("bucket region", True, f"s3://{bucket} is in {region}")
    return _other_region("bucket region", f"s3://{bucket} is in {region}, configured region "
                         f"is {expected}", config)


def _other_region(name: str, found: str, config: Config) -> CheckResult:
    """A region other than the configured one: passed when aws.allow_cross_region is set,
    else refused, naming that switch."""
    allowed = config.allow_cross_region
    return CheckResult(name, allowed,
                       found + ("" if allowed else " (set aws.allow_cross_region: true to allow)"),
                       fatal=not allowed)


def check_instance_region(config: Config, expected: str) -> CheckResult:
    reason = disabled_reason(config.imds)
    if reason:
        return CheckResult("IMDS", True, f"disabled ({reason}): no notices will be seen",
                           fatal=False)
    client = probe_client(config.imds)
    try:
        region = client.get(REGION_PATH)
    except ImdsError as exc:
        hint = (" inside a container: set the instance metadata hop limit to 2 or use host "
                "networking" if _in_container() else "")
        return CheckResult("IMDS", False, f"{exc}{hint}", fatal=False)
    if region is None or region == expected:
        return CheckResult("IMDS", True, f"reachable at {client.endpoint}, instance in {region}")
    return _other_region("instance region",
                         f"the instance is in {region}, configured region is {expected}", config)


def check_public_access(s3: Any, bucket: str, config: Config) -> CheckResult:
    problems = []
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        problems += [flag for flag in PUBLIC_ACCESS_FLAGS if not block.get(flag)]
    except ClientError as exc:
        problems.append(f"no public access block ({_refusal(exc)})")
    try:
        if s3.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"]:
            problems.append("the bucket policy makes it public")
    except ClientError as exc:
        _refusal(exc)  # no policy: nothing public through a policy
    if not problems:
        return CheckResult("public access", True, "all public access blocked")
    allowed = config.allow_public_bucket
    detail = "not fully private: " + ", ".join(problems)
    if not allowed:
        detail += " (set aws.allow_public_bucket: true to allow)"
    return CheckResult("public access", allowed, detail, fatal=not allowed)


def check_encryption(s3: Any, bucket: str, config: Config) -> CheckResult:
    uploads: str = config.transfer.sse
    if config.transfer.sse_kms_key_id:
        uploads += f" with key {config.transfer.sse_kms_key_id}"
    upload_note = "bucket default" if uploads == "none" else uploads
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        algorithm = rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"]
    except (ClientError, KeyError, IndexError) as exc:
        if isinstance(exc, ClientError):
            _refusal(exc)
        return CheckResult("encryption", True, "no default encryption reported; uploads: "
                           f"{upload_note}", fatal=False)
    return CheckResult("encryption", True, f"default encryption {algorithm}; uploads: "
                       f"{upload_note}")


_PROBE_BODY = b"spotwatch write probe"


def write_probe_key(config: Config) -> str:
    """The object check_write writes and deletes."""
    return object_key(config.watch[0].prefix, WRITE_PROBE + socket.gethostname())


def check_write(s3: Any, bucket: str, config: Config) -> CheckResult:
    """Write, read back and delete a probe object: uploads, restore (and a set's sealing)
    and deletion mirroring need each of the three, so each failure is named as its own."""
    key = write_probe_key(config)
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=_PROBE_BODY,
                      **encryption_args(config.transfer))
    except ClientError as exc:
        return CheckResult("write", False, f"cannot write s3://{bucket}/{key}: "
                           f"{_refusal(exc)}")
    unreadable = None
    try:
        if s3.get_object(Bucket=bucket, Key=key)["Body"].read() != _PROBE_BODY:
            unreadable = "other bytes came back"
    except ClientError as exc:
        unreadable = _refusal(exc)
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return CheckResult("write", False, f"can write but cannot delete s3://{bucket}/{key} "
                           f"(left there): {_refusal(exc)}")
    if unreadable is not None:
        return CheckResult("write", False, f"can write but cannot read back s3://{bucket}/"
                           f"{key} (restore needs to): {unreadable}")
    return CheckResult("write", True, f"can write, read and delete under s3://{bucket}/"
                       f"{config.watch[0].prefix}")


def check_listing(s3: Any, bucket: str, config: Config) -> CheckResult:
    """List each watched prefix, and its multipart uploads: restore, sealing and retention
    list objects, and the cleanup of uploads a crash left lists those."""
    for watch in config.watch:
        prefix = object_key(watch.prefix, "")
        try:
            s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except ClientError as exc:
            return CheckResult("listing", False, f"cannot list s3://{bucket}/{prefix}: "
                               f"{_refusal(exc)}")
        try:
            s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix, MaxUploads=1)
        except ClientError as exc:
            return CheckResult("listing", False, f"cannot list the multipart uploads under "
                               f"s3://{bucket}/{prefix} (needed to clean up after a crash): "
                               f"{_refusal(exc)}")
    prefixes = ", ".join(object_key(watch.prefix, "") for watch in config.watch)
    return CheckResult("listing", True, f"can list objects and uploads under {prefixes}")


def check_destination(s3: Any, bucket: str, config: Config, expected: str) -> list[CheckResult]:
    """Whether uploads may go to the bucket at all: its region, then (if that passes) its
    public access. Every command that uploads checks these (a one-shot flush too); raises
    BotoCoreError or ClientError when S3 does not answer."""
    region = check_bucket_region(s3, bucket, config, expected)
    if not region.ok and region.fatal:
        return [region]
    return [region, check_public_access(s3, bucket, config)]


# The checks of a bucket its region and public access let through, in the order they run.
BUCKET_CHECKS = (check_encryption, check_write, check_listing)


def run_checks(config: Config, bucket: str, s3: Any | None = None,
               found: list[CheckResult] | None = None) -> list[CheckResult]:
    """All checks; `s3` lets `run` share its client (each one costs ~12 MB of models).
    found: each result is added to it as it comes, for a caller that stops waiting."""
    results = [] if found is None else found
    results.append(check_credentials())
    expected = resolve_region(config)
    s3 = s3 or make_s3_client(expected, config.transfer)
    try:
        destination = check_destination(s3, bucket, config, expected)
        results += destination
        if len(destination) > 1:
            for check in BUCKET_CHECKS:
                results.append(check(s3, bucket, config))
    except BotoCoreError as exc:
        results.append(CheckResult("bucket", False, f"S3 unreachable: {exc}",
                                   unreachable=isinstance(exc, _NO_ANSWER)))
    except ClientError as exc:  # a transient answer, raised again by _refusal
        results.append(CheckResult("bucket", False, f"S3 unreachable: {exc}", unreachable=True))
    results.append(check_instance_region(config, expected))
    return results


# How long a run of the checks may take: S3 taking requests and never answering would hold
# each one for the SDK's timeouts and retries (a read timeout of 60 s, ten attempts: ten
# minutes a request), and a preflight must answer.
CHECK_SECONDS = 30.0


def within(seconds: float, work: Callable[[], T]) -> tuple[bool, T | None]:
    """(True, work's result), run on a thread of its own, or (False, None) once it took
    `seconds`: it is left running, abandoned (a daemon thread, gone with the process). What
    it raises is raised here."""
    answer: Future[T] = Future()

    def run() -> None:
        try:
            answer.set_result(work())
        except BaseException as exc:  # raised again below, on the caller's thread
            answer.set_exception(exc)

    threading.Thread(target=run, name="bounded-check", daemon=True).start()
    try:
        return True, answer.result(timeout=seconds)
    except FutureTimeout:
        return False, None


def checks_within(config: Config, bucket: str, seconds: float = CHECK_SECONDS,
                  s3: Any | None = None) -> list[CheckResult]:
    """run_checks, or the checks that answered within `seconds` and one failure, S3
    unreachable, that says what did not (and where the write check's probe object may be
    left)."""
    found: list[CheckResult] = []
    done, results = within(seconds, lambda: run_checks(config, bucket, s3, found))
    if done and results is not None:
        return results
    answered = list(found)
    detail = f"S3 did not answer within {seconds:g} s (s3://{bucket})"
    names = {result.name for result in answered}
    if "encryption" in names and "write" not in names:
        # check_write runs next: its probe object may be written and never deleted.
        detail += (f"; the write check's probe object may be left at "
                   f"s3://{bucket}/{write_probe_key(config)}")
    return [*answered, CheckResult("bucket", False, detail, unreachable=True)]


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.ok and r.fatal]


def only_unreachable(results: list[CheckResult]) -> bool:
    """Failed, but only because S3 is unreachable: worth checking again, no refusal."""
    failed = failures(results)
    return bool(failed) and all(result.unreachable for result in failed)
