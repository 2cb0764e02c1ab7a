"""Where the bucket name comes from: --bucket, else $S3_BUCKET_NAME, else config/.env."""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from spotwatch.errors import ConfigError

BUCKET_ENV = "S3_BUCKET_NAME"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# An S3 Express One Zone directory bucket: base-name--<zone-id>--x-s3 (no dots), e.g.
# ckpt--usw2-az1--x-s3 or, in a Local Zone, ckpt--usw2-lax1-az1--x-s3.
_DIRECTORY_BUCKET_RE = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?--[a-z0-9]+(?:-[a-z0-9]+)*-az[0-9]+--x-s3$")


def env_file_candidates(config_file: Path | None) -> list[Path]:
    """config/.env beside the config file first, then in the working directory."""
    candidates = []
    if config_file is not None:
        # Beside the config file as named (a link's folder, not its target's): where its
        # relative paths are taken from too.
        candidates.append(config_file.absolute().parent / "config" / ".env")
    candidates.append(Path.cwd() / "config" / ".env")
    return list(dict.fromkeys(candidates))


class NoBucket(ConfigError):
    """No bucket named anywhere."""


NO_BUCKET = f"no bucket: pass --bucket, set {BUCKET_ENV}, or put {BUCKET_ENV}=... in config/.env"


@dataclass(frozen=True)
class NamedBucket:
    name: str
    # Where it was named: "--bucket", "$S3_BUCKET_NAME", or the env file's path (a refusal
    # says so: a config/.env in the working directory names a bucket without a word).
    source: str


def named_bucket(explicit: str | None, config_file: Path | None) -> NamedBucket:
    """The first of --bucket, $S3_BUCKET_NAME and each env_file_candidates file that names a
    bucket. An explicit --bucket is used as given: an empty one is an error, never a
    fallback."""
    if explicit is not None and not explicit.strip():
        raise ConfigError("--bucket is empty: name a bucket, or leave the flag out to use "
                          f"${BUCKET_ENV} or config/.env")
    if explicit:
        return _named(explicit.strip(), "--bucket")
    # A variable of blanks (`S3_BUCKET_NAME=" "` in a unit file) is as good as unset.
    name = os.environ.get(BUCKET_ENV, "").strip()
    if name:
        return _named(name, f"${BUCKET_ENV}")
    for env_file in env_file_candidates(config_file):
        name = (_bucket_in_env_file(env_file) or "").strip()
        if name:
            return _named(name, str(env_file))
    raise NoBucket(NO_BUCKET)


def _named(name: str, source: str) -> NamedBucket:
    if not is_valid_bucket_name(name):
        raise ConfigError(f"not a valid S3 bucket name: {name[:80]!r} (from {source})")
    return NamedBucket(name, source)


def _bucket_in_env_file(env_file: Path) -> str | None:
    """S3_BUCKET_NAME from an env file, None without one; a file that is there but cannot be
    read, or is not UTF-8, is a config error rather than a silent fallback."""
    # Imported here: most runs name the bucket, and dotenv costs every start 5 ms of CPU.
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        if not env_file.is_file():
            return None
        text = env_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {env_file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{env_file}: not UTF-8 text (byte {exc.start})") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error and BUCKET_ENV in binding.original.string:
            raise ConfigError(f"{env_file}, line {binding.original.line}: cannot read "
                              f"{binding.original.string.strip()!r} as {BUCKET_ENV}=name")
    # Lines it cannot parse are other tools' business here: dotenv's warning about them,
    # which names no file, is not said.
    logging.getLogger("dotenv.main").setLevel(logging.ERROR)
    return dotenv_values(stream=io.StringIO(text)).get(BUCKET_ENV)


def is_valid_bucket_name(name: str) -> bool:
    """All of S3's rules: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit
    at both ends, no '..', not an IP address, no reserved prefix or suffix; except that a
    directory bucket (S3 Express One Zone) ends in --<zone-id>--x-s3."""
    if not _BUCKET_RE.fullmatch(name) or ".." in name or _IP_ADDRESS_RE.fullmatch(name):
        return False
    if name.startswith(RESERVED_PREFIXES):
        return False
    return not name.endswith(RESERVED_SUFFIXES) or bool(_DIRECTORY_BUCKET_RE.fullmatch(name))
