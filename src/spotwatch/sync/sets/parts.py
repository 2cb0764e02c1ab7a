"""A multi-node job's checkpoint sets: each node's part of a set, and when a set is complete
for the whole job.

On a node of a job the files keep their keys (``<prefix><relative path>``), so the union of all
nodes' files is the checkpoint the trainer wrote (PyTorch DCP's ``__<rank>_0.distcp`` files and
``.metadata``, DeepSpeed's per-rank shards). Instead of the single-node manifest, each node
seals its PART: a manifest of its own files of the set, with the job id, node count and its
rank, at ``part_key`` below the job's key space. A part read back from S3 is untrusted input,
checked like a manifest plus its job fields.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from spotwatch.config import MAX_NODES, JobSettings
from spotwatch.sync.sets.manifest import (
    LinkEntry,
    Manifest,
    ManifestEntry,
    ManifestError,
    field_of,
    json_object,
    refuse_clashing_paths,
    time_field,
)

# A node's identity is a host name and an id: far below this.
MAX_IDENTITY = 256


@dataclass(frozen=True)
class JobNode:
    """This node of a multi-node job."""

    job_id: str
    nodes: int
    rank: int

    @classmethod
    def of(cls, job: JobSettings) -> JobNode | None:
        """None for a single node (or a job config without this node's rank: restore, status)."""
        if job.id is None or job.nodes is None or job.rank is None:
            return None
        return cls(job.id, job.nodes, job.rank)

    @property
    def part_of(self) -> tuple[str, int]:
        """(job id, rank): what keys.part_key and keys.storable_key need."""
        return self.job_id, self.rank


@dataclass(frozen=True)
class Part:
    """One node's part of a set: the manifest of the files that node wrote."""

    node: JobNode
    manifest: Manifest
    # Who sealed it (StateDir.node_identity); None in parts sealed before it was recorded.
    identity: str | None = None

    def to_json(self) -> str:
        node = self.node
        job: dict[str, object] = {"id": node.job_id, "nodes": node.nodes, "rank": node.rank}
        if self.identity is not None:
            job["node"] = self.identity
        return json.dumps({**self.manifest.as_data(), "job": job})

    @classmethod
    def from_json(cls, text: str | builtins.bytes, prefix: str, job_id: str) -> Part:
        """A part of the configured job under the configured prefix, sealed by one of the
        nodes the job had then (it may have had other node counts since); ManifestError
        unless its manifest is valid and its job fields are this job's."""
        data = json_object(text)
        manifest = Manifest.from_data(data, prefix)
        job = field_of(data, "job", dict)
        if field_of(job, "id", str) != job_id:
            raise ManifestError(f"written for job {job['id']!r}, not {job_id!r}")
        nodes = field_of(job, "nodes", int)
        if not 1 <= nodes <= MAX_NODES:
            raise ManifestError(f"a job of {nodes} nodes")
        rank = field_of(job, "rank", int)
        if not 0 <= rank < nodes:
            raise ManifestError(f"rank {rank} is not one of the job's {nodes} nodes")
        identity = job.get("node")
        if identity is not None and not (isinstance(identity, str)
                                         and 0 < len(identity) <= MAX_IDENTITY):
            raise ManifestError("its node is not a short string")
        return cls(JobNode(job_id, nodes, rank), manifest, identity)


def sealed_by(text: str | builtins.bytes) -> tuple[str | None, float] | None:
    """(who sealed it, when by its clock) of a part read back before it is sealed again;
    None when it is no part at all (junk is overwritten, as before)."""
    try:
        data = json_object(text)
        job = field_of(data, "job", dict)
        sealed_at = time_field(data, "sealed_at")
    except ManifestError:
        return None
    identity = job.get("node")
    return (identity if isinstance(identity, str) else None), sealed_at


@dataclass(frozen=True)
class JobSet:
    """A set as the job's nodes sealed it: the valid parts found, by rank."""

    set_name: str
    nodes: int
    parts: Mapping[int, Manifest]
    # By rank, the node that sealed each part, where the part names it (Part.identity).
    sealed_by: Mapping[int, str] = field(default_factory=dict)

    @cached_property  # sorting the sets and restoring one both need it
    def whole(self) -> Manifest:
        """Every file and link any part lists, once (the lowest rank's entry where several
        list it)."""
        entries: dict[str, ManifestEntry] = {}
        links: dict[str, LinkEntry] = {}
        for rank in sorted(self.parts):
            for entry in self.parts[rank].files:
                entries.setdefault(entry.key, entry)
            for link in self.parts[rank].links:
                links.setdefault(link.path, link)
        manifests = self.parts.values()
        prefix = next(iter(manifests)).prefix
        return Manifest(self.set_name, prefix, tuple(sorted(entries.values(), key=lambda e: e.key)),
                        max(m.sealed_at for m in manifests),
                        tuple(sorted(links.values(), key=lambda link: link.path)))

    def problem(self) -> str | None:
        """Why the set is not complete for the job, judged on its parts alone (restore also
        checks that every listed object is in S3 with its size); None when nothing is wrong.

        Invariant 2 on a job: a set is complete only when every rank 0..nodes-1 sealed a valid
        part of it for this job, and no two parts list one key with another size or checksum
        (two nodes wrote the same name and one overwrote the other) nor one path as a file
        and as a directory. Checksums made with other transfer settings say nothing about
        whether the bytes differ: restore checks the bytes against each (other_checksums).
        """
        missing = self.missing_ranks()
        if missing:
            return f"no part from node {', '.join(map(str, missing))} of {self.nodes}"
        return self._rank_claimed_twice() or self._conflict()

    def _rank_claimed_twice(self) -> str | None:
        """Invariant: one node seals one rank's part of a set. A node that sealed two ranks'
        parts took another node's rank for a while (a rank claimed twice, then fixed): the
        part it overwrote listed the other node's files, which no part lists now."""
        ranks_of: dict[str, list[int]] = {}
        for rank, identity in sorted(self.sealed_by.items()):
            ranks_of.setdefault(identity, []).append(rank)
        for identity, ranks in ranks_of.items():
            if len(ranks) > 1:
                return (f"node {identity} sealed the parts of ranks "
                        f"{', '.join(map(str, ranks))}: a rank was claimed by two nodes")
        return None

    def missing_ranks(self) -> list[int]:
        return [rank for rank in range(self.nodes) if rank not in self.parts]

    @cached_property
    def other_checksums(self) -> Mapping[str, tuple[ManifestEntry, ...]]:
        """By key, one entry per checksum, for the keys parts list with several checksums
        (made by other algorithms or over other parts: nodes with other transfer settings).
        The parts cannot tell whether such nodes wrote the same bytes, so the bytes restored
        for the key must match each of these entries."""
        by_key: dict[str, dict[str | None, ManifestEntry]] = {}
        for rank in sorted(self.parts):
            for entry in self.parts[rank].files:
                by_key.setdefault(entry.key, {}).setdefault(entry.checksum, entry)
        return {key: tuple(entries.values()) for key, entries in by_key.items()
                if len(entries) > 1}

    def _conflict(self) -> str | None:
        seen: dict[str, tuple[int, ManifestEntry]] = {}
        for rank in sorted(self.parts):
            for entry in self.parts[rank].files:
                first = seen.setdefault(entry.key, (rank, entry))
                if _differ(first[1], entry):
                    return (f"nodes {first[0]} and {rank} both wrote {entry.key} with different "
                            f"contents (file names must differ between nodes)")
        try:
            refuse_clashing_paths([entry.path for _, entry in seen.values()]
                                  + [link.path for link in self.whole.links])
        except ManifestError as exc:
            return f"the nodes' parts clash: {exc}"
        return None


def _differ(one: ManifestEntry, other: ManifestEntry) -> bool:
    """Whether two entries of one key are sure to describe other bytes: other sizes, or
    other checksums made alike (the same algorithm, over the same parts)."""
    if one.size != other.size:
        return True
    made_alike = ((one.checksum_algorithm, one.part_size)
                  == (other.checksum_algorithm, other.part_size))
    return made_alike and one.checksum != other.checksum
