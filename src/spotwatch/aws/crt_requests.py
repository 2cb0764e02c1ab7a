"""The CRT's HTTP requests as botocore builds them, at a fraction of botocore's cost.

botocore turns every call into a request through its whole pipeline (parameter handling,
endpoint rules, event hooks), about a third of a millisecond of CPU per request; for many small
files that is a large share of a transfer's CPU. Yet for one bucket, operation and set of
arguments, the requests differ only in the key (percent-encoded into the path), the body's
length (Content-Length) and the invocation id (a fresh UUID per call). So botocore serializes
one request per (operation, argument shape) with a placeholder key, and every key's request is
derived from it. The CRT signs each request itself, so nothing signed is reused.

Invariant: a derived request equals what botocore would have built for that key (method, path,
every header; the invocation id is fresh and random either way). Each template proves it when
it is made, against botocore's own requests for keys that need encoding; one that does not
(a future botocore that encodes differently, arguments that change with the key) is never
used, and botocore serializes every request of that shape as before.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import awscrt.http
from s3transfer.crt import BotocoreCRTRequestSerializer, CRTTransferFuture, CRTTransferMeta
from s3transfer.utils import CallArgs

# Stands for the key in a template: quote() leaves it as it is, and no header holds it.
PLACEHOLDER_KEY = "spotwatch-template-key-7f3a9c"
# Keys a template must reproduce botocore's requests for before it is used: every class of
# character the path encodes differently (space, '+', '%', '~', non-ASCII, '//', './', a
# leading '/').
PROBE_KEYS = ("probe/a b+c%25~d/é€😀/x//./../y", "/leading/slash")
# Sizes a PUT template must reproduce Content-Length for (0 and a multi-GiB body included).
PROBE_SIZES = (0, 5 * 2**30 + 1)
INVOCATION_ID = "amz-sdk-invocation-id"
CONTENT_LENGTH = "content-length"
# botocore's encoding of a key in the path (the {Key+} label): UTF-8, '/' and '~' kept.
_KEY_SAFE = "/~"

Headers = list[tuple[str, str]]


def _encoded_key(key: str) -> str:
    return quote(key.encode("utf-8"), safe=_KEY_SAFE)


@dataclass(frozen=True)
class _Template:
    """One serialized request, split around its key."""

    method: str
    path_before: str
    path_after: str
    headers: tuple[tuple[str, str], ...]

    def build(self, key: str, content_length: int | None) -> awscrt.http.HttpRequest:
        return awscrt.http.HttpRequest(
            method=self.method, path=self.path_before + _encoded_key(key) + self.path_after,
            headers=awscrt.http.HttpHeaders(self._headers(content_length)))

    def _headers(self, content_length: int | None) -> Headers:
        headers: Headers = []
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == INVOCATION_ID:
                value = str(uuid.uuid4())
            elif lowered == CONTENT_LENGTH and content_length is not None:
                value = str(content_length)
            headers.append((name, value))
        return headers


def _template_of(request: awscrt.http.HttpRequest) -> _Template | None:
    """The request split around the placeholder key; None when it does not appear exactly
    once in the path (then it cannot be substituted)."""
    before, found, after = request.path.partition(PLACEHOLDER_KEY)
    if not found or PLACEHOLDER_KEY in after:
        return None
    return _Template(request.method, before, after, tuple(request.headers))


def _comparable(request: awscrt.http.HttpRequest) -> tuple[str, str, Headers]:
    """Method, path and headers in order, the invocation id (random per call) left out."""
    return (request.method, request.path,
            [(name, value) for name, value in request.headers if name.lower() != INVOCATION_ID])


class CrtRequests:
    """Requests for one bucket, from templates where they hold, else from botocore."""

    def __init__(self, serializer: BotocoreCRTRequestSerializer, bucket: str) -> None:
        self._serializer = serializer
        self._bucket = bucket
        self._templates: dict[tuple[str, Hashable], _Template | None] = {}
        self._lock = threading.Lock()

    def request(self, operation: str, key: str, args: dict[str, Any]) -> awscrt.http.HttpRequest:
        """The request for `operation` (a boto3 method name: put_object, get_object) on key
        with these arguments, as botocore would build it."""
        shape = _shape(operation, args)
        if shape is None:
            return self.serialized(operation, key, args)
        with self._lock:
            if shape in self._templates:
                template = self._templates[shape]
            else:
                template = self._templates[shape] = self._proven_template(operation, args)
        if template is None:
            return self.serialized(operation, key, args)
        return template.build(key, args.get("ContentLength"))

    def serialized(self, operation: str, key: str, args: dict[str, Any]
                   ) -> awscrt.http.HttpRequest:
        """botocore's own request, through s3transfer's serializer."""
        call = CallArgs(bucket=self._bucket, key=key, extra_args=args, subscribers=[])
        return self._serializer.serialize_http_request(
            operation, CRTTransferFuture(CRTTransferMeta(call_args=call)))  # type: ignore[arg-type]

    def _proven_template(self, operation: str, args: dict[str, Any]) -> _Template | None:
        """The template for this shape, if it reproduces botocore for every probe key and
        size (see the module's invariant); else None."""
        template = _template_of(self.serialized(operation, PLACEHOLDER_KEY, args))
        if template is None:
            return None
        sizes = PROBE_SIZES if "ContentLength" in args else (None,)
        for key in PROBE_KEYS:
            for size in sizes:
                probe_args = args if size is None else {**args, "ContentLength": size}
                expected = _comparable(self.serialized(operation, key, probe_args))
                if _comparable(template.build(key, size)) != expected:
                    return None
        return template


def _shape(operation: str, args: dict[str, Any]) -> tuple[str, Hashable] | None:
    """What a template is made for: the operation and every argument but the body's length.
    None when an argument cannot be compared (a dict, such as Metadata): botocore then builds
    each request."""
    shape = tuple(sorted((name, value) for name, value in args.items()
                         if name != "ContentLength"))
    try:
        hash(shape)
    except TypeError:
        return None
    return operation, shape
