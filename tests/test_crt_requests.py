"""The CRT's requests derived from templates equal botocore's own, for any key; and the CRT
store, against the moto server, serializes through botocore once per kind of request."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import awscrt.http
import botocore.session
import pytest
from botocore.config import Config as BotoConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3transfer.crt import BotocoreCRTRequestSerializer

from spotwatch.aws.crt_requests import CrtRequests
from spotwatch.aws.crt_store import CrtObjectStore, put_object_args
from spotwatch.aws.s3 import make_s3_client
from spotwatch.config import TransferSettings

from .conftest import REGION, object_bytes

# (endpoint, region, addressing style): path-style (an IP endpoint, or asked for), virtual-host
# style on a custom endpoint, and AWS's own endpoint choosing for itself.
ADDRESSING = [
    ("http://127.0.0.1:9000", "us-east-1", None),
    ("https://s3.example.test", "us-east-1", "path"),
    ("https://s3.example.test:8443", "eu-west-1", "virtual"),
    ("https://s3.us-west-2.amazonaws.com", "us-west-2", "auto"),
]
BUCKETS = ["bkt", "my.dotted.bucket-1"]
# Pieces a key is made of: every character the path encodes specially, separators, dot
# segments, non-ASCII, and arbitrary text.
PIECES = st.one_of(
    st.sampled_from([" ", "+", "%", "%25", "%2F", "~", "/", "//", "./", "../", ".", "?", "#",
                     "&", "=", ";", ":", "@", "*", "'", '"', "\\", "\t", "é", "€", "😀",
                     "\u200b", "\x7f"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
SIZES = st.integers(min_value=0, max_value=5 * 2**40)


def _fits(key: str) -> bool:
    return 0 < len(key.encode("utf-8")) <= 1024


KEYS = st.one_of(
    st.lists(PIECES, min_size=1, max_size=20).map("".join),
    # very long keys, near S3's 1,024 bytes
    st.tuples(st.lists(PIECES, min_size=1, max_size=4).map("".join),
              st.integers(1, 200)).map(lambda t: (t[0] * t[1])[:1024]),
).filter(_fits)
PUT_SETTINGS = st.builds(
    lambda algorithm, sse: TransferSettings(
        checksum_algorithm=algorithm, sse=sse,
        sse_kms_key_id="arn:aws:kms:us-east-1:111122223333:key/k 1" if sse == "aws:kms" else None),
    st.sampled_from(["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"]),
    st.sampled_from(["none", "AES256", "aws:kms"]))


def serializer(endpoint: str, region: str, style: str | None) -> BotocoreCRTRequestSerializer:
    """As CrtObjectStore makes it."""
    return BotocoreCRTRequestSerializer(botocore.session.Session(), {
        "region_name": region, "endpoint_url": endpoint,
        "config": BotoConfig(s3={"addressing_style": style} if style else None)})


SERIALIZERS = {addressing: serializer(*addressing) for addressing in ADDRESSING}


def botocores(serializer: BotocoreCRTRequestSerializer, bucket: str, operation: str, key: str,
              args: dict[str, Any]) -> awscrt.http.HttpRequest:
    """botocore's request, straight from s3transfer's serializer."""
    return CrtRequests(serializer, bucket).serialized(operation, key, args)


def invocation_id(request: awscrt.http.HttpRequest) -> str:
    return str(request.headers.get("amz-sdk-invocation-id"))


def assert_same_request(ours: awscrt.http.HttpRequest, theirs: awscrt.http.HttpRequest) -> None:
    """Method, path and every header, in order; the invocation id a fresh UUID in each."""
    assert ours.method == theirs.method
    assert ours.path == theirs.path
    our_headers, their_headers = list(ours.headers), list(theirs.headers)
    assert [name for name, _ in our_headers] == [name for name, _ in their_headers]
    for (name, ours_value), (_, theirs_value) in zip(our_headers, their_headers, strict=True):
        if name == "amz-sdk-invocation-id":
            assert uuid.UUID(ours_value).version == 4
            assert ours_value != theirs_value
        else:
            assert (name, ours_value) == (name, theirs_value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEYS, size=SIZES, put=PUT_SETTINGS, addressing=st.sampled_from(ADDRESSING),
       bucket=st.sampled_from(BUCKETS))
def test_derived_put_equals_botocores(key: str, size: int, put: TransferSettings,
                                      addressing: tuple[str, str, str | None],
                                      bucket: str) -> None:
    serializer = SERIALIZERS[addressing]
    requests = CrtRequests(serializer, bucket)
    args = put_object_args(put, size)
    first = requests.request("put_object", "first/key", put_object_args(put, 1))  # template
    ours = requests.request("put_object", key, args)
    assert_same_request(ours, botocores(serializer, bucket, "put_object", key, args))
    assert invocation_id(ours) != invocation_id(first)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEYS, args=st.sampled_from([{}, {"ChecksumMode": "ENABLED"}]),
       addressing=st.sampled_from(ADDRESSING), bucket=st.sampled_from(BUCKETS))
def test_derived_get_equals_botocores(key: str, args: dict[str, Any],
                                      addressing: tuple[str, str, str | None],
                                      bucket: str) -> None:
    serializer = SERIALIZERS[addressing]
    requests = CrtRequests(serializer, bucket)
    requests.request("get_object", "first/key", args)
    assert_same_request(requests.request("get_object", key, args),
                        botocores(serializer, bucket, "get_object", key, args))


def test_arguments_that_cannot_be_compared_go_to_botocore() -> None:
    serializer = SERIALIZERS[ADDRESSING[0]]
    args = {"ContentLength": 3, "Metadata": {"origin": "node 1"}}
    requests = CrtRequests(serializer, "bkt")
    for key in ("a", "b c"):
        assert_same_request(requests.request("put_object", key, args),
                            botocores(serializer, "bkt", "put_object", key, args))


def test_a_template_that_misses_a_header_made_from_the_key_is_never_used() -> None:
    """A request hook that writes the key into a header (botocore lets any handler do so):
    the template cannot reproduce it, so every request comes from botocore."""
    serializer = BotocoreCRTRequestSerializer(botocore.session.Session(), {
        "region_name": REGION, "endpoint_url": "http://127.0.0.1:9000"})

    def key_header(params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        params["headers"]["x-amz-meta-key-length"] = str(len(params["url_path"]))

    serializer._client.meta.events.register("before-call.s3.PutObject", key_header)
    requests = CrtRequests(serializer, "bkt")
    lengths = set()
    for key in ("a", "longer/key"):
        ours = requests.request("put_object", key, {"ContentLength": 1})
        assert_same_request(ours, botocores(serializer, "bkt", "put_object", key,
                                            {"ContentLength": 1}))
        lengths.add(dict(ours.headers)["x-amz-meta-key-length"])
    assert len(lengths) == 2


def test_crt_store_asks_botocore_only_for_each_new_kind_of_request(
        tmp_path: Path, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads and downloads of files with awkward names through the CRT against moto: the
    objects hold the right bytes under the right keys, and after the first request of each
    kind botocore serializes nothing."""
    calls: list[str] = []
    original = BotocoreCRTRequestSerializer.serialize_http_request

    def counted(self: BotocoreCRTRequestSerializer, transfer_type: str, future: Any) -> Any:
        calls.append(transfer_type)
        return original(self, transfer_type, future)

    monkeypatch.setattr(BotocoreCRTRequestSerializer, "serialize_http_request", counted)
    transfer = TransferSettings(client="crt", checksum_algorithm="CRC32C")
    store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
    names = ["a b+c%~é", "x//./y", "plain", "deep/er/name 2", "emoji😀", "tilde~%25"]
    try:
        for round_number in range(2):
            before = len(calls)
            for i, name in enumerate(names):
                body = f"{round_number} {i} {name}".encode()
                source = tmp_path / f"up-{round_number}-{i}"
                source.write_bytes(body)
                key = f"data/{round_number}/{name}"
                stored = store.upload_file(source, key, len(body)).future.result(timeout=60)
                assert stored.checksum
                assert object_bytes(s3, bucket, key) == body
                target = tmp_path / f"down-{round_number}-{i}"
                store.download(key, target, size=len(body))
                assert target.read_bytes() == body
            if round_number:
                assert calls[before:] == []
    finally:
        store.close()

