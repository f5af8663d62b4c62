"""Tests of `swarmnet.pipeline.rebalance` (pure, no network)."""

from __future__ import annotations

import math
import random

import pytest

from swarmnet.pipeline.rebalance import move_delay, plan_move
from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot

pytestmark = pytest.mark.timeout(30)


def peer(peer_id: str, stage: int, throughput: float = 1.0) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=stage, throughput=throughput, queue_depth=0)


def moved(snapshot: SwarmSnapshot, peer_id: str, stage: int) -> SwarmSnapshot:
    """`snapshot` after `peer_id` re-announced itself on `stage` (its record goes last)."""
    (old,) = [p for p in snapshot.peers if p.peer_id == peer_id]
    others = tuple(p for p in snapshot.peers if p.peer_id != peer_id)
    return SwarmSnapshot(snapshot.num_stages, others + (peer(peer_id, stage, old.throughput),))


def settle(
    snapshot: SwarmSnapshot, *, margin: float = 0.1, max_passes: int = 200
) -> tuple[SwarmSnapshot, int]:
    """Applies `plan_move` to each peer in turn until a full pass moves nobody.

    Returns the final snapshot and the number of moves. Fails if it has not settled in `max_passes`.
    Checks on the way that every move raises the ascending stage throughputs lexicographically (the
    module's no-cycle argument) and never lowers the swarm's minimum.
    """
    moves = 0
    for _ in range(max_passes):
        any_moved = False
        for peer_id in sorted(p.peer_id for p in snapshot.peers):
            target = plan_move(snapshot, peer_id, margin=margin)
            if target is None:
                continue
            before = sorted(effective_throughputs(snapshot))
            snapshot = moved(snapshot, peer_id, target)
            after = sorted(effective_throughputs(snapshot))
            assert after > before and after[0] >= before[0], (before, after)
            any_moved = True
            moves += 1
        if not any_moved:
            return snapshot, moves
    pytest.fail(f"did not settle in {max_passes} passes ({moves} moves)")


def effective_throughputs(snapshot: SwarmSnapshot) -> list[float]:
    """Stage throughputs, unmeasured peers counting as the measured average (or 1.0)."""
    groups = snapshot.by_stage()
    measured = [p.throughput for g in groups.values() for p in g if p.throughput > 0]
    default = sum(measured) / len(measured) if measured else 1.0
    return [sum(p.throughput or default for p in g) for g in groups.values()]


def served(snapshot: SwarmSnapshot) -> bool:
    return all(snapshot.by_stage().values())


# --- plan_move: basic decisions -------------------------------------------------------------------


def test_moves_fast_peer_from_crowded_stage_to_bottleneck():
    snap = SwarmSnapshot(2, (peer("a", 0, 10.0), peer("b", 0, 10.0), peer("c", 1, 2.0)))
    # min 2 -> after moving a: stage0 10, stage1 12 -> min 10 >= 2.2
    assert plan_move(snap, "a") == 1
    assert plan_move(snap, "b") == 1


def test_stays_when_already_on_the_bottleneck():
    snap = SwarmSnapshot(2, (peer("a", 0, 10.0), peer("b", 0, 10.0), peer("c", 1, 2.0), peer("d", 1, 1.0)))
    assert plan_move(snap, "c") is None
    assert plan_move(snap, "d") is None


def test_never_leaves_own_stage_empty():
    snap = SwarmSnapshot(2, (peer("a", 0, 100.0), peer("b", 1, 1.0)))
    assert plan_move(snap, "a") is None


def test_absent_peer_gets_none():
    snap = SwarmSnapshot(2, (peer("a", 0), peer("b", 0)))
    assert plan_move(snap, "nobody") is None


def test_peer_on_stale_stage_gets_none():
    snap = SwarmSnapshot(2, (peer("a", 0), peer("b", 0), peer("stale", 5)))
    assert plan_move(snap, "stale") is None


def test_single_peer_single_stage():
    assert plan_move(SwarmSnapshot(1, (peer("a", 0, 3.0),)), "a") is None


def test_single_stage_many_peers():
    snap = SwarmSnapshot(1, (peer("a", 0, 3.0), peer("b", 0, 1.0)))
    assert plan_move(snap, "a") is None


def test_no_stages():
    assert plan_move(SwarmSnapshot(0, ()), "a") is None


def test_heterogeneous_only_moves_when_it_helps():
    # stage totals: 0 -> 12 (8 + 4), 1 -> 5, 2 -> 9.  Current min 5 (stage 1).
    snap = SwarmSnapshot(
        3,
        (peer("big", 0, 8.0), peer("small", 0, 4.0), peer("c", 1, 5.0), peer("d", 2, 6.0), peer("e", 2, 3.0)),
    )
    # big -> stage 1: [4, 13, 9] -> min 4 < 5: worse.
    assert plan_move(snap, "big") is None
    # small -> stage 1: [8, 9, 9] -> min 8 >= 5.5.
    assert plan_move(snap, "small") == 1
    # d -> stage 1: [12, 11, 3] -> min 3: worse.  e -> stage 1: [12, 8, 6] -> min 6 >= 5.5.
    assert plan_move(snap, "d") is None
    assert plan_move(snap, "e") == 1


def test_move_that_overshoots_is_rejected():
    # Moving the fast peer would make its own stage the new, lower bottleneck.
    snap = SwarmSnapshot(2, (peer("fast", 0, 10.0), peer("slow", 0, 1.0), peer("c", 1, 5.0)))
    assert plan_move(snap, "fast") is None  # [1, 15]
    assert plan_move(snap, "slow") == 1  # [10, 6]


def test_stage_within_margin_of_the_bottleneck_does_not_block_a_move():
    # [10, 10.5, 30]: lifting stage 0 raises the swarm's minimum only to 10.5 (< 10 * 1.1), but both
    # stages involved end above 11; stage 1 is lifted by the next move.
    snap = SwarmSnapshot(3, (peer("a", 0, 10.0), peer("b", 1, 10.5), peer("c", 2, 15.0), peer("d", 2, 15.0)))
    assert plan_move(snap, "c") == 0
    after = moved(snap, "c", 0)  # [25, 10.5, 15]
    assert plan_move(after, "a") == 1  # [15, 20.5, 15]


# --- margins --------------------------------------------------------------------------------------


def test_margin_threshold_is_inclusive():
    # min 10 -> 11 after the move: exactly +10%.
    snap = SwarmSnapshot(2, (peer("a", 0, 11.0), peer("b", 0, 11.0), peer("m", 0, 1.0), peer("c", 1, 10.0)))
    # m -> 1: [22, 11] -> min 11 == 10 * 1.1 (10 * 1.1 is 11.000000000000002 in floats)
    assert plan_move(snap, "m", margin=0.1) == 1
    assert plan_move(snap, "m", margin=0.11) is None


def test_larger_margin_is_more_conservative():
    snap = SwarmSnapshot(2, (peer("a", 0, 10.0), peer("m", 0, 3.0), peer("c", 1, 10.0)))
    # m -> 1: [10, 13]: the minimum stays 10, so the move is not worth it whatever the margin.
    assert plan_move(snap, "m", margin=0.0) is None
    snap = SwarmSnapshot(2, (peer("a", 0, 10.0), peer("m", 0, 3.0), peer("c", 1, 8.0)))
    # m -> 1: [10, 11]; min 8 -> 10 = +25%.
    assert plan_move(snap, "m", margin=0.2) == 1
    assert plan_move(snap, "m", margin=0.25) == 1
    assert plan_move(snap, "m", margin=0.3) is None


def test_zero_margin_still_requires_a_strict_gain():
    # a -> 1 would swap the stages' totals ([1, 2] -> [2, 1]): no gain, so no move, even at margin 0.
    snap = SwarmSnapshot(2, (peer("a", 0, 1.0), peer("b", 0, 1.0), peer("c", 1, 1.0)))
    assert plan_move(snap, "a", margin=0.0) is None
    assert plan_move(snap, "b", margin=0.0) is None


@pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf])
def test_invalid_margin_is_rejected(margin):
    with pytest.raises(ValueError):
        plan_move(SwarmSnapshot(1, (peer("a", 0),)), "a", margin=margin)


# --- ties -----------------------------------------------------------------------------------------


def test_bottleneck_ties_broken_by_fewest_peers_then_lowest_index():
    # stages 1 and 2 both total 4; stage 2 has fewer peers -> target 2.
    snap = SwarmSnapshot(
        3, (peer("a", 0, 20.0), peer("m", 0, 5.0), peer("b", 1, 2.0), peer("c", 1, 2.0), peer("d", 2, 4.0))
    )
    # m -> 2: [20, 4, 9]; stage 1 is lifted by a later move.
    assert plan_move(snap, "m") == 2
    # Same with stage 1 better served, which makes stage 2 the unique bottleneck.
    snap = SwarmSnapshot(
        3, (peer("a", 0, 20.0), peer("m", 0, 5.0), peer("b", 1, 3.0), peer("c", 1, 3.0), peer("d", 2, 4.0))
    )
    assert plan_move(snap, "m") == 2
    # Full tie (same total, same peer count, here two empty stages): the lowest index, every time.
    snap = SwarmSnapshot(4, (peer("a", 0, 2.0), peer("b", 0, 2.0), peer("c", 0, 2.0), peer("d", 3)))
    assert {plan_move(snap, x) for x in "abc" for _ in range(5)} == {1}


def test_tied_bottlenecks_are_lifted_one_at_a_time():
    # Stages 1 and 2 tie at 3. Filling stage 1 leaves the swarm's minimum at 3 (stage 2), yet it is
    # the move that must come first: the swarm's minimum cannot rise in one move.
    snap = SwarmSnapshot(3, (peer("a", 0, 6.0), peer("b", 0, 6.0), peer("c", 1, 3.0), peer("d", 2, 3.0)))
    assert plan_move(snap, "a") == 1
    after = moved(snap, "a", 1)  # [6, 9, 3]: now stage 2 is the unique bottleneck.
    assert [plan_move(after, p) for p in "abcd"] == [None, None, 2, None]  # c -> [6, 6, 6]
    final = moved(after, "c", 2)
    assert [plan_move(final, p) for p in "abcd"] == [None, None, None, None]


def test_float_rounding_does_not_break_ties():
    # Stages 0 and 1 are tied (0.1 + 0.2 is 0.30000000000000004, 0.15 + 0.15 is 0.3) with as many
    # peers each: the lower index is the bottleneck.
    snap = SwarmSnapshot(
        3,
        (peer("a", 0, 0.1), peer("b", 0, 0.2), peer("c", 1, 0.15), peer("d", 1, 0.15))
        + (peer("x", 2, 5.0), peer("y", 2, 5.0)),
    )
    assert plan_move(snap, "x") == 0


def test_float_rounding_is_not_a_gain():
    # Stage 0 totals 2.4000000000000004, so "a" would leave it at 1.2000000000000004 while the
    # bottleneck is at 1.2: above it only by rounding, which is no gain even at margin 0.
    snap = SwarmSnapshot(
        2, (peer("x", 0, 0.1), peer("y", 0, 0.2), peer("z", 0, 0.9), peer("a", 0, 1.2), peer("d", 1, 1.2))
    )
    assert plan_move(snap, "a", margin=0.0) is None


# --- empty stages ---------------------------------------------------------------------------------


def test_empty_stage_is_filled_whenever_own_stage_keeps_a_peer():
    snap = SwarmSnapshot(3, (peer("a", 0, 100.0), peer("b", 0, 0.5), peer("c", 1, 1.0)))
    # Even a huge margin: an empty stage makes the whole pipeline stall.
    assert plan_move(snap, "a", margin=10.0) == 2
    assert plan_move(snap, "b", margin=10.0) == 2
    assert plan_move(snap, "c", margin=10.0) is None  # would leave stage 1 empty


def test_lowest_empty_stage_is_the_target():
    snap = SwarmSnapshot(4, (peer("a", 0), peer("b", 0), peer("c", 2)))
    assert plan_move(snap, "a") == 1


def test_duplicate_record_of_me_does_not_count_as_another_peer():
    snap = SwarmSnapshot(2, (peer("a", 0, 5.0), peer("a", 0, 5.0)))
    assert plan_move(snap, "a") is None


# --- unknown throughputs --------------------------------------------------------------------------


def test_fresh_peer_can_be_moved_to_an_empty_stage():
    snap = SwarmSnapshot(2, (peer("fresh", 0, 0.0), peer("b", 0, 4.0)))
    assert plan_move(snap, "fresh") == 1


def test_fresh_peer_counts_as_average_of_measured_peers():
    # Measured average (9 + 3) / 2 = 6, so "fresh" counts as 6: totals [15, 3].
    # fresh -> 1: [9, 9], min 3 -> 9.
    snap = SwarmSnapshot(2, (peer("fresh", 0, 0.0), peer("a", 0, 9.0), peer("c", 1, 3.0)))
    assert plan_move(snap, "fresh") == 1


def test_fresh_peers_count_on_every_stage():
    # Measured average (2 + 5) / 2 = 3.5 -> totals [2 + 3.5, 5 + 3.5] = [5.5, 8.5]: stage 0 is the
    # bottleneck, so its peers stay; x -> 0 would give [9, 5], below the current minimum 5.5.
    snap = SwarmSnapshot(
        2, (peer("fresh", 0, 0.0), peer("slow", 0, 2.0), peer("c", 1, 5.0), peer("x", 1, 0.0))
    )
    assert [plan_move(snap, p) for p in ("fresh", "slow", "c", "x")] == [None, None, None, None]


def test_stage_of_fresh_peers_is_not_mistaken_for_an_empty_one():
    # Stage 1 holds a peer that just joined (unmeasured). It counts as the average (10), not as 0:
    # totals [20, 10], and moving a or b gives [10, 20], no gain, so nobody rushes to stage 1.
    snap = SwarmSnapshot(2, (peer("a", 0, 10.0), peer("b", 0, 10.0), peer("new", 1, 0.0)))
    assert plan_move(snap, "a") is None
    assert plan_move(snap, "b") is None


def test_nobody_measured_uses_one_per_peer():
    # All unmeasured: each counts 1.0 -> totals [3, 1]; moving one gives [2, 2] = +100%.
    snap = SwarmSnapshot(2, (peer("a", 0, 0.0), peer("b", 0, 0.0), peer("c", 0, 0.0), peer("d", 1, 0.0)))
    assert plan_move(snap, "a") == 1
    assert plan_move(snap, "a", margin=1.0) == 1
    assert plan_move(snap, "a", margin=1.01) is None


# --- simulation: the policy applied repeatedly settles ---------------------------------------------


def test_all_peers_on_stage_zero_spread_to_every_stage():
    throughputs = [12.0, 3.0, 7.0, 1.0, 9.0, 4.0, 4.0, 2.5, 8.0, 0.0]
    snap = SwarmSnapshot(4, tuple(peer(f"p{i}", 0, t) for i, t in enumerate(throughputs)))
    final, moves = settle(snap)
    assert served(final)
    assert moves > 0
    # Settled means nobody wants to move any more.
    assert all(plan_move(final, p.peer_id) is None for p in final.peers)


def test_identical_peers_on_stage_zero_spread_evenly():
    snap = SwarmSnapshot(3, tuple(peer(f"p{i}", 0, 1.0) for i in range(9)))
    final, _ = settle(snap)
    assert sorted(len(g) for g in final.by_stage().values()) == [3, 3, 3]


def test_fewer_peers_than_stages_terminates_with_one_peer_per_served_stage():
    snap = SwarmSnapshot(5, tuple(peer(f"p{i}", 0, float(i + 1)) for i in range(3)))
    final, moves = settle(snap)
    assert moves == 2
    assert sorted(len(g) for g in final.by_stage().values()) == [0, 0, 1, 1, 1]


def test_settled_swarm_does_not_move():
    snap = SwarmSnapshot(2, (peer("a", 0, 5.0), peer("b", 1, 5.0)))
    final, moves = settle(snap)
    assert moves == 0
    assert final == snap


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.1, 0.5])
def test_random_swarms_settle_without_oscillation(margin):
    rng = random.Random(1234)
    for _ in range(150):
        num_stages = rng.randint(1, 6)
        num_peers = rng.randint(1, 16)
        peers = tuple(
            peer(
                f"p{i}",
                rng.randrange(num_stages) if rng.random() < 0.7 else 0,
                0.0 if rng.random() < 0.15 else round(rng.uniform(0.1, 20.0), 3),
            )
            for i in range(num_peers)
        )
        final, _ = settle(SwarmSnapshot(num_stages, peers), margin=margin)
        if num_peers >= num_stages:
            assert served(final), final


# --- move_delay -----------------------------------------------------------------------------------


def test_move_delay_stays_in_range_and_spreads():
    rng = random.Random(0)
    delays = [move_delay(rng, 60.0) for _ in range(2000)]
    assert all(30.0 <= d <= 90.0 for d in delays)
    assert min(delays) < 35.0 and max(delays) > 85.0
    assert 55.0 < sum(delays) / len(delays) < 65.0


def test_move_delay_is_deterministic_given_rng():
    a, b = random.Random(5), random.Random(5)
    assert [move_delay(a, 10.0) for _ in range(20)] == [move_delay(b, 10.0) for _ in range(20)]


def test_move_delay_zero_period():
    assert move_delay(random.Random(0), 0.0) == 0.0


@pytest.mark.parametrize("period", [-1.0, math.nan, math.inf])
def test_move_delay_rejects_invalid_period(period):
    with pytest.raises(ValueError):
        move_delay(random.Random(0), period)
