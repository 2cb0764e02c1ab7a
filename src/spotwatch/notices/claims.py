"""Which nodes claim a rank of a job: each node's heartbeat on the peer channel.

Every node keeps an object of its own under ``<job key space>claims/node-<rank>/`` below
each watched prefix (so two nodes sharing any prefix see each other's claims), named for its
identity (StateDir.node_identity), rewritten every CLAIM_EVERY_POLLS peer polls (30 s by
default) and deleted when its daemon stops. On the same round the peer poller lists the job's
claims below each prefix (one PUT and one LIST per prefix each 30 s: about $0.0012 an hour per
node and prefix). Named per identity, two nodes of one rank never overwrite each other's
claim: each sees the other.

Times are S3's (LastModified of this node's own claim and of the others'), never a node's
clock. Another claim is live once it was rewritten after this node's first claim; stale once
it is STALE_ROUNDS heartbeats older than this node's newest; undecided in between (a node
just reclaimed that could not withdraw its claim): the sealer waits for the verdict.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.config import Config
from spotwatch.keys import job_key_space

CLAIMS_DIR = "claims/"
# A node's claim is rewritten, and its rank's claims listed, every this many peer polls.
CLAIM_EVERY_POLLS = 30
# A claim not rewritten for this many heartbeats belongs to a node gone.
STALE_ROUNDS = 3


def claims_roots(config: Config) -> list[str]:
    """Where the nodes of the job keep their heartbeats, below each watched prefix, a folder
    per rank (needs a job id)."""
    job_id = config.job.id
    assert job_id is not None
    return [job_key_space(watch.prefix, job_id) + CLAIMS_DIR for watch in config.watch]


def claims_prefix(root: str, rank: int) -> str:
    """Where the nodes claiming `rank` keep their heartbeat."""
    return f"{root}node-{rank}/"


_RANK_FOLDER = re.compile(r"node-([0-9]+)/")


def claim_name(identity: str) -> str:
    """The object name of a node's claim: its identity with '/' as '_' (a host name as
    identities have it holds no '_', so the name gives the identity back)."""
    return identity.replace("/", "_") + ".json"


def identity_of(name: str) -> str:
    stem = name.removesuffix(".json")
    host, _, kept = stem.rpartition("_")
    return f"{host}/{kept}" if host else stem


@dataclass(frozen=True)
class ClaimCheck:
    live: tuple[str, ...]  # other identities whose claim was rewritten since this node's first
    undecided: tuple[str, ...]  # neither live nor stale yet
    # Live claims on ranks this node's job.nodes has no room for ("rank R (identity)"): a
    # node launched with another node count.
    beyond: tuple[str, ...] = ()


class RankClaims:
    """This node's claim on its rank, below every root, and the check of the others' below
    each: a node that shares one root with this one is seen. Raises StoreError."""

    def __init__(self, store: ObjectStore, roots: str | Sequence[str], rank: int,
                 identity: str, stale_after_seconds: float, nodes: int | None = None) -> None:
        """roots: claims_roots; nodes: the job's node count as this node was given it."""
        self._store = store
        self._roots = [roots] if isinstance(roots, str) else list(roots)
        self._rank = rank
        self._nodes = nodes
        self.identity = identity
        self.keys = tuple(claims_prefix(root, rank) + claim_name(identity)
                          for root in self._roots)
        self._stale_after = stale_after_seconds
        # By root: S3's time of this node's first claim there (times are compared only with
        # those of the same root's listing).
        self._first: dict[str, datetime] = {}

    def beat(self) -> None:
        body = json.dumps({"identity": self.identity, "pid": os.getpid()}).encode()
        for key in self.keys:
            self._store.put_bytes(key, body, "application/json").result()

    def check(self) -> ClaimCheck | None:
        """The other claims on the rank, and live ones on ranks past the node count, below
        any root; None until this node's own claim is listed below every root. One listing
        of every rank's claims per root."""
        checks = []
        for root, key in zip(self._roots, self.keys, strict=True):
            check = self._check_root(root, key)
            if check is None:
                return None
            checks.append(check)
        live = dict.fromkeys(name for check in checks for name in check.live)
        undecided = dict.fromkeys(name for check in checks for name in check.undecided
                                  if name not in live)
        beyond = {claim for check in checks for claim in check.beyond}
        return ClaimCheck(tuple(live), tuple(undecided), tuple(sorted(beyond)))

    def _check_root(self, root: str, key: str) -> ClaimCheck | None:
        listed = list(self._store.list_objects(root))
        own = next((item for item in listed if item.key == key), None)
        if own is None:
            return None
        first = self._first.setdefault(root, own.last_modified)
        prefix = claims_prefix(root, self._rank)
        live, undecided, beyond = [], [], []
        for item in listed:
            if item.key == key or not item.key.endswith(".json"):
                continue
            folder = _RANK_FOLDER.match(item.key[len(root):])
            if folder is None:
                continue
            name = item.key[len(root) + folder.end():]
            if "/" in name:
                continue
            if not item.key.startswith(prefix):  # another rank's
                rank = int(folder[1])
                if (self._nodes is not None and rank >= self._nodes
                        and item.last_modified > first):
                    beyond.append(f"rank {rank} ({identity_of(name)})")
                continue
            if item.last_modified > first:
                live.append(identity_of(name))
            elif (own.last_modified - item.last_modified).total_seconds() < self._stale_after:
                undecided.append(identity_of(name))
        return ClaimCheck(tuple(live), tuple(undecided), tuple(beyond))

    def withdraw(self) -> None:
        """At a stop: a replacement of this node then takes its rank without waiting. Every
        claim is tried; the last failure is raised."""
        failure: StoreError | None = None
        for key in self.keys:
            try:
                self._store.delete(key)
            except StoreError as exc:
                failure = exc
        if failure is not None:
            raise failure
