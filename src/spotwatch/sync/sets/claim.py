"""Whether this node of a job may seal its parts: no other live node claims its rank.

Two nodes that take one rank (a rank variable missing on one, a copied config) would each
overwrite the other's part of every set: a set could count as complete while its part lists one
node's files only. The peer poller reports what it learns of the rank's claims
(notices.claims); the sealer reads it here before every part it seals. Shared between the
poller's thread and the daemon's loop, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from spotwatch.logs import get_logger

log = get_logger("spotwatch.sets")

# A part another node sealed more than this after this daemon started was written by a node
# that is alive now (the margin covers clocks a few seconds apart).
CLOCK_SKEW_SECONDS = 5.0


class RankClaim:
    """identity: this node's (StateDir.node_identity); checked: whether the peer poller
    checks the rank's claims (the daemon) or not (a one-shot flush: only the seal-time check
    of each part guards it)."""

    def __init__(self, identity: str, rank: int, checked: bool,
                 started_at: float | None = None, nodes: int | None = None) -> None:
        self.identity = identity
        self.rank = rank
        self.nodes = nodes
        self.started_at = time.time() if started_at is None else started_at
        self._lock = threading.Lock()
        self._checking = checked  # until the first check of the claims
        self._undecided: frozenset[str] = frozenset()  # claims neither live nor stale yet
        self._rival: str | None = None  # another live node of this rank: for good
        # Live claims on ranks past this node's job.nodes, at the last check.
        self._beyond: tuple[str, ...] = ()

    @property
    def rival(self) -> str | None:
        with self._lock:
            return self._rival

    @property
    def beyond(self) -> str | None:
        """Why the job's nodes disagree on its node count, or None."""
        with self._lock:
            if not self._beyond:
                return None
            return (f"{', '.join(self._beyond)} claimed while this node's job.nodes is "
                    f"{self.nodes}: give every node the same node count and restart them")

    def blocked(self) -> str | None:
        """Why this node seals no part now; None when it may.

        Invariant: no part is sealed while a live node claims a rank past this node's node
        count: sealed with that count, the set would be complete for the job without that
        node's files, and a restore would hand back a checkpoint missing a rank's shards."""
        beyond = self.beyond
        with self._lock:
            if self._rival is not None:
                return (f"node {self._rival} claims rank {self.rank} too (this node is "
                        f"{self.identity}): fix the rank of one and restart it")
            if beyond is not None:
                return beyond
            if self._checking:
                return f"checking that no other node claims rank {self.rank}"
            if self._undecided:
                return (f"waiting for the claim of {', '.join(sorted(self._undecided))} on "
                        f"rank {self.rank} to go stale")
            return None

    def checked(self, live: Iterable[str], undecided: Iterable[str],
                beyond: Iterable[str] = ()) -> None:
        """A check of the rank's claims: other identities proven live, and those whose last
        heartbeat is too recent to call them gone; beyond: live claims on ranks past the
        node count (ClaimCheck.beyond)."""
        live = sorted(live)
        beyond = tuple(beyond)
        with self._lock:
            self._checking = False
            self._undecided = frozenset(undecided)
            newly_beyond = beyond and beyond != self._beyond
            self._beyond = beyond
        if newly_beyond:
            log.error("job_size_mismatch", rank=self.rank, nodes=self.nodes, claimed=list(beyond),
                      detail="no part is sealed while nodes of the job disagree on its node "
                      "count; file uploads go on")
        if live:
            self.clash(live[0], "its heartbeat on the peer channel")

    def clash(self, other: str, seen_by: str) -> None:
        """Another live node claims this rank: no part is sealed from now on (until a
        restart); logged once."""
        with self._lock:
            if self._rival is not None or other == self.identity:
                return
            self._rival = other
        log.error("rank_claimed_twice", rank=self.rank, node=self.identity, other_node=other,
                  seen_by=seen_by, detail="no part is sealed until one of the two nodes gets "
                  "another rank and restarts; file uploads go on")

    def may_be_live(self, other: str, sealed_at: float) -> bool:
        """Whether the node that sealed a part at sealed_at (its clock) may be running now:
        a claim the peer poller found live or not yet stale, or a seal well after this daemon
        started. A node gone (reclaimed, replaced) never blocks its successor for good."""
        if other == self.identity:
            return False
        with self._lock:
            if other == self._rival or other in self._undecided:
                return True
        return sealed_at > self.started_at + CLOCK_SKEW_SECONDS
