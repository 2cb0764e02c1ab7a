"""Where restore writes a set's files: below the destination, never through a symlink that
leads out of it, never two listed files into one; the per-folder resolution agrees with
resolving every path outright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.errors import SpotwatchError
from spotwatch.sync.restore import _Targets
from spotwatch.sync.sets.manifest import ManifestEntry

NAMES = st.sampled_from(["a", "b", "c"])
RELATIVE = st.lists(NAMES, min_size=1, max_size=3).map("/".join)


def reference(destination: Path, relative: str) -> Path | None:
    """What restore wrote to before folders were resolved once: every path resolved outright,
    None where that leads out of the destination or into a symlink loop."""
    root = destination.resolve()
    try:
        target = (destination / relative).resolve()
    except (RuntimeError, OSError):  # a symlink loop (OSError from Python 3.13)
        return None
    return target if root in target.parents else None


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(RELATIVE, min_size=1, max_size=6, unique=True),
       links=st.lists(st.tuples(RELATIVE, st.booleans(), RELATIVE | st.just(".")), max_size=3),
       destination_is_link=st.booleans())
def test_targets_agree_with_resolving_every_path(
        tmp_path_factory: pytest.TempPathFactory, paths: list[str],
        links: list[tuple[str, bool, str]], destination_is_link: bool) -> None:
    base = tmp_path_factory.mktemp("targets")
    real = base / "real"
    real.mkdir()
    destination = base / "link" if destination_is_link else real
    if destination_is_link:
        destination.symlink_to(real, target_is_directory=True)
    outside = base / "outside"
    outside.mkdir()
    for where, leads_out, to in links:  # symlinks already in the destination
        link = real / where
        if os.path.lexists(link) or not link.parent.is_dir():
            continue
        link.symlink_to((outside if leads_out else real) / to)
    targets = _Targets(destination)
    taken: set[Path] = set()
    for relative in paths:
        entry = ManifestEntry(f"run/{relative}", relative, 1, 1, None)
        expected = reference(destination, relative)
        if expected is None:
            with pytest.raises(SpotwatchError, match=r"escapes the destination|loop"):
                targets.of(entry)
        elif expected in taken:  # a symlink in the destination made two listed files one
            with pytest.raises(SpotwatchError, match="lead to the same file"):
                targets.of(entry)
        else:
            assert targets.of(entry) == expected
            taken.add(expected)
