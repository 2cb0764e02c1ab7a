"""The S3 client spotwatch talks through, the botocore data (models, endpoint rules) its clients
share, and the request settings every upload shares."""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
import botocore.loaders
import botocore.session
import msgspec
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConfigNotFound,
    ConfigParseError,
    DataNotFoundError,
    InvalidConfigError,
    InvalidIMDSEndpointError,
    InvalidIMDSEndpointModeError,
    InvalidRegionError,
    InvalidRetryConfigurationError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.utils import determine_content_length, parse_timestamp

from spotwatch.config import TransferSettings
from spotwatch.errors import ConfigError, SpotwatchError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


# botocore asks S3 to confirm every upload before its body is sent (Expect: 100-continue), which
# costs a round trip per request; for a body this small, sending it outright is cheaper.
EXPECT_CONTINUE_MIN_BYTES = 1 << 20


def _send_small_bodies_outright(params: dict[str, Any], **kwargs: Any) -> None:
    if "Expect" not in params["headers"]:
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size < EXPECT_CONTINUE_MIN_BYTES:
        del params["headers"]["Expect"]


# The data files botocore looks for, in its order (botocore.loaders._JSON_OPEN_METHODS).
DATA_FILE_OPENERS = ((".json", open), (".json.gz", gzip.open))
_loader_log = logging.getLogger("botocore.loaders")  # botocore's own debug lines, as before


def decode_data_file(payload: bytes) -> Any:
    """A botocore data file's JSON, the values botocore decodes: by msgspec, whose plain dicts
    keep the order as botocore's OrderedDicts do; what msgspec refuses (NaN, a lone surrogate)
    as botocore decodes it."""
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return json.loads(payload.decode("utf-8"), object_pairs_hook=OrderedDict)


class DataFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON file loader, decoding with msgspec: at every start, reading
    endpoints.json, the S3 model and its endpoint rules took 25 ms with json.loads and
    botocore's OrderedDict hook, 12 ms with msgspec."""

    def load_file(self, file_path: str) -> Any:
        for extension, open_method in DATA_FILE_OPENERS:
            full_path = file_path + extension
            if not os.path.isfile(full_path):
                continue
            with open_method(full_path, "rb") as file:
                payload = file.read()
            _loader_log.debug("Loading JSON file: %s", full_path)
            data = decode_data_file(payload)
            if data is not None:
                return data
        return None


class DataLoader(botocore.loaders.Loader):
    """botocore's Loader, finding a service's model without listing every service first.

    botocore checks a service name by listing all the services it has data for (every
    directory of every data path, some 1,400 file checks), once for each kind of model: 14 ms
    of each start for the S3 model and its endpoint rules. Here the named service's directory
    alone is looked at, by the same rule; a name not found there still goes to botocore's own
    listing, for its UnknownServiceError."""

    FILE_LOADER_CLASS = DataFileLoader

    @botocore.loaders.instance_cache
    def load_service_model(self, service_name: str, type_name: str,
                           api_version: str | None = None) -> Any:
        if not self.provides(service_name, type_name):
            return super().load_service_model(service_name, type_name, api_version)
        # From here as botocore's Loader.load_service_model: the newest version, then the
        # SDK's extras merged into the model.
        if api_version is None:
            api_version = self.determine_latest_version(service_name, type_name)
        model = self.load_data(os.path.join(service_name, api_version, type_name))
        extras = []
        for extras_type in self.extras_types:
            with suppress(DataNotFoundError):
                extras.append(self.load_data(
                    os.path.join(service_name, api_version, f"{type_name}.{extras_type}-extras")))
        botocore.loaders.ExtrasProcessor().process(model, extras)
        return model

    def provides(self, service_name: str, type_name: str) -> bool:
        """Whether list_available_services(type_name) names service_name: a directory of
        that name in a data path, with a version directory holding a type_name file."""
        for path in self.search_paths:
            service_dir = os.path.join(path, service_name)
            # The name must be an entry of the data path ("s3/../sts", "" are not).
            if not os.path.isdir(service_dir) or service_name not in os.listdir(path):
                continue
            for api_version in os.listdir(service_dir):
                if self.file_loader.exists(os.path.join(service_dir, api_version, type_name)):
                    return True
        return False


@functools.cache
def _data_loader(data_path: str | None) -> botocore.loaders.Loader:
    """The data loader (service models, endpoint rules) for a data path, made once per
    process, as each session would make its own; its search paths are those of botocore's
    create_loader."""
    if data_path is None:
        return DataLoader()
    return DataLoader(extra_search_paths=[os.path.expanduser(os.path.expandvars(path))
                                          for path in data_path.split(os.pathsep)])


def parse_s3_timestamp(value: str) -> datetime:
    """A timestamp of S3's replies, as botocore would parse it. S3's ISO 8601 form (every
    LastModified of a listing) goes to the standard library, over a hundred times faster than
    botocore's general parser, which cost a listing of 100,000 objects seconds of CPU;
    anything else (HTTP dates, epoch seconds, no time zone) still goes to botocore's."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)
    return parsed if parsed.tzinfo is not None else parse_timestamp(value)


def botocore_session() -> botocore.session.Session:
    """A new botocore session (its own credentials and settings, read from the environment
    now) that shares the process's data loader: the S3 model is some megabytes of JSON, and
    each session that makes a client would otherwise parse it again (about 0.05 CPU-seconds)."""
    session = botocore.session.Session()
    loader = _data_loader(session.get_config_variable("data_path"))
    # boto3 adds its data directory to the loader of each session it wraps: keep one of each.
    loader.search_paths[:] = dict.fromkeys(loader.search_paths)
    session.register_component("data_loader", loader)
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_s3_timestamp)
    return session


# The session each client of make_s3_client was made from (dropped with the client).
_sessions: weakref.WeakKeyDictionary[Any, botocore.session.Session] = (
    weakref.WeakKeyDictionary())


def session_of(client: S3Client) -> botocore.session.Session:
    """The botocore session make_s3_client made client from, whose credentials it signs with
    (resolved once: env, profile, instance role; refreshed in place as they expire); for a
    client made elsewhere, a new session, resolving them afresh."""
    session = _sessions.get(client)
    return session if session is not None else botocore_session()


# What botocore refuses in its own settings (the environment, ~/.aws/config), which it reads
# only when a session makes a client or resolves credentials; ValueError: an endpoint URL
# (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, ...) that is no URL.
_SDK_SETTING_ERRORS = (ConfigNotFound, ConfigParseError, InvalidConfigError,
                       InvalidIMDSEndpointError, InvalidIMDSEndpointModeError,
                       InvalidRegionError, InvalidRetryConfigurationError,
                       PartialCredentialsError, ProfileNotFound, ValueError)


@contextmanager
def sdk_settings_checked() -> Iterator[None]:
    """Invariant: an AWS SDK setting botocore refuses while a client is made or credentials are
    resolved is one line (exit 2), as a bad config key is; any other botocore error there (a
    credential_process that fails) one line too (exit 1), never a traceback."""
    try:
        yield
    except _SDK_SETTING_ERRORS as exc:
        raise ConfigError(f"invalid AWS SDK setting: {exc}") from None
    except BotoCoreError as exc:
        raise SpotwatchError(f"AWS SDK: {exc}") from None


def make_s3_client(region: str, settings: TransferSettings) -> S3Client:
    """An S3 client with adaptive retries; the endpoint follows AWS_ENDPOINT_URL(_S3)."""
    config = BotoConfig(
        region_name=region,
        # total_max_attempts: botocore's max_attempts counts retries only, one more attempt
        # than transfer.max_attempts says and than the CRT makes.
        retries={"mode": "adaptive", "total_max_attempts": settings.max_attempts},
        # Single-part and multipart uploads each run up to max_concurrency requests.
        max_pool_connections=2 * settings.max_concurrency + 4,
        connect_timeout=5,
        read_timeout=60,
        request_checksum_calculation="when_supported",
        # The payload is never hashed for the signature, also over plain HTTP (a local object
        # store): S3 checks the bytes against the checksum every write sends. botocore signs
        # with awscrt where it is installed, and awscrt's signer would read a file's body
        # itself: a file cut short (or an upload cancelled) in between then failed with
        # AWS_ERROR_UNKNOWN and a traceback on stderr, not as the cancel it is.
        s3={"payload_signing_enabled": False},
        parameter_validation=False,  # spotwatch builds every request itself
        response_checksum_validation="when_supported",
    )
    with sdk_settings_checked():
        session = botocore_session()
        client = boto3.session.Session(botocore_session=session).client("s3", config=config)
    _sessions[client] = session
    # After botocore's own handler, which adds the header.
    client.meta.events.register_last("before-call.s3", _send_small_bodies_outright)
    return client


def bucket_region(client: S3Client, bucket: str) -> str | None:
    """The region the bucket is in, as S3 says (GetBucketLocation); None when it does not
    say (refused, unreachable): the caller keeps the region it has."""
    try:
        location = client.get_bucket_location(Bucket=bucket).get("LocationConstraint")
    except (ClientError, BotoCoreError):
        return None
    return region_of_location(location)


def region_of_location(location: str | None) -> str:
    """The region a GetBucketLocation answer names: no constraint is us-east-1, and "EU" is
    what buckets made long ago in eu-west-1 report."""
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location) or str(location)


def encryption_args(settings: TransferSettings) -> dict[str, str]:
    """Request parameters for the configured server-side encryption (none: bucket default)."""
    if settings.sse == "none":
        return {}
    args: dict[str, str] = {"ServerSideEncryption": settings.sse}
    if settings.sse_kms_key_id:
        args["SSEKMSKeyId"] = settings.sse_kms_key_id
    return args


def transfer_config(settings: TransferSettings) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )
