"""Where the bucket name comes from: --bucket, else $S3_BUCKET_NAME, else config/.env."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dotenv import dotenv_values

from spotwatch.errors import ConfigError

BUCKET_ENV = "S3_BUCKET_NAME"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def env_file_candidates(config_file: Path | None) -> list[Path]:
    """config/.env beside the config file first, then in the working directory."""
    candidates = []
    if config_file is not None:
        candidates.append(config_file.resolve().parent / "config" / ".env")
    candidates.append(Path.cwd() / "config" / ".env")
    return list(dict.fromkeys(candidates))


def resolve_bucket(explicit: str | None, config_file: Path | None) -> str:
    name = explicit or os.environ.get(BUCKET_ENV)
    if not name:
        for env_file in env_file_candidates(config_file):
            if env_file.is_file():
                name = dotenv_values(env_file).get(BUCKET_ENV)
                if name:
                    break
    if not name:
        raise ConfigError(
            f"no bucket: pass --bucket, set {BUCKET_ENV}, or put {BUCKET_ENV}=... in config/.env"
        )
    return validate_bucket_name(name.strip())


def validate_bucket_name(name: str) -> str:
    if not _BUCKET_RE.match(name) or ".." in name or name.startswith("xn--"):
        raise ConfigError(f"not a valid S3 bucket name: {name!r}")
    return name
