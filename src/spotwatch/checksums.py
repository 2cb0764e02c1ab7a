"""Checking local bytes against the checksum S3 reported for an object.

S3 reports a checksum as base64 of the digest. A single-part object, or a multipart one with a
full-object checksum, carries the digest of all its bytes; a multipart object with a composite
checksum carries the digest of its parts' digests, suffixed ``-<parts>``. The checksum string
does not name its algorithm. A manifest entry names it (``checksum_algorithm``); without that
(manifests written before it was recorded) the length narrows it down, and every algorithm of
that length is tried, the configured one first, before a mismatch is declared: CRC32 and
CRC32C share a length, and the configured one may have changed since the upload.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

READ_BYTES = 1 << 20


class ContentMismatch(Exception):
    """Downloaded bytes are not the ones expected: another size, or another checksum."""


class ChecksumUnavailable(Exception):
    """The algorithm that would settle the comparison cannot be computed here."""


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC with hashlib's interface: update() then digest() (big-endian, as S3 sends it)."""

    def __init__(self, step: Callable[[bytes | memoryview, int], int], width: int) -> None:
        self._step = step
        self._width = width
        self._value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = self._step(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


@functools.cache
def _crc32_step() -> Callable[[bytes | memoryview, int], int]:
    """zlib-ng's CRC32, which folds with carry-less multiplication: about a tenth of the CPU of
    the zlib Python links (0.016 against 0.15 CPU-seconds per GiB on the benchmark's machine),
    which is every byte of a restore. Same values; zlib's where zlib-ng is not installed."""
    try:
        from zlib_ng.zlib_ng import crc32
    except ImportError:
        return zlib.crc32
    return crc32


def _crt_checksums() -> Any:
    """awscrt's checksums module (botocore's optional CRT extra), None without awscrt."""
    try:
        return importlib.import_module("awscrt.checksums")
    except ImportError:
        return None


def _crt_crc(name: str, width: int) -> Callable[[], Digest]:
    def make() -> Digest:
        checksums = _crt_checksums()
        if checksums is None:
            raise ChecksumUnavailable(f"checking {name.upper()} checksums needs awscrt "
                                      "(pip install awscrt)")
        return _Crc(getattr(checksums, name), width)

    return make


# Name (as S3 and transfer.checksum_algorithm spell it): digest width, digest maker.
_ALGORITHMS: dict[str, tuple[int, Callable[[], Digest]]] = {
    "CRC32": (4, lambda: _Crc(_crc32_step(), 4)),
    "CRC32C": (4, _crt_crc("crc32c", 4)),
    "CRC64NVME": (8, _crt_crc("crc64nvme", 8)),
    "SHA1": (20, hashlib.sha1),
    "SHA256": (32, hashlib.sha256),
}

ALGORITHMS = frozenset(_ALGORITHMS)
# CRCs whose digest of a whole is made from the digests of its pieces (and their lengths):
# a full-object checksum of these can be checked from ranges fetched in parallel.
_COMBINERS = {"CRC32": "combine_crc32", "CRC32C": "combine_crc32c",
              "CRC64NVME": "combine_crc64nvme"}


@functools.cache
def _combiner(algorithm: str) -> Callable[[int, int, int], int] | None:
    """awscrt's combine(crc of a, crc of b, length of b) -> crc of a+b; None without awscrt."""
    name = _COMBINERS.get(algorithm)
    checksums = _crt_checksums()
    if name is None or checksums is None:
        return None
    return getattr(checksums, name, None)


def _parse(checksum: str) -> tuple[bytes, int | None] | None:
    """(digest, part count or None), or None when it is no S3 checksum at all."""
    encoded, _, parts = checksum.partition("-")
    try:
        digest = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if parts and not (parts.isascii() and parts.isdigit() and int(parts) > 0):
        return None
    return digest, int(parts) if parts else None


class PartDigests:
    """The digests of consecutive parts of part_size, fed bytes in order from a part's start:
    what a composite checksum is over."""

    def __init__(self, make: Callable[[], Digest], part_size: int) -> None:
        self._make = make
        self._part_size = part_size
        self._current = make()
        self._filled = 0
        self._done: list[bytes] = []

    def update(self, chunk: bytes | memoryview) -> None:
        while chunk:
            room = self._part_size - self._filled
            piece, chunk = chunk[:room], chunk[room:]
            self._current.update(piece)
            self._filled += len(piece)
            if self._filled == self._part_size:
                self._done.append(self._current.digest())
                self._current, self._filled = self._make(), 0

    def digests(self) -> list[bytes]:
        """Each part's digest; a last, shorter part's too (no bytes at all: one, of nothing)."""
        if self._filled or not self._done:
            return [*self._done, self._current.digest()]
        return self._done


def _combined(make: Callable[[], Digest], digests: Sequence[bytes]) -> bytes:
    """A composite checksum's digest: of its parts' digests."""
    combined = make()
    for digest in digests:
        combined.update(digest)
    return combined.digest()


def _digests(path: Path, make: Callable[[], Digest], part_size: int | None,
             whole_too: bool) -> tuple[bytes | None, bytes | None, int]:
    """The file's full digest (if whole_too), its composite digest over part_size parts (if
    part_size) and the part count; one pass over the file, without copying its bytes."""
    whole = make() if whole_too else None
    parts = PartDigests(make, part_size) if part_size is not None else None
    buffer = bytearray(READ_BYTES)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            chunk = memoryview(buffer)[:count]
            if whole is not None:
                whole.update(chunk)
            if parts is not None:
                parts.update(chunk)
    of_parts = parts.digests() if parts is not None else []
    return (whole.digest() if whole is not None else None,
            _combined(make, of_parts) if parts is not None else None, len(of_parts))


def _candidates(width: int, preferred: str, algorithm: str | None) -> list[str]:
    """The algorithms a digest of this width may come from, the configured one first. Only
    the named one when the manifest names it: CRC32 and CRC32C share a width, and a set
    uploaded before transfer.checksum_algorithm changed carries the old one."""
    if algorithm is not None:
        return [algorithm] if _ALGORITHMS.get(algorithm, (0,))[0] == width else []
    names = [name for name, (size, _) in _ALGORITHMS.items() if size == width]
    return sorted(names, key=lambda name: name != preferred)


@dataclass(frozen=True)
class Expected:
    """A checksum from a manifest, in the form a download can check while the bytes arrive:
    one algorithm, the digest, and for a composite checksum the size of the parts it is over
    (a ranged download fetches exactly those parts, digesting each)."""

    algorithm: str
    digest: bytes
    part_size: int | None = None  # composite: the digest is over the digests of such parts
    part_count: int | None = None  # composite: how many parts

    @property
    def composite(self) -> bool:
        return self.part_size is not None

    @property
    def encoded(self) -> str:
        """The full-object checksum as S3 writes it (base64); for a composite one, meaningless."""
        return base64.b64encode(self.digest).decode()

    def new_digest(self) -> Digest:
        return _ALGORITHMS[self.algorithm][1]()

    @property
    def splittable(self) -> bool:
        """Whether an object with this full-object checksum may be fetched in ranges and
        still be checked on the way (matches_pieces)."""
        return not self.composite and _combiner(self.algorithm) is not None

    def matches_pieces(self, digests: Sequence[bytes], piece_size: int, size: int) -> bool:
        """Whether these digests, of the consecutive pieces of piece_size bytes (the last one
        shorter) of an object of `size` bytes, make up the expected full-object checksum."""
        combine = _combiner(self.algorithm)
        pieces = max(1, -(-size // piece_size))
        if combine is None or self.composite or len(digests) != pieces:
            return False
        value = int.from_bytes(digests[0], "big")
        for index, digest in enumerate(digests[1:], start=1):
            value = combine(value, int.from_bytes(digest, "big"),
                            min(piece_size, size - piece_size * index))
        return value.to_bytes(len(self.digest), "big") == self.digest

    def matches(self, digests: Sequence[bytes]) -> bool:
        """Whether these digests, of the object's consecutive ranges, are the expected bytes:
        one digest of the whole object, or (composite) one digest per part."""
        if not self.composite:
            return len(digests) == 1 and digests[0] == self.digest
        if self.part_count != len(digests):
            return False
        return _combined(self.new_digest, digests) == self.digest


def expected(checksum: str, part_size: int | None, preferred: str,
             algorithm: str | None = None) -> Expected | None:
    """The checksum as a download can check it in-stream, or None when it cannot say which
    algorithm made it (or cannot compute that one here): file_matches then decides.

    part_size: what a composite checksum's parts are; algorithm: what made it, when the
    manifest says (both from the manifest)."""
    parsed = _parse(checksum)
    if parsed is None:
        return None
    digest, part_count = parsed
    names = _candidates(len(digest), preferred, algorithm)
    # Without a part count, a multipart object's checksum may be full or composite
    # (file_matches tries both); with one, it is composite and needs the part size.
    if len(names) != 1 or (part_size is None) != (part_count is None):
        return None
    try:
        _ALGORITHMS[names[0]][1]()
    except ChecksumUnavailable:
        return None
    return Expected(names[0], digest, part_size, part_count)


def file_matches(path: Path, checksum: str, part_size: int | None, preferred: str,
                 algorithm: str | None = None) -> bool:
    """Whether the file's bytes have this S3 checksum; preferred is the configured algorithm,
    algorithm the one that made the checksum when the manifest says.

    part_size is needed for a composite checksum. Raises ChecksumUnavailable when no
    algorithm matched and one that might have could not be computed.
    """
    parsed = _parse(checksum)
    if parsed is None:
        return False
    expected, part_count = parsed
    if part_count is not None and part_size is None:
        return False  # a composite checksum without the part size cannot be recomputed
    unavailable: ChecksumUnavailable | None = None
    for name in _candidates(len(expected), preferred, algorithm):
        make = _ALGORITHMS[name][1]
        try:
            make()
        except ChecksumUnavailable as exc:
            unavailable = exc
            continue
        # A checksum with a part count is composite; without one it may be either.
        whole, composite, parts = _digests(path, make, part_size, part_count is None)
        if part_count is None and whole == expected:
            return True
        if composite == expected and part_count in (None, parts):
            return True  # None: some S3 implementations leave off the part count
    if unavailable is not None:
        raise unavailable
    return False
