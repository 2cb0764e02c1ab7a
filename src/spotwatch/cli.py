"""Command line: argument parsing and exit codes only; the work happens elsewhere."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from signal import SIGPIPE
from typing import Any, NoReturn

from spotwatch.collector import uncollected_start_up
from spotwatch.console import (
    CLOSED_OUTPUT,
    OutputError,
    one_line,
    print_error,
    print_line,
    print_text,
    writing_output,
)
from spotwatch.errors import SpotwatchError
from spotwatch.limits import raise_open_files_limit


class _ShowVersion(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        import spotwatch

        print_line(f"spotwatch {spotwatch.__version__}")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not a usage dump: the message says what to fix.
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        """argparse drops a failed write; --help's to stdout fails the command instead, as
        any command's output does (a usage error to a stderr that takes nothing still exits
        2)."""
        if file is sys.stdout and message:
            print_text(message.removesuffix("\n"), file)
            return
        super()._print_message(message, file)


def _path(value: str) -> Path:
    """A path argument; an empty one (a shell variable unset) is refused rather than taken for
    the current directory."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path (is a shell variable unset?)")
    return Path(value)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", type=_path, help="config file (default: "
                        "$SPOTWATCH_CONFIG, ./config.yaml, /etc/spotwatch/config.yaml)")
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
    restore.add_argument("--to", type=_path, help="destination (default: the watched directory)")
    restore.add_argument("--set", dest="set_name", help="a given set instead of the newest (a "
                         "numbered set directory with the top-level files beside it)")
    restore.add_argument("--prefix", help="which watched directory, by its prefix")
    restore.add_argument("--node-rank", type=int, metavar="N", help="on a multi-node job: "
                         "only node N's part of the newest set complete for the whole job")
    prune = commands.add_parser("prune", parents=[common], help="delete from S3 what was "
                                "deleted locally (sync.delete) and sets past sync.keep_sets")
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")
    prune.add_argument("--delete", action="store_true", default=None,
                       help="mirror local deletions even if sync.delete is off")
    prune.add_argument("--keep-sets", type=int, metavar="N", help="override sync.keep_sets")
    commands.add_parser("iam-policy", parents=[common], help="print the least-privilege IAM "
                        "policy for the configured bucket and prefixes")
    commands.add_parser("demo", help="rehearse an interruption against embedded S3 and IMDS",
                        description="Rehearse an interruption: an embedded S3 and IMDS, a "
                        "simulated trainer, a spot notice, the flush, and a check of every "
                        "object against the trainer's files. Needs no AWS account.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # In the try: a Ctrl-C while the parser is built ends the command as any other does.
        args = build_parser().parse_args(argv)
        raise_open_files_limit()
        return _command(args.command)(args)
    except SpotwatchError as exc:
        print_error(str(exc))
        return exc.exit_code
    except OutputError as exc:
        print_error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as exc:
        if not _stdout_gone():
            print_error(str(exc))
            return 1
        return _ended_by_a_closed_pipe()


def _ended_by_a_closed_pipe() -> int:
    """The reader of stdout went away (spotwatch status | head -1): the command ends as
    SIGPIPE ends one, quietly; the interpreter's last flush of stdout must not raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + SIGPIPE


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """spotwatch.commands.<name>.run, imported only when called: `status` runs as a container
    health check and needs neither the daemon nor the upload machinery."""
    with uncollected_start_up():
        module = importlib.import_module(f"spotwatch.commands.{name.replace('-', '_')}")
    run: Callable[[argparse.Namespace], int] = module.run
    return run


def entry() -> NoReturn:
    """The console command: main(), then exit without tearing the interpreter down.

    By now every upload is finished and recorded, the state lock released and the ledger
    closed; what is left is freeing boto3's object graph, a tenth of a second of every
    command (status runs as a container health check)."""
    if sys.stdout is None:  # closed (>&-): what a command prints then fails it, as a full disk
        sys.stdout = CLOSED_OUTPUT
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors: flushed below
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    try:
        with writing_output():
            sys.stdout.flush()  # buffered output goes only now: a full disk says so here
    except BrokenPipeError:
        code = _ended_by_a_closed_pipe()
    except OutputError as exc:
        print_error(str(exc))
        code = code or 1  # a usage or config error keeps its own code
    with contextlib.suppress(OSError, AttributeError):  # stderr closed too: nothing to say
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

