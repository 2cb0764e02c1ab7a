"""Include/exclude filters with `aws s3 sync` semantics.

Every file starts included; patterns are fnmatch patterns (``*`` also matches ``/``) against the
path relative to the watched directory, applied in order with the later match winning. The
config's ``exclude`` list is applied before its ``include`` list, so ``exclude: ["*"]`` with
``include: ["*.pt"]`` keeps only ``.pt`` files, like ``--exclude '*' --include '*.pt'``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from spotwatch.config import WatchDir


class PathFilter:
    def __init__(self, exclude: tuple[str, ...], include: tuple[str, ...]) -> None:
        self._rules = [(p, False) for p in exclude] + [(p, True) for p in include]

    @classmethod
    def for_watch(cls, watch: WatchDir) -> PathFilter:
        return cls(watch.exclude, watch.include)

    def accepts(self, relative_path: str) -> bool:
        included = True
        for pattern, include in self._rules:
            if fnmatchcase(relative_path, pattern):
                included = include
        return included
