"""Python's cyclic garbage collector and the objects a command makes once and keeps."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def exempt_long_lived_objects() -> None:
    """Everything made until now (modules, botocore's models and clients, the engine) lives as
    long as the command: the cyclic garbage collector stops traversing it. Its full
    collections walked all of botocore's models each time, a tenth of a flush's CPU for many
    small files. Objects made later are collected as before; these are still freed when no
    longer referenced, only a reference cycle among them would stay."""
    gc.freeze()


@contextmanager
def uncollected_start_up() -> Iterator[None]:
    """Run a command's start-up (importing it: botocore, boto3, structlog ...) without the
    cyclic collector, then exempt what it made, which stays as long as the command: while
    importing `restore` its collections walked the growing heap of modules some 130 times,
    once in full, 24 ms of every start."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        exempt_long_lived_objects()
        if enabled:
            gc.enable()
