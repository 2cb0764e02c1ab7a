"""Peer notices: the nodes of a multi-node job tell each other of their notices through S3.

A channel lives under the job's key space below a watched prefix,
``<prefix>.spotwatch/jobs/<job id>/notices/``, and a node uses one per watched prefix: it
publishes on every one and polls every one, so any two nodes that share a prefix hear each
other whatever else, or in whichever order, they watch. A notice learnt on several channels is
one notice (its id is the peer's rank and notice id), handed on once. In one channel:

- ``node-<rank>.json``: the notices this node's daemon got from its own IMDS (newest last).
  Only that node writes it, so two nodes publishing at once never overwrite each other.
- ``bell``: rewritten, with content never written before, after every write of a node object.

Each node GETs each channel's bell once per ``job.peer_poll_interval`` (1 s: 3,600 GETs an
hour per watched prefix, about $0.0014 an hour per node and prefix at $0.0004 per 1,000). Only
when a bell changed does it LIST that directory and GET the node objects whose ETag changed.
Listing every second instead would cost 12.5 times as much ($0.005 per 1,000 LISTs: $0.018 an
hour per node and prefix), and GETting every peer's object every second grows with the job's
size; one shared object holding every notice would lose one of two notices published at once.
(A conditional GET answered 304 costs a GET too.)

Why no notice is lost: a node writes its object before the bell; S3 reads are strongly
consistent; each bell write is unique. So a poller that reads any bell written after a node's
object lists after that write, and sees it. A poller keeps a bell as "read" only once it read
every changed node object; after a failed request it tries again at the next poll. A channel
whose write failed lags until the publisher's retry gets through: of a notice's entries read
in one poll, the newest change speaks for it (PeerNotice.newer_than).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from spotwatch.aws.health import Reachability
from spotwatch.aws.store import ListedObject, ObjectMissing, ObjectStore, StoreError
from spotwatch.config import Config
from spotwatch.keys import job_key_space
from spotwatch.logs import get_logger
from spotwatch.model import Notice, NoticeKind, PeerWithdrawal
from spotwatch.notices.claims import CLAIM_EVERY_POLLS, ClaimCheck, RankClaims
from spotwatch.notices.sources import iso_time
from spotwatch.notices.store import SeenNotices

log = get_logger("spotwatch.peers")

NOTICES_DIR = "notices/"
BELL = "bell"
FORMAT = 1
_NODE_OBJECT = re.compile(r"node-(0|[1-9][0-9]{0,8})\.json")
_NOTICE_ID = re.compile(r"[0-9a-f]{16}")  # as Notice.make makes them
# The notices that start a flush on the node that got them from IMDS; only those are shared.
SHARED_KINDS = frozenset({NoticeKind.SPOT_INTERRUPTION, NoticeKind.REBALANCE,
                          NoticeKind.SCHEDULED_EVENT, NoticeKind.ASG_TERMINATING})
# A node object keeps its newest notices only (a daemon sees a handful in its life).
KEPT_PER_NODE = 32
# Larger objects in the channel are not notices: not read at all.
MAX_NODE_OBJECT_BYTES = 64 * 1024
# A bell is a few dozen bytes; only its first bytes are read, so junk there costs little.
MAX_BELL_BYTES = 1024
MAX_TEXT = 256
# A peer's notice published up to this long before this daemon started is still acted on, so
# a daemon restarted during an interruption joins it (hooks act once all the same).
STARTUP_GRACE = timedelta(minutes=2)
# After a failed publish, wait this long (doubling, at most PUBLISH_RETRY_MAX) and write again.
PUBLISH_RETRY_FIRST = 0.5
PUBLISH_RETRY_MAX = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def channel_prefix(config: Config, watched: str | None = None) -> str:
    """The job's channel below the watched prefix `watched` (default the first; needs a job
    id)."""
    assert config.job.id is not None
    return job_key_space(config.watch[0].prefix if watched is None else watched,
                         config.job.id) + NOTICES_DIR


def channel_prefixes(config: Config) -> list[str]:
    """Every channel this node uses: one per watched prefix (the config refuses overlapping
    ones), as nodes sharing any prefix must meet on it."""
    return [channel_prefix(config, watch.prefix) for watch in config.watch]


@dataclass(frozen=True)
class PeerNotice:
    """One notice as a peer published it."""

    rank: int
    kind: NoticeKind
    id: str
    deadline: datetime | None
    detail: str
    published_at: datetime
    withdrawn: bool = False  # AWS withdrew it from the node that got it (see PeerChannel)
    withdrawn_at: datetime | None = None

    def newer_than(self, other: PeerNotice) -> bool:
        """Whether this entry of a notice supersedes another channel's (one whose write
        failed lags behind): the later change wins, a withdrawal on a tie."""
        return ((self.withdrawn_at or self.published_at, self.withdrawn)
                > (other.withdrawn_at or other.published_at, other.withdrawn))

    def live(self, now: datetime, started_at: datetime) -> bool:
        """Invariant: a node acts only on a peer notice that is still current: not withdrawn,
        published no earlier than STARTUP_GRACE before this daemon started, and its deadline
        (if any) not passed. So a replacement node started later never flushes for an old
        notice, nor a node started after its withdrawal for a withdrawn one."""
        if self.withdrawn or self.published_at < started_at - STARTUP_GRACE:
            return False
        return self.deadline is None or self.deadline > now

    def as_notice(self) -> Notice:
        """The notice as this node knows it: its own id (a peer's notice and this node's own
        IMDS notice act separately), the peer's kind, deadline and rank."""
        return Notice.make(self.kind, self.deadline, "peer", str(self.rank), self.id,
                           detail=self.detail, peer_rank=self.rank)


def encode_entry(notice: Notice, published_at: datetime) -> dict[str, Any]:
    return {"kind": notice.kind.value, "id": notice.id, "detail": notice.detail[:MAX_TEXT],
            "deadline": notice.deadline.isoformat() if notice.deadline else None,
            "published_at": published_at.isoformat()}


def withdrawn_entry(notice_id: str, kind: str, now: datetime) -> dict[str, Any]:
    """A notice withdrawn that this node's object no longer holds (published before a restart
    removed it): peers that learnt of it then learn of its withdrawal."""
    return {"kind": kind, "id": notice_id, "detail": "", "deadline": None,
            "published_at": now.isoformat(), "withdrawn_at": now.isoformat()}


def decode_node_object(body: bytes, rank: int) -> list[PeerNotice]:
    """The notices in a node object; anything malformed (not JSON, wrong types, another rank
    than its key's, an unknown kind) yields nothing, never an error."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if (not isinstance(data, dict) or data.get("format") != FORMAT
            or type(data.get("rank")) is not int or data["rank"] != rank):
        return []
    entries = data.get("notices")
    if not isinstance(entries, list):
        return []
    decoded = (_decode_entry(entry, rank) for entry in entries[-KEPT_PER_NODE:])
    return [notice for notice in decoded if notice is not None]


def _decode_entry(entry: object, rank: int) -> PeerNotice | None:
    if not isinstance(entry, dict):
        return None
    kind = next((k for k in SHARED_KINDS if k.value == entry.get("kind")), None)
    notice_id, detail = entry.get("id"), entry.get("detail", "")
    if (kind is None or not isinstance(notice_id, str) or not _NOTICE_ID.fullmatch(notice_id)
            or not isinstance(detail, str)):
        return None
    published_at = _utc(entry.get("published_at"))
    deadline = _utc(entry.get("deadline")) if entry.get("deadline") is not None else None
    if published_at is None or (deadline is None and entry.get("deadline") is not None):
        return None
    return PeerNotice(rank, kind, notice_id, deadline, detail[:MAX_TEXT], published_at,
                      withdrawn=entry.get("withdrawn_at") is not None,
                      withdrawn_at=_utc(entry.get("withdrawn_at")))


def _short_text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT


def _utc(value: object) -> datetime | None:
    """An ISO time as UTC; None when it is not one or lies outside what datetime can hold."""
    if not _short_text(value):
        return None
    parsed = iso_time(value)
    try:
        return parsed.astimezone(UTC) if parsed is not None else None
    except (OverflowError, ValueError):
        return None


class PeerChannel:
    """One node's requests on the job's channel."""

    def __init__(self, store: ObjectStore, prefix: str, rank: int,
                 wall: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.prefix = prefix
        self.rank = rank
        self._wall = wall
        self._published: list[dict[str, Any]] = []
        self._revision = 0  # of _published; the one in S3 is _written
        self._written = 0
        self._lock = threading.Lock()

    def node_key(self, rank: int) -> str:
        return f"{self.prefix}node-{rank}.json"

    @property
    def bell_key(self) -> str:
        return self.prefix + BELL

    def add(self, notice: Notice) -> None:
        """Note one of this node's own notices for the next write: one entry per notice, the
        newest last (a notice again, rescheduled or published after its withdrawal, replaces
        its entry), so a withdrawal marks the one entry pollers read for it."""
        with self._lock:
            entries = [entry for entry in self._published if entry["id"] != notice.id]
            self._published = [*entries, encode_entry(notice, self._wall())][-KEPT_PER_NODE:]
            self._revision += 1

    def withdraw(self, kinds: dict[str, str]) -> bool:
        """Mark this node's notices (id: kind) withdrawn for the next write; one no longer
        held (published before a restart) is noted as withdrawn. False: none of them is a
        shared kind, nothing to write."""
        shared = {value.value for value in SHARED_KINDS}
        now = self._wall()
        with self._lock:
            wanted = {notice_id for notice_id, kind in kinds.items() if kind in shared}
            entries = [{**entry, "withdrawn_at": entry.get("withdrawn_at") or now.isoformat()}
                       if entry["id"] in wanted else entry for entry in self._published]
            held = {entry["id"] for entry in entries}
            entries += [withdrawn_entry(notice_id, kinds[notice_id], now)
                        for notice_id in sorted(wanted - held)]
            changed = entries != self._published
            self._published = entries[-KEPT_PER_NODE:]
            if changed:
                self._revision += 1
        return changed

    def unwritten(self) -> bool:
        """Whether notices were noted since the last write that succeeded."""
        with self._lock:
            return self._revision != self._written

    def write(self) -> None:
        """This node's object with every notice noted, then the bell: in that order, which is
        what makes the channel lossless (see the module's docstring). Raises StoreError."""
        revision = self.write_object()
        self.ring()
        with self._lock:
            self._written = revision

    def write_object(self) -> int:
        """Returns the revision written."""
        with self._lock:
            body = {"format": FORMAT, "rank": self.rank, "notices": list(self._published)}
            revision = self._revision
        self.store.put_bytes(self.node_key(self.rank), json.dumps(body).encode(),
                             "application/json").result()
        return revision

    def ring(self) -> None:
        ring = {"rank": self.rank, "ring": uuid.uuid4().hex}  # never the same content twice
        self.store.put_bytes(self.bell_key, json.dumps(ring).encode(),
                             "application/json").result()

    def remove_own(self) -> None:
        """An earlier daemon's object of this rank: its peers read it long ago, or find it
        stale; removing it keeps the channel one LIST page. Raises StoreError."""
        self.store.delete(self.node_key(self.rank))

    def read_bell(self) -> bytes | None:
        """Invariant: a poll reads at most MAX_BELL_BYTES of the bell and MAX_NODE_OBJECT_BYTES
        (+1) of a node object, whatever lies in the channel: a huge object there costs no
        memory or bandwidth on any node. A node's ring is short and unique, so a changed bell
        still shows in its first bytes."""
        try:
            return self.store.get_bytes(self.bell_key, MAX_BELL_BYTES)
        except ObjectMissing:
            return None  # no node of this job has published yet

    def peer_objects(self) -> list[tuple[int, ListedObject]]:
        """The node objects of the other ranks, by rank."""
        found = []
        for listed in self.store.list_objects(self.prefix):
            match = _NODE_OBJECT.fullmatch(listed.key[len(self.prefix):])
            if match is not None and int(match.group(1)) != self.rank:
                found.append((int(match.group(1)), listed))
        return found

    def read_node(self, listed: ListedObject) -> bytes | None:
        if listed.size > MAX_NODE_OBJECT_BYTES:
            return b""
        try:
            body = self.store.get_bytes(listed.key, MAX_NODE_OBJECT_BYTES + 1)
        except ObjectMissing:
            return None  # removed since it was listed (a restarting node's cleanup)
        return b"" if len(body) > MAX_NODE_OBJECT_BYTES else body  # grown since listed


def as_channels(channels: PeerChannel | Sequence[PeerChannel]) -> list[PeerChannel]:
    return [channels] if isinstance(channels, PeerChannel) else list(channels)


class PeerPublisher:
    """Writes this node's notices to every channel on a thread of its own, so the daemon's
    loop never waits for S3; a failed write is tried again until it succeeds (or the daemon
    stops), on the channels it failed on only."""

    def __init__(self, channels: PeerChannel | Sequence[PeerChannel]) -> None:
        self._channels = as_channels(channels)
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._due.set()
        self._thread.join(timeout)

    def publish(self, notice: Notice) -> None:
        for channel in self._channels:
            channel.add(notice)
        self._due.set()

    def withdraw(self, kinds: dict[str, str]) -> None:
        """This node's notices (id: kind) that AWS withdrew, withdrawn for the peers too."""
        if any([channel.withdraw(kinds) for channel in self._channels]):  # noted on each
            self._due.set()

    def _run(self) -> None:
        for channel in self._channels:
            try:
                channel.remove_own()
            except StoreError as exc:
                log.warning("peer_cleanup_failed", key=channel.node_key(channel.rank),
                            error=str(exc))
        for channel in self._channels:
            try:
                # The bell is there from the first node's start on. On AWS, a GET of a key
                # that is not there is refused (403), not missing (404), for a role whose
                # s3:ListBucket is limited to its prefixes, as the policy `spotwatch
                # iam-policy` prints: peers polling a bell no node had rung would all count
                # failures.
                channel.ring()
            except StoreError as exc:
                log.warning("peer_publish_failed", key=channel.bell_key, retry_in=None,
                            error=str(exc))
        backoff = PUBLISH_RETRY_FIRST
        while True:
            self._due.wait()
            if self._stop.is_set():
                return
            self._due.clear()
            if self._write_unwritten(backoff):
                backoff = PUBLISH_RETRY_FIRST
                continue
            self._stop.wait(backoff)
            backoff = min(backoff * 2, PUBLISH_RETRY_MAX)
            self._due.set()

    def _write_unwritten(self, retry_in: float) -> bool:
        """Every channel's write that is due; False if one failed."""
        written = True
        for channel in self._channels:
            if not channel.unwritten():
                continue
            key = channel.node_key(channel.rank)
            try:
                channel.write()
            except StoreError as exc:
                log.warning("peer_publish_failed", key=key, retry_in=retry_in, error=str(exc))
                written = False
                continue
            log.info("peer_notice_published", key=key)
        return written


class PeerPoller:
    """Learns the peers' notices: one GET of each channel's bell per interval, on a thread of
    its own (a slow S3 never delays IMDS polling). Each live notice is handed on once (again
    if its deadline moves earlier), whichever channels it is learnt on. A poll in which a
    channel failed counts as one failure; the other channels' notices are handed on all the
    same.

    claims: this node's claim on its rank, kept and checked on the same thread every
    CLAIM_EVERY_POLLS polls (notices.claims); each check goes to on_claims."""

    def __init__(self, channels: PeerChannel | Sequence[PeerChannel], interval: float,
                 on_notice: Callable[[Notice | PeerWithdrawal], None], started_at: datetime,
                 wall: Callable[[], datetime] = utc_now,
                 on_failure: Callable[[], None] | None = None,
                 claims: RankClaims | None = None,
                 on_claims: Callable[[ClaimCheck], None] | None = None) -> None:
        self._channels = as_channels(channels)
        self._interval = interval
        self._on_notice = on_notice
        self._started_at = started_at
        self._wall = wall
        self._on_failure = on_failure
        self._seen = SeenNotices()
        self._bells: dict[str, bytes] = {}  # by channel: the bell whose changes were all read
        self._read: dict[str, tuple[object, ...]] = {}  # node key -> version read
        self.failures = 0
        self.reachability = Reachability(
            "peer_channel", prefix=", ".join(channel.prefix for channel in self._channels))
        self._claims = claims
        self._on_claims = on_claims
        self._claims_due = 0  # polls until the next heartbeat and check of the claims
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def tend_claims(self) -> None:
        """This node's heartbeat, then the check of its rank's claims, when due; after a
        failure (or before S3 lists this node's own claim) again at the next poll."""
        if self._claims is None:
            return
        self._claims_due -= 1
        if self._claims_due > 0:
            return
        self._claims_due = 1
        try:
            self._claims.beat()
            check = self._claims.check()
        except StoreError as exc:
            log.warning("rank_claim_check_failed", keys=self._claims.keys, error=str(exc))
            return
        if check is None:
            return
        self._claims_due = CLAIM_EVERY_POLLS
        if self._on_claims is not None:
            self._on_claims(check)

    def poll_once(self) -> list[Notice | PeerWithdrawal]:
        """The peers' live notices not handed on before, and the withdrawals of those handed
        on; a failed request is counted."""
        began = self.reachability.outage.now()  # a hung request fails only at its end
        newest: dict[tuple[int, str], PeerNotice] = {}
        errors = []
        for channel in self._channels:
            try:
                changed = self._changes(channel)
            except StoreError as exc:
                errors.append(f"{channel.prefix}: {exc}")
                continue
            for peer in changed:
                known = newest.get((peer.rank, peer.id))
                if known is None or peer.newer_than(known):
                    newest[(peer.rank, peer.id)] = peer
        if errors:
            self.failures += 1
            if self._on_failure is not None:
                self._on_failure()
            self.reachability.report(False, "; ".join(errors), began)
        else:
            self.reachability.report(True)
        now = self._wall()
        withdrawn: dict[int, list[str]] = {}
        for peer in newest.values():
            if peer.withdrawn:
                withdrawn.setdefault(peer.rank, []).append(peer.as_notice().id)
        withdrawals: list[Notice | PeerWithdrawal] = []
        for rank, ids in sorted(withdrawn.items()):
            handed = self._seen.forget(sorted(ids))
            if handed:
                withdrawals.append(PeerWithdrawal(rank, frozenset(handed)))
        fresh = [peer.as_notice() for peer in newest.values()
                 if peer.live(now, self._started_at)]
        return [*withdrawals, *self._seen.first_sightings(fresh)]

    def _changes(self, channel: PeerChannel) -> list[PeerNotice]:
        """Each notice's newest entry in the channel's node objects changed since the last
        poll (one withdrawn, then published again, is live)."""
        bell = channel.read_bell()
        if bell is None or bell == self._bells.get(channel.prefix):
            return []
        notices: list[PeerNotice] = []
        read = {}
        for rank, listed in channel.peer_objects():
            version = (listed.etag, listed.last_modified, listed.size)
            if self._read.get(listed.key) == version:
                continue
            body = channel.read_node(listed)
            if body is None:
                continue
            notices += {peer.id: peer for peer in decode_node_object(body, rank)}.values()
            read[listed.key] = version
        # Only now, all requests done: after a failure the next poll reads everything again.
        self._read.update(read)
        self._bells[channel.prefix] = bell
        return notices

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tend_claims()
            for notice in self.poll_once():
                self._on_notice(notice)
            self._stop.wait(self._interval)
