"""Which stage (`swarmnet join --stage auto`) or expert (`--expert auto`) a joining peer serves.

A pipeline runs only as fast as its slowest stage, so a new peer joins the bottleneck: the stage with
the least total advertised throughput. An empty stage has throughput 0, so it always comes first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot

_REL_TOL = 1e-9
"""Stage throughputs this close are a tie (sums of floats in another order differ in the last bits)."""


def choose_stage(
    snapshot: SwarmSnapshot, rng: random.Random | None = None, *, held: dict[int, int] | None = None
) -> int:
    """Returns the bottleneck stage of `snapshot`.

    Ties on throughput are broken by the fewest peers (so an empty stage wins over a stage of
    unmeasured peers), then uniformly at random with `rng`, so that peers joining at the same time
    from the same snapshot spread over the tied stages instead of piling onto one. The result is
    deterministic for a given `rng` state; without one, a fresh unseeded generator is used.

    `held` maps stages this peer holds a checkpoint of to the checkpoint's step: an empty stage it
    holds state of comes first (the most advanced such state first), so that a restarted swarm gets
    its stages back from the peers that saved them.

    Raises `ValueError` if the run has no stages.
    """
    if snapshot.num_stages < 1:
        raise ValueError(f"cannot choose a stage: num_stages={snapshot.num_stages}")
    groups = snapshot.by_stage()
    empty_held = [s for s in (held or {}) if 0 <= s < snapshot.num_stages and not groups[s]]
    if empty_held:
        return max(empty_held, key=lambda s: (held[s], -s))
    throughput = snapshot.stage_throughput()
    lowest = min(throughput)
    tied = [s for s, t in enumerate(throughput) if math.isclose(t, lowest, rel_tol=_REL_TOL)]
    fewest = min(len(groups[s]) for s in tied)
    candidates = [s for s in tied if len(groups[s]) == fewest]
    if len(candidates) == 1:
        return candidates[0]
    return (rng or random.Random()).choice(candidates)


def choose_expert(
    uids: Sequence[str], replicas: Mapping[str, Sequence[PeerInfo]], rng: random.Random | None = None
) -> str:
    """Which expert a joining peer claims (`swarmnet join --expert auto`): the one with the fewest
    live replicas, then the least total throughput, then at random among ties (so that peers
    joining together from the same view spread out). `replicas` maps uid → its announced servers;
    uids outside `uids` are ignored.

    Raises `ValueError` if the run has no experts.
    """
    if not uids:
        raise ValueError("cannot choose an expert: the run has no Mixture-of-Experts layers")

    def load(uid: str) -> tuple[int, float]:
        peers = replicas.get(uid, ())
        return len(peers), sum(p.throughput for p in peers)

    fewest = min(load(uid)[0] for uid in uids)
    least = min(load(uid)[1] for uid in uids if load(uid)[0] == fewest)
    candidates = [
        uid for uid in uids if load(uid)[0] == fewest and math.isclose(load(uid)[1], least, rel_tol=_REL_TOL, abs_tol=1e-12)
    ]
    return candidates[0] if len(candidates) == 1 else (rng or random.Random()).choice(candidates)


def explain_stage_choice(snapshot: SwarmSnapshot, stage: int, *, held: dict[int, int] | None = None) -> str:
    """Why `choose_stage` picked `stage` from `snapshot`, in words a volunteer can check."""
    groups = snapshot.by_stage()
    throughput = snapshot.stage_throughput()
    table = ", ".join(f"{s}: {throughput[s]:.1f}/s × {len(groups[s])}" for s in range(snapshot.num_stages))
    if held and stage in held and not groups[stage]:
        return f"nobody serves stage {stage} and this peer holds its checkpoint at step {held[stage]}"
    if not groups[stage]:
        return f"nobody served stage {stage} (stages: {table})"
    return (
        f"stage {stage} was the bottleneck at {throughput[stage]:.1f} samples/s over "
        f"{len(groups[stage])} peer(s) (stages: {table})"
    )
