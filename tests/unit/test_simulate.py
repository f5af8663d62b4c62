"""Tests of `swarmnet.pipeline.simulate` (pure, no network): its fast rules decide exactly as the real
`plan_move` and `choose_stage` do, and the simulation keeps its invariants."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from swarmnet.pipeline import simulate
from swarmnet.pipeline.rebalance import plan_move
from swarmnet.pipeline.simulate import (
    PolicyMismatch,
    ScaleConfig,
    SwarmState,
    alive_at,
    churn_trace,
    lpt_bottleneck,
    run,
    sample_times,
    upper_bound,
)
from swarmnet.pipeline.stage_choice import choose_stage

pytestmark = pytest.mark.timeout(60)

PALETTE = (0.125, 0.5, 1.0, 1.0, 1.5, 2.0, 2.5, 5.0)
"""Few distinct throughputs, so that stage sums often tie exactly (the tie-breaks get exercised)."""

DECIMALS = (0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 1.1)
"""Not dyadic: their sums tie only up to rounding (0.1 + 0.2 vs 0.3), as the tolerances must allow."""


def random_throughput(rng: random.Random) -> float:
    if rng.random() < 0.6:
        return rng.choice(PALETTE)
    return rng.randint(1, 8 * 1024) / 1024  # dyadic, like the simulation's: sums are exact


def random_state(rng: random.Random, *, kind: str = "dyadic") -> SwarmState:
    """A random swarm: "dyadic" throughputs, "ties" (few stages, three values: many exact ties at the
    bottleneck between stages of different peer counts) or "decimal" (near-ties off by rounding)."""
    state = SwarmState(rng.randint(2, 4) if kind == "ties" else rng.randint(1, 6))
    for peer in range(rng.randint(2, 9) if kind == "ties" else rng.randint(0, 14)):
        if kind == "ties":
            throughput = rng.choice((0.5, 1.0, 1.0, 2.0))
        elif kind == "decimal":
            throughput = rng.choice(DECIMALS) if rng.random() < 0.7 else rng.uniform(0.01, 10.0)
        else:
            throughput = random_throughput(rng)
        state.add(peer, rng.randrange(state.num_stages), throughput)
    return state


def scramble(state: SwarmState, rng: random.Random, steps: int) -> None:
    """Random joins, leaves and moves: the incremental sums must stay exact."""
    next_peer = max(state.peers, default=-1) + 1
    for _ in range(steps):
        action = rng.random()
        if action < 0.4 or not state.peers:
            state.add(next_peer, rng.randrange(state.num_stages), random_throughput(rng))
            next_peer += 1
        elif action < 0.7:
            state.remove(rng.choice(list(state.peers)))
        else:
            state.move(rng.choice(list(state.peers)), rng.randrange(state.num_stages))


def test_fast_plan_move_decides_as_plan_move_on_random_swarms():
    rng = random.Random(20240601)
    outcomes = {"stay": 0, "move": 0, "move to an empty stage": 0}
    for case in range(900):
        kind = ("dyadic", "ties", "decimal")[case % 3]
        state = random_state(rng, kind=kind)
        if kind != "decimal" and case % 2:  # decimal sums are exact only if built in snapshot order
            scramble(state, rng, rng.randint(1, 20))
        snapshot = state.snapshot()
        assert state.sums == snapshot.stage_throughput()  # bit for bit, whatever the history
        margin = rng.choice((0.0, 0.0, 0.05, 0.1, 0.1, 0.25, 1.0))
        for peer in [*state.peers, 10**9]:  # 10**9: not in the swarm
            fast = state.plan_move(peer, margin)
            assert fast == plan_move(snapshot, str(peer), margin=margin), (snapshot, peer, margin)
            if fast is None:
                outcomes["stay"] += 1
            else:
                assert state.counts[state.peers[peer][0]] >= 2  # a move never empties a stage
                outcomes["move to an empty stage" if state.counts[fast] == 0 else "move"] += 1
    assert min(outcomes.values()) >= 100, outcomes  # every branch of the rule was exercised


def test_sums_that_differ_by_rounding_only_tie_as_in_plan_move():
    state = SwarmState(3)
    for peer, (stage, throughput) in enumerate([(0, 0.7), (0, 0.1), (1, 0.8), (2, 2.0), (2, 1.0)]):
        state.add(peer, stage, throughput)
    assert state.sums[0] < state.sums[1]  # 0.7999999999999999 < 0.8: a tie, broken by fewest peers
    assert state.plan_move(4, 0.1) == plan_move(state.snapshot(), "4") == 1
    assert state.join_candidates() == [1]


class RecordingRng(random.Random):
    """Records the candidates `choose_stage` draws from."""

    def choice(self, seq):
        self.candidates = list(seq)
        return super().choice(seq)


def test_fast_choose_stage_has_the_candidates_and_the_choice_of_choose_stage():
    rng = random.Random(7)
    ties = 0
    for case in range(600):
        state = random_state(rng, kind=("dyadic", "ties", "decimal")[case % 3])
        if case % 3 != 2 and case % 2:
            scramble(state, rng, rng.randint(1, 20))
        snapshot, seed = state.snapshot(), rng.random()
        recorder = RecordingRng(seed)
        real = choose_stage(snapshot, recorder)
        real_candidates = getattr(recorder, "candidates", [real])
        assert sorted(state.join_candidates()) == sorted(real_candidates), snapshot
        assert state.choose_stage(random.Random(seed)) == real  # and the same draw from the same rng
        ties += len(real_candidates) > 1
    assert ties >= 100


def test_state_rejects_what_the_simulation_never_holds():
    state = SwarmState(2)
    with pytest.raises(ValueError):
        state.add(0, 0, 0.0)  # unmeasured: the default-throughput rule is out of the model
    with pytest.raises(ValueError):
        state.add(0, 2, 1.0)
    state.add(0, 1, 1.0)
    with pytest.raises(ValueError):
        state.add(0, 0, 1.0)
    for bad in ({"stages": 0}, {"hours": 0.0}, {"margin": -0.1}, {"rebalance_period": float("nan")}):
        with pytest.raises(ValueError):
            ScaleConfig(**bad)


def test_churn_trace_is_seeded_and_keeps_the_peer_count_near_its_mean():
    config = ScaleConfig(peers=200, hours=3.0, mean_lifetime=1800.0, seed=5)
    trace = churn_trace(config)
    assert trace == churn_trace(config) != churn_trace(dataclasses.replace(config, seed=6))
    assert [e[0] for e in trace] == sorted(e[0] for e in trace)
    alive: set[int] = set()
    counts = []
    for _, peer, throughput in trace:
        if throughput:
            assert peer not in alive and throughput * 1024 == int(throughput * 1024)
            alive.add(peer)
        else:
            alive.remove(peer)  # a peer leaves only after it joined, once
        counts.append(len(alive))
    assert 150 <= sum(counts[200:]) / len(counts[200:]) <= 250


SMALL = ScaleConfig(peers=48, stages=8, hours=1.0, mean_lifetime=1800.0)
"""About 6 peers per stage, a mean lifetime of 30 min: a churny heterogeneous swarm."""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rebalancing_lifts_the_swarm_closer_to_the_optimum(seed):
    config = dataclasses.replace(SMALL, seed=seed)
    trace = churn_trace(config)
    without, with_moves = run(config, trace, rebalance=False), run(config, trace, rebalance=True)
    assert without.moves == 0 and with_moves.moves > 0
    assert with_moves.ratio_to_upper_bound > without.ratio_to_upper_bound + 0.03, (without, with_moves)


def test_every_decision_of_a_run_is_the_real_policy_s_and_no_move_empties_a_stage():
    config = dataclasses.replace(SMALL, peers=24, verify_every=1)  # ~3 peers per stage: stages do empty
    result = run(config, churn_trace(config), rebalance=True)
    assert result.verified_decisions > 1000 and result.moves > 20
    assert result.stages_emptied_by_moves == 0
    assert result.empty_stage_seconds > 0  # leaves do empty stages; moves then refill them


def test_a_fast_rule_that_drifts_from_the_real_policy_is_caught(monkeypatch):
    config = dataclasses.replace(SMALL, verify_every=1)
    monkeypatch.setattr(simulate.SwarmState, "plan_move", lambda self, peer, margin: None)
    with pytest.raises(PolicyMismatch):
        run(config, churn_trace(config), rebalance=True)


def test_runs_are_deterministic_for_a_seed():
    config = dataclasses.replace(SMALL, seed=11)
    first = run(config, churn_trace(config), rebalance=True)
    assert first == run(config, churn_trace(config), rebalance=True)  # wall_s aside
    other = dataclasses.replace(config, seed=12)
    assert first != run(other, churn_trace(other), rebalance=True)


def test_ratios_never_exceed_the_upper_bound():
    config = dataclasses.replace(SMALL, peers=100, sample_every=120.0)
    trace = churn_trace(config)
    peer_sets = alive_at(trace, sample_times(config))
    assert len(peer_sets) == 31 and all(peer_sets)
    upper = [upper_bound(p, config.stages) for p in peer_sets]
    for peers, bound in zip(peer_sets, upper):
        assert 0.9 * bound < lpt_bottleneck(peers, config.stages) <= bound
    for rebalance in (False, True):
        result = run(config, trace, rebalance=rebalance)
        assert 0.5 < result.ratio_to_upper_bound <= 1.0, result
        assert len(result.samples) == len(upper)
        assert all(0 < sample <= bound for sample, bound in zip(result.samples, upper)), result


def test_lpt_lies_between_the_exact_optimum_and_the_upper_bound_on_tiny_swarms():
    rng = random.Random(3)
    exact_hits = 0
    for _ in range(150):
        stages = rng.randint(1, 3)
        throughputs = [random_throughput(rng) for _ in range(rng.randint(stages, 7))]
        best = 0.0
        for assignment in itertools.product(range(stages), repeat=len(throughputs)):
            sums = [0.0] * stages
            for t, s in zip(throughputs, assignment):
                sums[s] += t
            best = max(best, min(sums))
        lpt = lpt_bottleneck(throughputs, stages)
        assert lpt <= best <= upper_bound(throughputs, stages)
        exact_hits += lpt == best
    assert exact_hits >= 120  # LPT with local improvement is usually exact on tiny swarms
