"""What the CLI prints for a human (errors, summaries, the lines of `status` and `check`):
each message on one line, whatever names it holds.

A file name may hold a newline, a carriage return or a terminal's escape sequence, and a path
that is not UTF-8 holds surrogate escapes (which printing would refuse): printed as they are,
one message would become several lines (a log parser or `tail -1` then reads half of it) or
act on the terminal. Every such line goes through one_line; the JSON log escapes by itself,
and the readable log on a terminal goes through one_line as well (spotwatch.logs).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(code: int) -> str:
    char = chr(code)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): as the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


# C0 controls, DEL, C1 controls (NEL among them), the Unicode line and paragraph separators,
# and lone surrogates.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0xD800, 0xE000)]
_TABLE = {code: _escape(code) for code in _CONTROLS}


def one_line(text: str) -> str:
    """The text with every control character escaped (a newline as \\n), on one line."""
    return text.translate(_TABLE)


class OutputError(Exception):
    """What a command prints could not be written (stdout closed, a full disk): the command
    fails (exit 1) with one line on stderr, never a traceback. A reader that went away
    (BrokenPipeError) is not one: that ends the command as SIGPIPE would (cli)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot write the output: {reason}")


class _ClosedOutput(io.StringIO):
    """Stands for a stdout that was closed (`>&-`, sys.stdout None), where print() would
    drop the output without a word."""

    def write(self, text: str) -> int:
        raise OutputError("stdout is closed")


CLOSED_OUTPUT: TextIO = _ClosedOutput()


@contextlib.contextmanager
def writing_output() -> Iterator[None]:
    """Turns a failed write or flush of stdout into OutputError."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc)) from None


def print_text(text: str, file: TextIO | None = None) -> None:
    """Text already made of safe lines (JSON, a rendered report), on stdout unless file
    says otherwise."""
    with writing_output():
        print(text, file=file or sys.stdout or CLOSED_OUTPUT)


def print_line(text: str, file: TextIO | None = None) -> None:
    """One line for a human, on stdout unless file says otherwise."""
    print_text(one_line(text), file)


def print_error(message: str) -> None:
    """The one line an error is: `spotwatch: error: ...` on stderr. A stderr closed or full
    takes nothing and raises nothing: the exit code still tells."""
    if sys.stderr is None:  # closed (2>&-): print() would write to stdout instead
        return
    with contextlib.suppress(OSError):
        print(f"spotwatch: error: {one_line(message)}", file=sys.stderr, flush=True)


def names(items: Iterable[str]) -> str:
    """Names (paths, sets, files) as one comma-separated list a reader can split again: one
    that is empty, begins or ends in whitespace, holds ", " or begins with a quote is quoted,
    so that "step_2 " and "a, b" are not read as "step_2" and two names."""
    return ", ".join(_quoted(item) if _ambiguous(item) else item for item in items)


def _ambiguous(item: str) -> bool:
    return (not item or item != item.strip() or ", " in item or item[0] in "'\"")


def _quoted(item: str) -> str:
    return "'" + item.replace("\\", "\\\\").replace("'", "\\'") + "'"
