"""Why the trainer may miss, or missed, a notice, by hook: the hooks' degraded reasons."""

from __future__ import annotations

import threading
from typing import NamedTuple

CANNOT = "the trainer cannot be told of a notice"
MISSED = "the trainer was not told of the notice"


class Key(NamedTuple):
    hook: str  # notice_file, signal, command
    missed: bool  # an act at a notice failed (else: a check found the hook cannot act)


class HookProblems:
    """Held until cleared. Thread-safe: a command's exit is reaped off the daemon's loop."""

    def __init__(self) -> None:
        self._held: dict[Key, tuple[str, str]] = {}  # key -> (where, error)
        self._lock = threading.Lock()

    def hold(self, key: Key, where: str, error: str) -> bool:
        """True when this problem is new or changed: the caller says it then, not at every
        check that finds it again."""
        with self._lock:
            changed = self._held.get(key) != (where, error)
            self._held[key] = (where, error)
        return changed

    def clear(self, key: Key) -> bool:
        """True when a problem was held."""
        with self._lock:
            return self._held.pop(key, None) is not None

    def get(self, key: Key) -> tuple[str, str] | None:
        with self._lock:
            return self._held.get(key)

    def reasons(self) -> list[str]:
        with self._lock:
            held = sorted(self._held.items())
        return [f"{MISSED if key.missed else CANNOT}: {where}: {error}"
                for key, (where, error) in held]
