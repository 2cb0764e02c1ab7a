"""Command line: argument parsing and exit codes only; the work happens elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import structlog

from spotwatch.bucket import resolve_bucket
from spotwatch.config import Config, find_config_file, load_config, require_watch_dirs
from spotwatch.errors import ConfigError, SpotwatchError
from spotwatch.logs import configure_logging


class _ShowVersion(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        import spotwatch

        print(f"spotwatch {spotwatch.__version__}")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not a usage dump: the message says what to fix.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", help="config file (default: $SPOTWATCH_CONFIG, "
                        "./config.yaml, /etc/spotwatch/config.yaml)")
    common.add_argument("--bucket", help="S3 bucket (default: $S3_BUCKET_NAME or config/.env)")

    parser = _Parser(prog="spotwatch", description="Keep EC2 Spot training checkpoints safe "
                     "in S3 when the instance is reclaimed.")
    parser.add_argument("--version", action=_ShowVersion, nargs=0,
                        help="show the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    commands.add_parser("run", parents=[common], help="run the daemon")
    commands.add_parser("flush", parents=[common], help="upload everything pending, then exit")
    commands.add_parser("check", parents=[common], help="preflight: bucket region, public "
                        "access, write permission, credentials, IMDS")
    status = commands.add_parser("status", parents=[common], help="show pending work and "
                                 "the last upload and notice")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--healthy", action="store_true", help="print nothing; exit 0 only "
                        "if a daemon is running, reported recently and is not degraded "
                        "(container health)")
    restore = commands.add_parser("restore", parents=[common], help="download the newest "
                                  "complete checkpoint set")
    restore.add_argument("--to", type=Path, help="destination (default: the watched directory)")
    restore.add_argument("--set", dest="set_name", help="a given set instead of the newest")
    restore.add_argument("--prefix", help="which watched directory, by its prefix")
    prune = commands.add_parser("prune", parents=[common], help="delete from S3 what was "
                                "deleted locally (sync.delete) and sets past sync.keep_sets")
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")
    prune.add_argument("--delete", action="store_true", default=None,
                       help="mirror local deletions even if sync.delete is off")
    prune.add_argument("--keep-sets", type=int, metavar="N", help="override sync.keep_sets")
    commands.add_parser("iam-policy", parents=[common], help="print the least-privilege IAM "
                        "policy for the configured bucket and prefixes")
    commands.add_parser("demo", help="rehearse an interruption against embedded S3 and IMDS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "flush": _flush,
        "status": _status,
        "check": _check,
        "restore": _restore,
        "prune": _prune,
        "iam-policy": _iam_policy,
        "demo": _demo,
    }
    try:
        return handlers[args.command](args)
    except SpotwatchError as exc:
        print(f"spotwatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace, need_watch_dirs: bool = True) -> tuple[Config, str]:
    path = find_config_file(args.config)
    config = load_config(path)
    bucket = resolve_bucket(args.bucket, path)
    if need_watch_dirs:
        require_watch_dirs(config)
    configure_logging(config.log.level, config.log.format)
    return config, bucket


def _run(args: argparse.Namespace) -> int:
    from spotwatch.aws.preflight import failures, run_checks
    from spotwatch.aws.region import resolve_region
    from spotwatch.aws.s3 import make_s3_client
    from spotwatch.daemon.loop import Daemon

    config, bucket = _load(args)
    log = structlog.get_logger("spotwatch")
    client = make_s3_client(resolve_region(config), config.transfer)
    results = run_checks(config, bucket, client)
    for result in results:
        log.info("check", name=result.name, ok=result.ok, detail=result.detail)
    refused = failures(results)
    if refused:
        raise SpotwatchError(f"refusing to start: {refused[0].name}: {refused[0].detail}")
    return Daemon(config, bucket, client).run()


def _check(args: argparse.Namespace) -> int:
    from spotwatch.aws.preflight import failures, run_checks

    config, bucket = _load(args, need_watch_dirs=False)
    results = run_checks(config, bucket)
    for result in results:
        print(f"{result.symbol}  {result.name:<16} {result.detail}")
    return 1 if failures(results) else 0


def _flush(args: argparse.Namespace) -> int:
    from spotwatch.daemon.loop import Daemon
    from spotwatch.flush_request import request_daemon_flush
    from spotwatch.progress import ProgressBar
    from spotwatch.state import StateDir

    config, bucket = _load(args)
    delegated = request_daemon_flush(StateDir(config.state_dir))
    if delegated is not None:
        if delegated.get("failed"):
            print(f"spotwatch: error: the daemon's flush left {delegated['failed']} failing "
                  f"files: {', '.join(delegated.get('failed_files', []))}", file=sys.stderr)
            return 1
        return 0
    outcome = Daemon(config, bucket).flush_once(ProgressBar("flushing", 0))
    structlog.get_logger("spotwatch").info(
        "flush_summary", files=outcome.files, bytes=outcome.bytes, failed=outcome.failed)
    return outcome.exit_code


def _status(args: argparse.Namespace) -> int:
    from spotwatch.status import gather_status, is_healthy, render_status

    config, bucket = _load(args, need_watch_dirs=False)
    report = gather_status(config, bucket)
    if args.healthy:
        return 0 if is_healthy(report) else 1
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from spotwatch.sync.restore import restore

    config, bucket = _load(args, need_watch_dirs=False)
    report = restore(config, bucket, args.to, args.set_name, args.prefix)
    passed_over = (f"; newer sets passed over: {', '.join(report.passed_over)}"
                   if report.passed_over else "")
    print(f"restored {report.set_name} into {report.destination}: {report.downloaded} files "
          f"downloaded ({report.bytes / 2**20:.1f} MiB), {report.skipped} already present"
          f"{passed_over}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from spotwatch.sync.pruner import prune_once

    config, bucket = _load(args, need_watch_dirs=False)
    keep_sets = config.sync.keep_sets if args.keep_sets is None else args.keep_sets
    if keep_sets < 0:
        raise ConfigError("--keep-sets must be at least 0")
    mirror = bool(args.delete or config.sync.delete)
    if not mirror and not keep_sets:
        raise ConfigError("nothing to prune: set sync.delete or sync.keep_sets "
                          "(or pass --delete / --keep-sets)")
    deletions = prune_once(config, bucket, mirror, keep_sets, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for deletion in deletions:
        print(f"{verb} s3://{bucket}/{deletion.key} ({deletion.reason})")
    print(f"{verb} {len(deletions)} objects")
    return 0


def _iam_policy(args: argparse.Namespace) -> int:
    from spotwatch.iam_policy import policy_for

    config, bucket = _load(args, need_watch_dirs=False)
    print(json.dumps(policy_for(config, bucket), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from spotwatch.demo import run_demo
    except ImportError as exc:
        raise ConfigError(f"the demo needs extra packages: pip install 'spotwatch[demo]' ({exc})"
                          ) from None
    return run_demo()


def entry() -> NoReturn:
    """The console command: main(), then exit without tearing the interpreter down.

    By now every upload is finished and recorded, the state lock released and the ledger
    closed; what is left is freeing boto3's object graph, a tenth of a second of every
    command (status runs as a container health check)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (spotwatch status | head): nothing more to say
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()

