"""The engine's state read once, for status.json, the gauges and the final flush's verdict."""

from __future__ import annotations

from dataclasses import dataclass

from spotwatch.logs import printable_path
from spotwatch.sync.engine import SyncEngine

# Failing files status.json names at most (thousands may fail at once, S3 refusing them all).
FAILING_NAMED_MAX = 5


@dataclass(frozen=True)
class EngineSnapshot:
    """Invariant 8 holds here: pending counts cover queued, retrying and uploading files."""

    pending_files: int
    pending_bytes: int
    uploading: int
    retrying: int
    failing: int
    unsettled: int
    incomplete_sets: tuple[str, ...]
    # Sets whose manifest is not written yet, those awaiting their complete_when file too.
    unsealed_sets: tuple[str, ...] = ()
    # Directories spotwatch may not read: their files are not protected.
    unreadable_dirs: tuple[str, ...] = ()
    # Files whose names S3 cannot take: not protected either.
    refused_files: tuple[str, ...] = ()
    # Watched directories not there (not made or mounted yet): nothing of them is protected.
    missing_dirs: tuple[str, ...] = ()
    # The files failing (the first FAILING_NAMED_MAX), and why the first failed: what an
    # operator looks for first, without going to the log.
    failing_files: tuple[str, ...] = ()
    failing_because: str | None = None

    @property
    def unprotected(self) -> dict[str, list[str]]:
        """What the flush records of what it could not protect (FlushController.finish): at its
        end a set is incomplete only for a file it needs that is not in S3 and no longer on
        its way (the sealer does not report a set with a file pending, uploading, being written
        or just created; SyncEngine.flush_settled waits for those)."""
        return {"unreadable_dirs": list(self.unreadable_dirs),
                "refused_files": list(self.refused_files),
                "missing_dirs": list(self.missing_dirs),
                "incomplete_sets": list(self.incomplete_sets)}

    @classmethod
    def of(cls, engine: SyncEngine) -> EngineSnapshot:
        failing = engine.retries.failing()
        return cls(
            pending_files=engine.pending_files(),
            pending_bytes=engine.outstanding_bytes(),
            uploading=engine.uploader.in_flight(),
            retrying=len(engine.retries),
            failing=len(failing),
            unsettled=engine.unsettled(),
            incomplete_sets=tuple(sorted(engine.sealer.incomplete)),
            unsealed_sets=tuple(sorted(engine.sealer.unsealed() | set(engine.sealer.awaiting)
                                       | engine.sets_with_files_pending())),
            unreadable_dirs=tuple(printable_path(directory) for tracker in engine.trackers
                                  for directory in tracker.unreadable_dirs()),
            refused_files=tuple(printable_path(path) for path in engine.refused()),
            missing_dirs=tuple(printable_path(tracker.root) for tracker in engine.trackers
                               if tracker.missing()),
            failing_files=tuple(printable_path(item.path)
                                for item in failing[:FAILING_NAMED_MAX]),
            failing_because=engine.failure_of(failing[0].path) if failing else None,
        )
