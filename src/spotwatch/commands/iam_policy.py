"""`spotwatch iam-policy`: the least-privilege IAM policy for the configured bucket and prefixes.

Objects are reachable only under the watched prefixes; listing is limited to those prefixes.
Deleting is needed there too, whatever `sync.delete` and `sync.keep_sets` say: besides the write
probe, spotwatch deletes the object it just wrote for a file deleted while it uploaded.
OPERATION_ACTIONS names the IAM action behind every S3 operation spotwatch calls.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from spotwatch.commands import load
from spotwatch.config import Config
from spotwatch.console import print_text
from spotwatch.keys import object_key

OPERATION_ACTIONS = {
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    # A held copy (sync.sets.held): PutObject on the copy, GetObject on its source.
    "CopyObject": "s3:PutObject",
    "UploadPartCopy": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "GetBucketLocation": "s3:GetBucketLocation",
    "GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock",
    "GetBucketPolicyStatus": "s3:GetBucketPolicyStatus",
    "GetBucketEncryption": "s3:GetEncryptionConfiguration",
}


# IAM reads '*' and '?' in a resource or a StringLike value as wildcards and '${...}' as a
# policy variable; these fixed variables stand for the characters themselves.
_IAM_LITERALS = {"*": "${*}", "?": "${?}", "$": "${$}"}


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args, uploads=False)
    print_text(json.dumps(policy_for(config, bucket), indent=2))
    return 0


def iam_literal(text: str) -> str:
    """Invariant: a prefix is granted as the text it is, so that a '*' or '?' in it (a prefix
    'exp*/') grants no other prefix ('expA/') and a '${' in it is no policy variable."""
    return re.sub(r"[*?$]", lambda match: _IAM_LITERALS[match.group()], text)


def policy_for(config: Config, bucket: str) -> dict[str, Any]:
    bucket_arn = f"arn:aws:s3:::{bucket}"
    prefixes = sorted({iam_literal(object_key(w.prefix, "")) for w in config.watch})
    objects = [f"{bucket_arn}/{prefix}*" for prefix in prefixes]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "BucketChecks",
            "Effect": "Allow",
            "Action": ["s3:GetBucketLocation", "s3:GetBucketPublicAccessBlock",
                       "s3:GetBucketPolicyStatus", "s3:GetEncryptionConfiguration",
                       "s3:ListBucketMultipartUploads"],
            "Resource": bucket_arn,
        },
        {
            "Sid": "ListCheckpointPrefixes",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": bucket_arn,
            "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in prefixes]}},
        },
        {
            "Sid": "ReadWriteCheckpoints",
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
            "Resource": objects,
        },
        {
            "Sid": "DeleteCheckpoints",
            "Effect": "Allow",
            "Action": "s3:DeleteObject",
            "Resource": objects,
        },
    ]
    statements.extend(_lifecycle_statements(config))
    kms = _kms_statement(config)
    if kms is not None:
        statements.append(kms)
    return {"Version": "2012-10-17", "Statement": statements}


def _kms_statement(config: Config) -> dict[str, Any] | None:
    """SSE-KMS with a customer key: encrypt (GenerateDataKey) and multipart/restore (Decrypt)."""
    key = config.transfer.sse_kms_key_id
    if config.transfer.sse != "aws:kms" or not key:
        return None  # the AWS managed key needs no IAM grant of its own
    statement: dict[str, Any] = {"Sid": "CheckpointKmsKey", "Effect": "Allow",
                                 "Action": ["kms:GenerateDataKey", "kms:Decrypt"]}
    region = config.region or "*"  # not configured: the key may be in any region
    if key.startswith("arn:"):
        statement["Resource"] = key
    elif key.startswith("alias/"):
        statement["Resource"] = f"arn:aws:kms:{region}:*:key/*"
        statement["Condition"] = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": key}}
    else:
        statement["Resource"] = f"arn:aws:kms:{region}:*:key/{key}"
    return statement


def _lifecycle_statements(config: Config) -> list[dict[str, Any]]:
    """With a lifecycle hook: heartbeat and complete it, on the configured group (any group
    when it is found at run time, which also needs DescribeAutoScalingInstances); read the
    hook's heartbeat timeout (DescribeLifecycleHooks)."""
    if config.asg.lifecycle_hook is None:
        return []
    group = iam_literal(config.asg.group) if config.asg.group else "*"
    statements: list[dict[str, Any]] = [{
        "Sid": "LifecycleHook",
        "Effect": "Allow",
        "Action": ["autoscaling:CompleteLifecycleAction",
                   "autoscaling:RecordLifecycleActionHeartbeat"],
        "Resource": f"arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{group}",
    }]
    # Describe calls take no resource: the hook's heartbeat timeout, and the group if unnamed.
    describe = ["autoscaling:DescribeLifecycleHooks"]
    if config.asg.group is None:
        describe.append("autoscaling:DescribeAutoScalingInstances")
    statements.append({"Sid": "DescribeAutoScaling", "Effect": "Allow", "Action": describe,
                       "Resource": "*"})
    return statements
