"""Snapshots of the swarm as read from the DHT: the input of every pipeline policy.

The policies in `swarmnet.pipeline` (stage choice, routing, rebalancing) are pure functions of these
immutable values, so they can be unit-tested without a network. Building a snapshot from DHT records
is the DHT layer's job; this module only defines the shape and a few derived views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PeerInfo:
    """One stage server, as announced in its (validated) DHT record.

    Raises `ValueError` on values no honest peer can report (negative or non-finite throughput,
    negative queue depth or stage), so a bad record is rejected where it is read.
    """

    peer_id: str
    """The peer's libp2p id (base58), unique in the swarm."""
    stage: int
    """Pipeline stage the peer serves, 0-based."""
    throughput: float
    """Measured samples per second; 0 when not yet measured."""
    queue_depth: int
    """Requests waiting in the peer's compute queue when it last announced itself."""
    step: int = 0
    """The stage optimizer step the peer's parameters are at."""
    expires_at: float = 0.0
    """DHT expiration time of the record the snapshot was built from."""

    def __post_init__(self) -> None:
        if self.stage < 0:
            raise ValueError(f"peer {self.peer_id}: negative stage {self.stage}")
        if not math.isfinite(self.throughput) or self.throughput < 0:
            raise ValueError(f"peer {self.peer_id}: invalid throughput {self.throughput!r}")
        if self.queue_depth < 0:
            raise ValueError(f"peer {self.peer_id}: negative queue depth {self.queue_depth}")


@dataclass(frozen=True)
class SwarmSnapshot:
    """Every known stage server of a run at one moment.

    Peers whose stage is outside `0..num_stages-1` (e.g. stale records of an older manifest) are
    kept in `peers` but ignored by the per-stage views.
    """

    num_stages: int
    """Number of pipeline stages of the run (from the manifest)."""
    peers: tuple[PeerInfo, ...] = ()
    """Stage servers, in no particular order."""

    def __post_init__(self) -> None:
        if self.num_stages < 0:
            raise ValueError(f"num_stages must be >= 0, not {self.num_stages}")
        if not isinstance(self.peers, tuple):
            object.__setattr__(self, "peers", tuple(self.peers))

    def by_stage(self) -> dict[int, list[PeerInfo]]:
        """Peers grouped by stage; every stage `0..num_stages-1` is a key, possibly empty."""
        groups: dict[int, list[PeerInfo]] = {stage: [] for stage in range(self.num_stages)}
        for peer in self.peers:
            if peer.stage in groups:
                groups[peer.stage].append(peer)
        return groups

    def stage_throughput(self) -> list[float]:
        """Total advertised throughput (samples/s) of each stage, indexed by stage."""
        return [sum(p.throughput for p in group) for group in self.by_stage().values()]
