"""Include/exclude filters with exactly the semantics of `aws s3 sync` (AWS CLI v1 and v2).

Every file starts included; the config's ``exclude`` list is applied before its ``include``
list, and a later matching pattern wins, so ``exclude: ["*"]`` with ``include: ["*.pt"]`` keeps
only ``.pt`` files, like ``--exclude '*' --include '*.pt'``.

Like the AWS CLI, patterns are matched against full paths, not relative ones: a file is
``<root>/<relative path>`` with the watched root made absolute and normalised, and a pattern is
``os.path.join(<root>, pattern)``. So a relative pattern is anchored at the watched directory,
and a pattern starting with ``/`` is an absolute path used as given (``/*`` matches every
file). Matching is fnmatch's on POSIX: case-sensitive, ``*`` also matches ``/``, ``[...]`` is a
character class.

One exception: spotwatch's default excludes (config.DEFAULT_EXCLUDE, in force when none are
configured) are its own guard against uploading staging names, so they are anchored at the
watched directory as it is named: a ``[``, ``*`` or ``?`` in its path is no wildcard for them.
Anchored as the CLI does, a watched ``run[1]/ckpt`` had them match nothing, and a half-written
``step_2.tmp/`` was sealed and restored as the newest checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from fnmatch import translate
from glob import escape

from spotwatch.config import DEFAULT_EXCLUDE, STAGING_NAMES, WatchDir

_Matcher = Callable[[str], "re.Match[str] | None"]


class PathFilter:
    def __init__(self, root: str | os.PathLike[str], exclude: tuple[str, ...],
                 include: tuple[str, ...], literal_root: frozenset[str] = frozenset()) -> None:
        """literal_root: the patterns anchored at the root as it is named (its wildcard
        characters taken literally), not as the CLI anchors them."""
        anchor = os.path.abspath(root)
        # The CLI lists a directory's files as its absolute path plus a separator plus the name
        # (for the root "/" that gives "//name", and the CLI's own patterns then miss them).
        self._file_prefix = anchor + os.sep
        self._rules: list[tuple[_Matcher, bool]] = [
            (self._compile(escape(anchor) if pattern in literal_root else anchor, pattern),
             included)
            for patterns, included in ((exclude, False), (include, True))
            for pattern in patterns
        ]

    @staticmethod
    def _compile(anchor: str, pattern: str) -> _Matcher:
        # os.path.join drops the anchor when the pattern is absolute, as the CLI relies on.
        return re.compile(translate(os.path.join(anchor, pattern))).match

    @classmethod
    def for_watch(cls, watch: WatchDir) -> PathFilter:
        defaults = frozenset(DEFAULT_EXCLUDE) if watch.exclude == DEFAULT_EXCLUDE else frozenset()
        return cls(watch.path, watch.exclude, watch.include, defaults)

    @classmethod
    def staging_names(cls, watch: WatchDir) -> PathFilter:
        """Rejects exactly the paths named as a save stages them (config.STAGING_NAMES),
        anchored at the root as it is named, as the default excludes are."""
        return cls(watch.path, STAGING_NAMES, (), frozenset(STAGING_NAMES))

    def accepts(self, relative_path: str) -> bool:
        """Whether `aws s3 sync <root>` would take the file at this path below the root."""
        full_path = self._file_prefix + relative_path
        included = True
        for matches, include in self._rules:
            if matches(full_path):
                included = include
        return included
