"""When a serving peer should move to another stage (SWARM-style rebalancing).

A pipeline runs only as fast as its slowest stage. Every so often (after `move_delay`), each peer asks
`plan_move` whether leaving its stage for the bottleneck stage would lift the bottleneck by at least a
margin without pushing its own stage down to the old minimum, and moves only if so:

- Only the bottleneck is a candidate target: the stage with the least total throughput, ties broken
  by the fewest peers, then the lowest index. The choice is deterministic so that every peer reading
  the same snapshot agrees on it; randomness lives in the delay instead, so peers re-check at
  different times and the first mover's announcement changes what the others see.
- A peer never leaves its stage empty, and an empty stage is always worth serving.
- The test is on the two stages involved, not on the swarm's minimum: after the move, both the
  target and the stage left behind must reach `(1 + margin)` times the old minimum. When several
  stages tie at the minimum, the swarm's minimum cannot rise until all of them are lifted, one move
  at a time; a rule on the swarm's minimum would never take the first of those moves (identical
  peers that all start on stage 0 of 3 stages would stop at 7/1/1 peers instead of 3/3/3). With a
  unique bottleneck, the swarm's minimum still rises with every move, to at most `(1 + margin)`
  times the old one if another stage lies within the margin; the next move then lifts that stage.
- Every move thus turns one stage at the old minimum into one above it and drops no stage to it or
  below, so the stage throughputs sorted in ascending order rise lexicographically with every move:
  for a fixed set of peers and throughputs, repeated moves cannot cycle and must stop.

Unmeasured peers (throughput 0, e.g. freshly joined) count as the average throughput of the measured
peers of the snapshot, or as 1.0 if no peer has measured itself yet. This applies to every peer, not
only to the one deciding: it lets a fresh peer be moved, it keeps a stage of fresh peers from looking
empty (which would pull others into it before those peers have measured themselves), and it gives all
peers the same view of the swarm, which the no-cycle argument above relies on. Consequently a stage
has zero throughput exactly when it has no peers.
"""

from __future__ import annotations

import math
import random

from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot

_REL_TOL = 1e-9
"""Throughputs this close are equal (sums of floats in another order differ in the last bits)."""

UNMEASURED_DEFAULT = 1.0
"""Throughput assumed for unmeasured peers when no peer of the snapshot has measured itself."""


def plan_move(snapshot: SwarmSnapshot, me: str, *, margin: float = 0.1) -> int | None:
    """Returns the stage peer `me` should move to, or None to stay.

    The target is the bottleneck stage (see the module docstring). `me` moves there only if
    - `me` is in the snapshot, on a stage in `0..num_stages-1`, and not already on the bottleneck;
    - its stage keeps at least one other peer; and
    - the bottleneck is empty, or, after the move, both the bottleneck and the stage left behind
      reach `current_min * (1 + margin)`, where `current_min` is the bottleneck's throughput now, and
      both exceed `current_min` even when `margin` is 0.
    Comparisons allow a relative float tolerance of 1e-9.

    If `me` appears more than once, its first entry with a valid stage is the one that moves; other
    entries with the same id never count as "another peer" of a stage (resolving duplicates is the
    snapshot builder's job). Raises `ValueError` if `margin` is negative or not finite.
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be finite and >= 0, not {margin!r}")
    groups = snapshot.by_stage()
    mine = _find(groups, me)
    if mine is None:
        return None
    throughput = _effective_throughputs(groups)
    target = _bottleneck(groups, throughput)
    if target == mine.stage:
        return None
    if not any(p.peer_id != me for p in groups[mine.stage]):
        return None
    if not groups[target]:
        return target

    current_min = throughput[target]
    my_throughput = _effective(mine, _default_throughput(groups))
    new_low = min(throughput[mine.stage] - my_throughput, throughput[target] + my_throughput)
    threshold = current_min * (1 + margin)
    enough = new_low >= threshold or math.isclose(new_low, threshold, rel_tol=_REL_TOL)
    better = new_low > current_min and not math.isclose(new_low, current_min, rel_tol=_REL_TOL)
    return target if enough and better else None


def move_delay(rng: random.Random, period: float) -> float:
    """Seconds to wait before the next `plan_move` check: uniform in `[0.5 * period, 1.5 * period]`.

    The jitter keeps peers that read the same snapshot from re-checking, and moving, in a herd.
    Raises `ValueError` if `period` is negative or not finite.
    """
    if not (math.isfinite(period) and period >= 0):
        raise ValueError(f"period must be finite and >= 0, not {period!r}")
    low, high = 0.5 * period, 1.5 * period
    return min(max(rng.uniform(low, high), low), high)  # `uniform` may round just past `high`


def _find(groups: dict[int, list[PeerInfo]], peer_id: str) -> PeerInfo | None:
    for group in groups.values():
        for peer in group:
            if peer.peer_id == peer_id:
                return peer
    return None


def _default_throughput(groups: dict[int, list[PeerInfo]]) -> float:
    measured = [p.throughput for group in groups.values() for p in group if p.throughput > 0]
    return sum(measured) / len(measured) if measured else UNMEASURED_DEFAULT


def _effective(peer: PeerInfo, default: float) -> float:
    return peer.throughput if peer.throughput > 0 else default


def _effective_throughputs(groups: dict[int, list[PeerInfo]]) -> list[float]:
    default = _default_throughput(groups)
    return [sum(_effective(p, default) for p in group) for group in groups.values()]


def _bottleneck(groups: dict[int, list[PeerInfo]], throughput: list[float]) -> int:
    """Least throughput, then fewest peers, then lowest index."""
    lowest = min(throughput)
    tied = [s for s, t in enumerate(throughput) if math.isclose(t, lowest, rel_tol=_REL_TOL)]
    return min(tied, key=lambda s: (len(groups[s]), s))
