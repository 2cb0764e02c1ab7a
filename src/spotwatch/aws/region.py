"""The AWS region: `aws.region`, else the SDK's own resolution, else the instance's (IMDS)."""

from __future__ import annotations

import os

import boto3
from botocore.exceptions import BotoCoreError

from spotwatch.aws.imds import REGION_PATH, ImdsError, disabled_reason, probe_client
from spotwatch.config import Config, require_region
from spotwatch.errors import ConfigError, SpotwatchError

REGION_ENV = "AWS_REGION"
SDK_REGION_ENV = "AWS_DEFAULT_REGION"  # botocore's own, before the profile's region
_HOW_TO_SET = "set aws.region, AWS_REGION or AWS_DEFAULT_REGION"
# Where an S3-compatible store is named instead of AWS's: its region is what it says it is
# (Garage's "garage", Ceph's "default"), and only the environment can name such a one.
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def resolve_region(config: Config) -> str:
    """In this order: the config, $AWS_REGION, botocore's own (AWS_DEFAULT_REGION, the
    profile), then IMDS unless disabled. No region anywhere is a config error (exit 2); an
    IMDS that cannot be reached is a runtime failure (exit 1: a restart may find it)."""
    region = config.region or _environment_region() or _sdk_region()
    if region:
        return region
    reason = disabled_reason(config.imds)
    if reason:
        raise ConfigError(f"no AWS region: {_HOW_TO_SET} (not asking IMDS: {reason})")
    try:
        region = probe_client(config.imds, attempts=3).get(REGION_PATH)
    except ImdsError as exc:
        raise SpotwatchError(f"no AWS region: {_HOW_TO_SET}, or let IMDS answer ({exc})"
                             ) from None
    if not region:
        raise ConfigError(f"no AWS region: {_HOW_TO_SET} (IMDS has no placement/region)")
    return region.strip()


def _environment_region() -> str | None:
    """$AWS_REGION, checked as aws.region is (empty: unset, as the SDKs take it)."""
    region = os.environ.get(REGION_ENV)
    return _checked(region, REGION_ENV) if region else None


def _sdk_region() -> str | None:
    """botocore's region, checked as aws.region is, naming where it came from."""
    try:
        region = boto3.session.Session().region_name
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise ConfigError(f"cannot read the AWS region from the SDK: {exc}") from None
    if not region:
        return None
    source = SDK_REGION_ENV if os.environ.get(SDK_REGION_ENV) else "the AWS profile's region"
    return _checked(region, source)


def _checked(region: str, source: str) -> str:
    """The region held to what aws.region takes, unless an S3 endpoint of its own is named
    (S3_ENDPOINT_ENVS): then any name its store uses."""
    if any(os.environ.get(name, "").strip() for name in S3_ENDPOINT_ENVS):
        return region
    return require_region(region, source)
