"""`spotwatch prune`: one pass of mirrored deletions and retention (spotwatch.sync.pruner)."""

from __future__ import annotations

import argparse

from spotwatch.commands import load
from spotwatch.config import require_node_rank
from spotwatch.console import names, print_line
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.sync.pruner import prune_once, resealed


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args, uploads=False)
    require_node_rank(config)  # on a job, which node's uploads and part are its own
    keep_sets = config.sync.keep_sets if args.keep_sets is None else args.keep_sets
    if keep_sets < 0:
        raise ConfigError("--keep-sets must be at least 0")
    mirror = bool(args.delete or config.sync.delete)
    if not mirror and not keep_sets:
        if args.keep_sets is not None:  # asked for, but 0: the hint must not suggest it again
            raise ConfigError("nothing to prune: --keep-sets 0 keeps every set (give a number "
                              "above 0, or set sync.delete or pass --delete)")
        raise ConfigError("nothing to prune: set sync.delete or sync.keep_sets "
                          "(or pass --delete / --keep-sets)")
    report = prune_once(config, bucket, mirror, keep_sets, dry_run=args.dry_run)
    planned = report.planned
    shown = planned if args.dry_run else report.deleted
    verb = "would delete" if args.dry_run else "deleted"
    for deletion in shown:
        print_line(f"{verb} s3://{bucket}/{deletion.key} ({deletion.reason})")
    # A set that lost a file to a mirrored deletion is sealed again with the rest of it.
    sealed_as = "part of its manifest" if config.job.is_multi_node else "manifest"
    for set_key in resealed(config.watch, shown) if args.dry_run else report.resealed:
        print_line(f"{'would seal' if args.dry_run else 'sealed'} s3://{bucket}/{set_key} "
                   f"again with the files left of it (a new {sealed_as})")
    print_line(f"{verb} {len(shown)} objects")
    if len(shown) < len(planned):  # a refusal (access denied) must not pass for done
        raise SpotwatchError(f"{len(planned) - len(shown)} of {len(planned)} objects were not "
                             f"deleted (see the warnings above); the next prune tries again")
    if report.unsealed:
        raise SpotwatchError(f"the manifest of {names(report.unsealed)} could not be "
                             f"written again (see the warnings above)")
    return 0
