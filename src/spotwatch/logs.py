"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is.

Every line on stderr goes through one stdlib handler and one renderer: spotwatch's own events
and the records of botocore, urllib3, watchdog and other libraries alike, so a JSON stream
never carries a plain-text line.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

from spotwatch.console import one_line

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# Marks the handler this module installs, so configuring again replaces it.
_HANDLER_NAME = "spotwatch"


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    # The readable renderer shows values as reprs (escaped) but the event as it is: a
    # library's message may hold a newline or a name.
    one_line_event: list[structlog.typing.Processor] = [] if use_json else [_event_on_one_line]
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # Records from other libraries: their logger's name and their message as the event.
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, *one_line_event, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' info records are chatter ("Found credentials in environment variables"):
    # they show from warning up, or everything when debugging.
    threshold = _LEVELS[level]
    root.setLevel(threshold if threshold == logging.DEBUG else max(threshold, logging.WARNING))
    logging.getLogger("spotwatch").setLevel(threshold)


def _event_on_one_line(logger: object, method: str,
                       event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    if isinstance(event.get("event"), str):
        event["event"] = one_line(event["event"])
    return event


def printable_path(path: str | os.PathLike[str]) -> str:
    """A path for a log line or status: bytes that are not UTF-8 escaped as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
