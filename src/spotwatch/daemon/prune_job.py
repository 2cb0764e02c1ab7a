"""One prune on a background thread, so S3 listing and deleting never stall the daemon loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from spotwatch.config import WatchDir
from spotwatch.sync.pruner import Deletion, PruneCancelled, Pruner

log = structlog.get_logger("spotwatch.prune")


class PruneJob:
    """Plans and applies one prune on its own thread; the loop polls `finished()`."""

    def __init__(self, pruner: Pruner, watches: Sequence[WatchDir],
                 on_finished: Callable[[], None]) -> None:
        self._pruner = pruner
        self._watches = tuple(watches)
        self._on_finished = on_finished
        self.deleted: list[Deletion] = []
        self.completed = False  # planned and applied without failure or cancel
        self._thread = threading.Thread(target=self._run, name="prune", daemon=True)

    def start(self) -> PruneJob:
        self._pruner.cancelled.clear()  # the loop runs one job at a time: this one's flag
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._pruner.cancelled.set()

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            planned = self._pruner.plan(self._watches)
            self.deleted = self._pruner.apply(planned)
            self.completed = len(self.deleted) == len(planned)
        except PruneCancelled:
            log.info("prune_cancelled", deleted=0)
        except (BotoCoreError, ClientError) as exc:
            log.warning("prune_failed", error=str(exc))
        finally:
            self._on_finished()
