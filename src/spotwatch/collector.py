"""Python's cyclic garbage collector and the objects a command makes once and keeps."""

from __future__ import annotations

import gc


def exempt_long_lived_objects() -> None:
    """Everything made until now (modules, botocore's models and clients, the engine) lives as
    long as the command: the cyclic garbage collector stops traversing it. Its full
    collections walked all of botocore's models each time, a tenth of a flush's CPU for many
    small files. Objects made later are collected as before; these are still freed when no
    longer referenced, only a reference cycle among them would stay."""
    gc.freeze()
