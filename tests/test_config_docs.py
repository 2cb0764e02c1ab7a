"""The README's configuration table is part of the declaration: the same keys, the same
defaults as the Structs in spotwatch.config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from spotwatch.config import config_keys, parse_size

README = Path(__file__).resolve().parents[1] / "README.md"
CODE = re.compile(r"`([^`]*)`")


def readme_table() -> dict[str, str]:
    """Each documented key with its default cell; 'a` / `b' rows split into two keys."""
    text = README.read_text()
    table = text[text.index("| key | default | meaning |"):].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        key_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        keys = CODE.findall(key_cell)
        defaults = default_cell.split(" / ") if len(keys) > 1 else [default_cell]
        for key, default in zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults,
                                strict=True):
            rows[key] = default
    return rows


def documented_value(cell: str) -> tuple[bool, Any]:
    """(True, value) when the cell states one literal default; (False, None) for prose such as
    '$AWS_REGION, else ...', which the code resolves at run time."""
    if cell in ("none", "(required)"):
        return True, None if cell == "none" else msgspec.NODEFAULT
    literals = CODE.findall(cell)
    if len(literals) != 1 or cell != f"`{literals[0]}`":
        return False, None
    return True, yaml.safe_load(literals[0])


def test_readme_lists_exactly_the_declared_keys() -> None:
    assert sorted(readme_table()) == sorted(config_keys())


def test_readme_defaults_are_the_declared_defaults() -> None:
    declared = config_keys()
    checked = 0
    for key, cell in readme_table().items():
        stated, value = documented_value(cell)
        if not stated:
            continue
        default = declared[key]
        if isinstance(default, int) and isinstance(value, str):
            value = parse_size(value, key)  # '64MB'
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default, (key, cell)
        checked += 1
    assert checked >= 30  # the prose cells are few: the table states nearly every default
