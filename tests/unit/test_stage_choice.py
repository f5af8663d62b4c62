"""Tests of `swarmnet.pipeline.snapshot` and `swarmnet.pipeline.stage_choice` (pure, no network)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot
from swarmnet.pipeline.stage_choice import choose_expert, choose_stage

pytestmark = pytest.mark.timeout(30)


def peer(peer_id: str, stage: int, throughput: float = 1.0, queue_depth: int = 0) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, throughput=throughput, queue_depth=queue_depth)


# --- snapshot -------------------------------------------------------------------------------------


def test_by_stage_lists_every_stage_and_ignores_out_of_range_peers():
    snap = SwarmSnapshot(3, (peer("a", 0), peer("b", 2), peer("c", 2), peer("stale", 7)))
    groups = snap.by_stage()
    assert list(groups) == [0, 1, 2]
    assert [p.peer_id for p in groups[0]] == ["a"]
    assert groups[1] == []
    assert [p.peer_id for p in groups[2]] == ["b", "c"]


def test_stage_throughput_sums_per_stage():
    snap = SwarmSnapshot(3, (peer("a", 0, 1.5), peer("b", 2, 2.0), peer("c", 2, 3.0)))
    assert snap.stage_throughput() == [1.5, 0.0, 5.0]


def test_snapshot_coerces_peers_to_tuple_and_is_frozen():
    snap = SwarmSnapshot(1, [peer("a", 0)])  # type: ignore[arg-type]
    assert isinstance(snap.peers, tuple)
    with pytest.raises(AttributeError):
        snap.num_stages = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stage=-1, throughput=1.0, queue_depth=0),
        dict(stage=0, throughput=-1.0, queue_depth=0),
        dict(stage=0, throughput=float("nan"), queue_depth=0),
        dict(stage=0, throughput=float("inf"), queue_depth=0),
        dict(stage=0, throughput=1.0, queue_depth=-1),
    ],
)
def test_peer_info_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        PeerInfo(peer_id="x", **kwargs)


def test_peer_info_is_keyword_only():
    with pytest.raises(TypeError):
        PeerInfo("x", 0, 1.0, 0)  # type: ignore[misc]


# --- choose_stage ---------------------------------------------------------------------------------


def test_heterogeneous_throughputs_pick_the_bottleneck():
    snap = SwarmSnapshot(
        3,
        (peer("a", 0, 10.0), peer("b", 0, 5.0), peer("c", 1, 4.0), peer("d", 2, 8.0), peer("e", 2, 3.0)),
    )
    assert choose_stage(snap, random.Random(0)) == 1


def test_bottleneck_can_have_more_peers_than_others():
    # Stage 0 has three slow peers (3.0 in total), stage 1 one fast peer: stage 0 is the bottleneck.
    snap = SwarmSnapshot(2, (peer("a", 0, 1.0), peer("b", 0, 1.0), peer("c", 0, 1.0), peer("d", 1, 9.0)))
    assert choose_stage(snap, random.Random(0)) == 0


def test_single_stage_single_peer():
    assert choose_stage(SwarmSnapshot(1, (peer("a", 0, 5.0),)), random.Random(0)) == 0


def test_empty_stage_among_full_ones_comes_first():
    snap = SwarmSnapshot(4, (peer("a", 0, 0.5), peer("b", 1, 0.1), peer("c", 3, 0.2)))
    for seed in range(20):
        assert choose_stage(snap, random.Random(seed)) == 2


def test_empty_stage_beats_stage_of_unmeasured_peers():
    # Both have throughput 0; the one with fewer peers wins.
    snap = SwarmSnapshot(3, (peer("a", 0, 0.0), peer("b", 1, 2.0)))
    for seed in range(20):
        assert choose_stage(snap, random.Random(seed)) == 2


def test_all_stages_empty_spread_uniformly_over_seeds():
    snap = SwarmSnapshot(4, ())
    counts = Counter(choose_stage(snap, random.Random(seed)) for seed in range(2000))
    assert set(counts) == {0, 1, 2, 3}
    for stage in range(4):
        assert 400 < counts[stage] < 600, counts


def test_throughput_ties_broken_by_fewest_peers():
    # Stages 0 and 1 both total 4.0, stage 1 with fewer peers.
    snap = SwarmSnapshot(3, (peer("a", 0, 2.0), peer("b", 0, 2.0), peer("c", 1, 4.0), peer("d", 2, 9.0)))
    for seed in range(20):
        assert choose_stage(snap, random.Random(seed)) == 1


def test_full_ties_spread_over_tied_stages_only():
    snap = SwarmSnapshot(
        3, (peer("a", 0, 0.1 + 0.2), peer("b", 1, 0.3), peer("c", 2, 5.0))  # 0.1+0.2 != 0.3 exactly
    )
    counts = Counter(choose_stage(snap, random.Random(seed)) for seed in range(1000))
    assert set(counts) == {0, 1}
    assert 400 < counts[0] < 600, counts


def test_deterministic_given_rng():
    snap = SwarmSnapshot(5, ())
    first = [choose_stage(snap, random.Random(42)) for _ in range(5)]
    assert len(set(first)) == 1
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [choose_stage(snap, rng_a) for _ in range(50)] == [choose_stage(snap, rng_b) for _ in range(50)]


def test_without_rng_still_returns_a_tied_stage():
    assert choose_stage(SwarmSnapshot(3, (peer("a", 1),))) in (0, 2)


def test_no_stages_is_an_error():
    with pytest.raises(ValueError):
        choose_stage(SwarmSnapshot(0, ()), random.Random(0))


def test_negative_num_stages_is_rejected():
    with pytest.raises(ValueError):
        SwarmSnapshot(-1, ())


def test_an_empty_stage_whose_state_we_hold_comes_first():
    snap = SwarmSnapshot(num_stages=3, peers=(peer("a", 0, 5.0),))
    # Stages 1 and 2 are empty; we hold checkpoints of 0 (served) and 2: take 2.
    assert choose_stage(snap, random.Random(0), held={0: 9, 2: 4}) == 2
    # Of two empty stages held, the most advanced state first.
    assert choose_stage(SwarmSnapshot(num_stages=3, peers=()), random.Random(0), held={1: 3, 2: 7}) == 2


def test_held_stages_that_are_served_or_out_of_range_change_nothing():
    snap = SwarmSnapshot(num_stages=2, peers=(peer("a", 0, 5.0), peer("b", 1, 1.0)))
    assert choose_stage(snap, random.Random(0), held={0: 9, 7: 1}) == choose_stage(snap, random.Random(0)) == 1


# --- experts --------------------------------------------------------------------------------------


def _expert_peer(n: int, uid_index: int, throughput: float) -> PeerInfo:
    return PeerInfo(peer_id=f"p{n}", stage=10 + uid_index, throughput=throughput, queue_depth=0)


def test_choose_expert_prefers_fewest_replicas_then_least_throughput():
    uids = ["expert.0.0", "expert.0.1", "expert.0.2"]
    replicas = {
        "expert.0.0": [_expert_peer(1, 0, 5.0)],
        "expert.0.1": [_expert_peer(2, 1, 1.0)],
        "expert.0.2": [_expert_peer(3, 2, 9.0), _expert_peer(4, 2, 1.0)],
    }
    assert choose_expert(uids, replicas) == "expert.0.1"
    assert choose_expert(uids, {**replicas, "expert.0.1": []}) == "expert.0.1"
    assert choose_expert(uids, {"expert.0.9": [_expert_peer(5, 9, 1.0)]}, random.Random(0)) in uids
    with pytest.raises(ValueError):
        choose_expert([], {})


def test_peers_claiming_experts_one_after_another_spread_over_all_of_them():
    uids = [f"expert.1.{i}" for i in range(4)]
    replicas: dict[str, list[PeerInfo]] = {}
    rng = random.Random(3)
    for n in range(8):
        uid = choose_expert(uids, replicas, rng)
        replicas.setdefault(uid, []).append(_expert_peer(n, uids.index(uid), 1.0))
    assert sorted(len(v) for v in replicas.values()) == [2, 2, 2, 2]


def test_ties_are_broken_at_random():
    uids = [f"expert.1.{i}" for i in range(4)]
    assert len({choose_expert(uids, {}, random.Random(seed)) for seed in range(40)}) == 4
