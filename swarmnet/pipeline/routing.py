"""Stochastic wiring: which peer of a stage receives the next microbatch.

Each call picks one peer of the stage at random, with probability proportional to

    max(throughput, min_throughput) / (1 + queue_depth)

- Proportional to throughput: over many microbatches, each peer gets a share of the traffic that
  matches its speed, so fast and slow peers finish their shares at the same time (the SWARM paper's
  stochastic wiring) without any central scheduler.
- Divided by 1 + queue depth: a peer whose queue is already long is asked less, which corrects the
  throughput estimate for load that other trainers put on it.
- The `min_throughput` floor: a peer that has not measured itself yet (throughput 0) still gets a
  small, positive share, so it receives traffic and can prove itself.
- Random, not greedy: many trainers choosing independently from the same stale snapshot would all
  pick the same "best" peer; sampling spreads them out.

Banned peers (see `swarmnet.pipeline.retry.RetryPolicy.banned`) are never chosen.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from swarmnet.pipeline.snapshot import PeerInfo


def routing_weights(
    peers: Sequence[PeerInfo],
    *,
    banned: Collection[str] = (),
    min_throughput: float = 1e-3,
) -> dict[str, float]:
    """Unnormalized routing weight of each eligible peer, keyed by peer id, in `peers` order.

    Banned peers are left out. If a peer id appears twice, its first entry counts.
    Raises `ValueError` if `min_throughput` is not positive.
    """
    if not min_throughput > 0:
        raise ValueError(f"min_throughput must be positive, not {min_throughput!r}")
    weights: dict[str, float] = {}
    for peer in peers:
        if peer.peer_id in banned or peer.peer_id in weights:
            continue
        weights[peer.peer_id] = max(peer.throughput, min_throughput) / (1 + peer.queue_depth)
    return weights


def choose_peer(
    peers: Sequence[PeerInfo],
    *,
    banned: Collection[str] = (),
    rng: random.Random,
) -> PeerInfo | None:
    """Picks one peer at random by `routing_weights`; None if every peer is banned or none exists.

    Deterministic for a given `rng` state.
    """
    weights = routing_weights(peers, banned=banned)
    if not weights:
        return None
    by_id: dict[str, PeerInfo] = {}
    for peer in peers:
        by_id.setdefault(peer.peer_id, peer)
    chosen = rng.choices(list(weights), weights=list(weights.values()))[0]
    return by_id[chosen]
