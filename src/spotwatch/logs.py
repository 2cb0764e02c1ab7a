"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is.

Every line on stderr goes through one stdlib handler and one renderer: spotwatch's own events
and the records of botocore, urllib3, watchdog and other libraries alike, so a JSON stream
never carries a plain-text line.

structlog itself is imported when the first line is written, not before: with the asyncio it
imports, it was 40 ms of every command's start (a sixth of a restore's, most of a health
check's `status`), and a command that has nothing to say never needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from spotwatch.console import one_line

if TYPE_CHECKING:
    import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# Marks the handler this module installs, so configuring again replaces it.
_HANDLER_NAME = "spotwatch"


class _Configuration:
    """What configure_logging asked for; structlog is configured to it on the first line."""

    def __init__(self) -> None:
        self.threshold = logging.NOTSET  # unconfigured: every line goes to structlog's default
        self._lock = threading.RLock()  # a line written while configuring must not deadlock
        self._pending = False  # asked for, structlog not yet configured to it

    def ask(self, level: str) -> None:
        with self._lock:
            self.threshold = _LEVELS[level]
            self._pending = True

    def applied(self) -> None:
        """Configure structlog as last asked, once (from whichever thread logs first)."""
        if not self._pending:
            return
        with self._lock:
            if self._pending:
                import structlog

                # Configured meanwhile by someone else (structlog.testing.capture_logs): kept.
                if not structlog.is_configured():
                    _configure_structlog(self.threshold)
                self._pending = False


_configuration = _Configuration()


class Logger:
    """A module's structlog logger, made on its first line at an enabled level."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def debug(self, event: str, **fields: Any) -> None:
        self._write(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._write(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._write(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._write(logging.ERROR, "error", event, fields)

    def _write(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if level < _configuration.threshold:
            return  # as structlog's filtering logger would, without importing it
        _configuration.applied()
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        getattr(self._logger, method)(event, **fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    _configuration.ask(level)
    if "structlog" in sys.modules:  # loaded already: configured at once, as callers expect
        _configuration.applied()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter(use_json))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' warnings (watchdog's, say) go through the handler too: a JSON log stays
    # JSON lines, not raw text among them.
    logging.captureWarnings(True)
    # Libraries' info records are chatter ("Found credentials in environment variables"):
    # they show from warning up, or everything when debugging.
    threshold = _LEVELS[level]
    root.setLevel(threshold if threshold == logging.DEBUG else max(threshold, logging.WARNING))
    logging.getLogger("spotwatch").setLevel(threshold)


def _configure_structlog(threshold: int) -> None:
    import structlog

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *_shared_processors(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _shared_processors() -> list[structlog.typing.Processor]:
    import structlog

    return [structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True)]


class _Formatter(logging.Formatter):
    """The root handler's formatter: structlog's, made on the first record it formats."""

    def __init__(self, use_json: bool) -> None:
        super().__init__()
        self._use_json = use_json
        self._made: logging.Formatter | None = None
        self._lock = threading.RLock()

    def format(self, record: logging.LogRecord) -> str:
        with self._lock:
            if self._made is None:
                _configuration.applied()
                self._made = _processor_formatter(self._use_json)
        return self._made.format(record)


def _processor_formatter(use_json: bool) -> logging.Formatter:
    import structlog

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    # The readable renderer shows values as reprs (escaped) but the event as it is: a
    # library's message may hold a newline or a name.
    one_line_event: list[structlog.typing.Processor] = [] if use_json else [_event_on_one_line]
    return structlog.stdlib.ProcessorFormatter(
        # Records from other libraries: their logger's name and their message as the event.
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder(), *_shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, *one_line_event, renderer],
    )


def _event_on_one_line(logger: object, method: str,
                       event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    if isinstance(event.get("event"), str):
        event["event"] = one_line(event["event"])
    return event


def printable_path(path: str | os.PathLike[str]) -> str:
    """A path for a log line or status: bytes that are not UTF-8 escaped as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
