"""One module per CLI command, each with `run(args) -> exit code`; cli.py only dispatches."""

from __future__ import annotations

import argparse

from spotwatch.aws.imds import share_with_sdk
from spotwatch.bucket import NO_BUCKET, NamedBucket, NoBucket, named_bucket
from spotwatch.config import (
    Config,
    find_config_file,
    load_config,
    require_node_rank,
    require_watch_dirs,
)
from spotwatch.logs import configure_logging


def load(args: argparse.Namespace, uploads: bool = True) -> tuple[Config, str]:
    """Config and bucket; a command that uploads also needs its watched directories and,
    on a node of a job, the node's rank."""
    config, bucket = load_optional_bucket(args, uploads)
    if bucket is None:
        raise NoBucket(NO_BUCKET)
    return config, bucket.name


def load_optional_bucket(args: argparse.Namespace, uploads: bool = False
                         ) -> tuple[Config, NamedBucket | None]:
    """Config, and the bucket when one is named anywhere (None when none is: `status` reads
    it from the running daemon's report, since the systemd unit names it to the daemon
    alone)."""
    path = find_config_file(args.config)
    config = load_config(path)
    share_with_sdk(config.imds)
    try:
        bucket: NamedBucket | None = named_bucket(args.bucket, path)
    except NoBucket:
        bucket = None
    if uploads:
        require_watch_dirs(config)
        require_node_rank(config)
    configure_logging(config.log.level, config.log.format)
    return config, bucket
