"""One run's resources: the state lock, the engine and pruner on one S3 client, the watchdog
observer, and the startup scan; released in reverse on exit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watchdog.observers import Observer

from spotwatch.aws.crt_store import make_store
from spotwatch.aws.health import S3Watch
from spotwatch.aws.region import resolve_region
from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import ObjectStore, Throttle
from spotwatch.collector import exempt_long_lived_objects
from spotwatch.config import Config
from spotwatch.keys import object_key
from spotwatch.logs import get_logger
from spotwatch.model import UploadResult
from spotwatch.state import StateDir, StateLock
from spotwatch.sync.engine import SyncEngine
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.orphans import abort_orphaned_uploads
from spotwatch.sync.out_of_sight import set_aside_if_wiped
from spotwatch.sync.pruner import Pruner
from spotwatch.sync.sets.claim import RankClaim
from spotwatch.sync.sets.parts import JobNode
from spotwatch.sync.tracker import ChangeTracker
from spotwatch.sync.uploader import Uploader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = get_logger("spotwatch.daemon")


@dataclass(frozen=True)
class Parts:
    engine: SyncEngine
    pruner: Pruner | None  # None: this run only uploads
    store: ObjectStore  # the one all of them use (the daemon's peer notices too)
    claim: RankClaim | None = None  # on a node of a job: whether it may seal its parts


def build_parts(config: Config, store: ObjectStore, ledger: Ledger,
                wake: Callable[[], None], prune: bool, claim: RankClaim | None = None) -> Parts:
    """Everything that talks to S3, built on one store."""
    settings = config.sync
    trackers = [ChangeTracker(w, settings.settle_seconds, settings.quiet_seconds, wake)
                for w in config.watch]

    def uploader(on_result: Callable[[UploadResult], None]) -> Uploader:
        return Uploader(store, on_result)

    node = JobNode.of(config.job)
    engine = SyncEngine(trackers, ledger, uploader, wake, node=node,
                        claim=claim if node is not None else None)
    # The daemon deletes; a one-off flush only uploads (see `spotwatch prune`).
    pruner = Pruner(store, ledger, settings.delete, settings.keep_sets, node) if prune else None
    return Parts(engine, pruner, store, claim if node is not None else None)


class Session:
    """Context for one run; entering it returns the engine (and pruner) ready to pump."""

    def __init__(self, config: Config, bucket: str, state: StateDir, s3_watch: S3Watch,
                 wake: Callable[[], None], client: S3Client | None = None,
                 prune: bool = False, throttle: Throttle | None = None,
                 before_s3: Callable[[], None] | None = None,
                 check_claims: bool = False) -> None:
        """throttle: the bandwidth cap on this run's uploads (None: none). before_s3: called
        with the state lock held, before anything touches S3 (the daemon's notices, and its
        wait for the preflight checks). check_claims: whether the peer poller will check the
        rank's claims (the daemon), so that no part is sealed before its first check."""
        self._config = config
        self._bucket = bucket
        self._state = state
        self._s3_watch = s3_watch
        self._wake = wake
        self._client = client
        self._prune = prune
        self._throttle = throttle
        self._before_s3 = before_s3
        self._check_claims = check_claims
        self.lock = StateLock(state)
        self._observer: Any = None
        self._engine: SyncEngine | None = None

    def __enter__(self) -> Parts:
        self._state.ensure()
        self.lock.acquire()
        try:
            if self._before_s3 is not None:
                self._before_s3()
            parts = self._start()
        except BaseException:
            self.__exit__()
            raise
        return parts

    def _start(self) -> Parts:
        config = self._config
        client = self._client or make_s3_client(resolve_region(config), config.transfer)
        self._s3_watch.attach(client)
        store = make_store(client, self._bucket, config.transfer, self._s3_watch.record,
                           throttle=self._throttle)
        rank = config.job.rank
        claim = (None if rank is None or not config.job.is_multi_node
                 else RankClaim(self._state.node_identity(), rank, self._check_claims,
                                nodes=config.job.nodes))
        parts = build_parts(config, store, Ledger(self._state.ledger), self._wake, self._prune,
                            claim)
        engine = self._engine = parts.engine
        abort_orphaned_uploads(store, engine.ledger)
        for watch in config.watch:  # before a new save there could make the others look deleted
            set_aside_if_wiped(engine.ledger, self._bucket, object_key(watch.prefix, ""),
                               watch.path, beside_new_sets=False)
        self._observer = Observer()
        for tracker in engine.trackers:
            tracker.watch_with(self._observer)
        self._observer.start()
        queued = engine.reconcile(config.sync.quiet_seconds)
        log.info("startup_scan_done", pending=queued, unsettled=engine.unsettled())
        exempt_long_lived_objects()
        return parts

    def __exit__(self, *exc: object) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._engine is not None:
            self._engine.close()
        self.lock.release()
