"""Which notices are known: seen by this process (each is handed on once, and again when its
deadline moves earlier) and acted on during this boot (hooks act once per notice, and again
when its deadline moves earlier, across restarts too)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from spotwatch.logs import get_logger
from spotwatch.model import Notice
from spotwatch.notices.sources import iso_time
from spotwatch.state import write_json_atomically

log = get_logger("spotwatch.hooks")


def moved_earlier(deadline: datetime | None, known: datetime | None) -> bool:
    """Whether a notice seen again with this deadline gives less time than the one known of
    it (a maintenance event rescheduled earlier, or a time now readable that was not)."""
    return deadline is not None and (known is None or deadline < known)


class SeenNotices:
    """Notices already handed on, each with the earliest deadline it was handed on with;
    thread-safe, as every notice source polls on a thread of its own and the same notice is
    posted on every poll.

    Invariant (the trainer is never told it has more time than it has): a notice seen again
    with an earlier deadline (AWS reschedules a maintenance event under the same EventId) is
    handed on again; seen with a later one, it is not: the earlier time may still stand."""

    def __init__(self) -> None:
        self._deadlines: dict[str, datetime | None] = {}
        self._lock = threading.Lock()

    def first_sightings(self, notices: Iterable[Notice]) -> list[Notice]:
        """The notices never seen before, or seen again due earlier; now remembered."""
        fresh = []
        with self._lock:
            for notice in notices:  # one reply may list the same notice twice, too
                if (notice.id not in self._deadlines
                        or moved_earlier(notice.deadline, self._deadlines[notice.id])):
                    self._deadlines[notice.id] = notice.deadline
                    fresh.append(notice)
        return fresh

    def forget(self, ids: Iterable[str]) -> list[str]:
        """Notices withdrawn: seen again, they are handed on again. Returns those of them
        that were seen."""
        with self._lock:
            return [notice_id for notice_id in ids
                    if self._deadlines.pop(notice_id, _UNSEEN) is not _UNSEEN]


_UNSEEN = object()

# Changes on every boot: a notice acted on in an earlier life of the instance means nothing now.
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def current_boot() -> str | None:
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Told:
    """The notice the trainer has (its notice file). kind and source say whether AWS may
    withdraw it (None: recorded by an earlier spotwatch)."""

    id: str
    deadline: datetime | None
    kind: str | None = None
    source: str | None = None


# The deadline recorded for a notice acted on by a spotwatch that kept no deadlines: none is
# earlier, so its hooks do not act on it again.
_NO_EARLIER = datetime.min.replace(tzinfo=UTC)


class ActedNotices:
    """The notices whose hooks ran during this boot (each with the earliest deadline they
    acted with: one moved earlier makes them act again), and the notice the trainer was
    last told of, kept in the state directory so that a restarted daemon, seeing the same
    notices still posted, neither acts on one again nor tells the trainer one kept from it,
    whatever became of the notice file (a trainer may delete it)."""

    def __init__(self, path: Path, boot: str | None) -> None:
        self._path = path
        self._boot = boot
        self.acted: dict[str, datetime | None] = {}
        self.told: Told | None = None

    def load(self) -> None:
        self.acted, self.told = {}, None
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return  # none yet
        except OSError as exc:
            # Refused at start (StateDir.ensure); met later, the hooks may act again on a
            # notice they acted on: said, never taken silently for none acted on.
            log.warning("hook_record_unreadable", path=str(self._path), error=exc.strerror,
                        detail="hooks may act again on a notice they acted on")
            return
        except ValueError:
            return  # torn or foreign: nothing was acted on that we know of
        if self._boot is None or not isinstance(data, dict) or data.get("boot_id") != self._boot:
            return
        ids, deadlines = data.get("ids"), data.get("deadlines")
        deadlines = deadlines if isinstance(deadlines, dict) else {}
        if isinstance(ids, list):
            self.acted = {i: iso_time(deadlines[i]) if i in deadlines else _NO_EARLIER
                          for i in ids if isinstance(i, str)}
        told = data.get("told")
        if isinstance(told, dict) and isinstance(told.get("id"), str) and all(
                isinstance(told.get(key), (str, type(None)))
                for key in ("deadline", "kind", "source")):
            self.told = Told(told["id"], iso_time(told.get("deadline")), told.get("kind"),
                             told.get("source"))

    def tell(self, told: Told) -> bool:
        """The trainer is told of this notice now. True when its hooks have not acted on it
        yet, or acted with a later deadline than it now has (they act now; during this boot
        never again, unless it moves earlier still)."""
        act = told.id not in self.acted or moved_earlier(told.deadline, self.acted[told.id])
        if act:
            self.acted[told.id] = told.deadline
        self.told = told
        self._save()
        return act

    def withdraw(self) -> None:
        """The trainer no longer has a notice (the one it had was withdrawn); its hooks still
        never act on it again."""
        self.told = None
        self._save()

    def _save(self) -> None:
        told = self.told
        try:
            write_json_atomically(self._path, {
                "boot_id": self._boot, "ids": sorted(self.acted),
                "deadlines": {i: None if deadline is None else deadline.isoformat()
                              for i, deadline in sorted(self.acted.items())},
                "told": None if told is None else {
                    "id": told.id, "kind": told.kind, "source": told.source,
                    "deadline": told.deadline.isoformat() if told.deadline else None}})
        except OSError as exc:  # the hooks still run: told twice beats never told
            log.warning("hook_record_failed", path=str(self._path), error=exc.strerror)
