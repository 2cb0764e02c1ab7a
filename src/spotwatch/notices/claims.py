"""Which nodes claim a rank of a job: each node's heartbeat on the peer channel.

Every node keeps an object of its own under ``<job key space>claims/node-<rank>/``, named
for its identity (StateDir.node_identity), rewritten every CLAIM_EVERY_POLLS peer polls (30 s
by default) and deleted when its daemon stops. On the same round the peer poller lists its
own rank's directory (one PUT and one LIST each 30 s: about $0.0012 an hour per node). Named
per identity, two nodes of one rank never overwrite each other's claim: each sees the other.

Times are S3's (LastModified of this node's own claim and of the others'), never a node's
clock. Another claim is live once it was rewritten after this node's first claim; stale once
it is STALE_ROUNDS heartbeats older than this node's newest; undecided in between (a node
just reclaimed that could not withdraw its claim): the sealer waits for the verdict.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime

from spotwatch.aws.store import ObjectStore
from spotwatch.config import Config
from spotwatch.keys import job_key_space

CLAIMS_DIR = "claims/"
# A node's claim is rewritten, and its rank's claims listed, every this many peer polls.
CLAIM_EVERY_POLLS = 30
# A claim not rewritten for this many heartbeats belongs to a node gone.
STALE_ROUNDS = 3


def claims_root(config: Config) -> str:
    """Where the nodes of the job keep their heartbeats, a folder per rank (needs a job id)."""
    assert config.job.id is not None
    return job_key_space(config.watch[0].prefix, config.job.id) + CLAIMS_DIR


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
    """This node's claim on its rank and the check of the others'. Raises StoreError."""

    def __init__(self, store: ObjectStore, root: str, rank: int, identity: str,
                 stale_after_seconds: float, nodes: int | None = None) -> None:
        """root: claims_root; nodes: the job's node count as this node was given it."""
        self._store = store
        self._root = root
        self._nodes = nodes
        self.prefix = claims_prefix(root, rank)
        self.identity = identity
        self.key = self.prefix + claim_name(identity)
        self._stale_after = stale_after_seconds
        self._first: datetime | None = None  # S3's time of this node's first claim

    def beat(self) -> None:
        body = {"identity": self.identity, "pid": os.getpid()}
        self._store.put_bytes(self.key, json.dumps(body).encode(), "application/json").result()

    def check(self) -> ClaimCheck | None:
        """The other claims on the rank, and live ones on ranks past the node count; None
        until this node's own claim is listed. One listing of every rank's claims."""
        listed = list(self._store.list_objects(self._root))
        own = next((item for item in listed if item.key == self.key), None)
        if own is None:
            return None
        if self._first is None:
            self._first = own.last_modified
        live, undecided, beyond = [], [], []
        for item in listed:
            if item.key == self.key or not item.key.endswith(".json"):
                continue
            folder = _RANK_FOLDER.match(item.key[len(self._root):])
            if folder is None:
                continue
            name = item.key[len(self._root) + folder.end():]
            if "/" in name:
                continue
            if not item.key.startswith(self.prefix):  # another rank's
                rank = int(folder[1])
                if (self._nodes is not None and rank >= self._nodes
                        and item.last_modified > self._first):
                    beyond.append(f"rank {rank} ({identity_of(name)})")
                continue
            if item.last_modified > self._first:
                live.append(identity_of(name))
            elif (own.last_modified - item.last_modified).total_seconds() < self._stale_after:
                undecided.append(identity_of(name))
        return ClaimCheck(tuple(live), tuple(undecided), tuple(sorted(beyond)))

    def withdraw(self) -> None:
        """At a stop: a replacement of this node then takes its rank without waiting."""
        self._store.delete(self.key)
