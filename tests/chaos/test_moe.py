"""Mixture-of-Experts end to end with real processes: stage peers run the gates, expert peers claim
experts with `--expert auto`, one expert's only peer is killed mid-run, replicas stay identical."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from swarmnet.config import MoEConfig

from ..integration.conftest import tiny_manifest
from .conftest import steps, wait_identical, wait_steps

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def manifest():
    base = tiny_manifest("moe")
    # Block 0 (on stage 0, which is not the last) has the gate: its forward records the experts'
    # answers and its backward replays them. Two experts, both asked for every token.
    moe = MoEConfig(layers=(0,), num_experts=2, top_k=2, k_min=1, d_expert=64)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, moe=moe))


def test_moe_training_survives_a_killed_expert_and_replicas_stay_identical(make_swarm, peer_profile):
    swarm = make_swarm()
    swarm.start_coordinator()
    swarm.start_peers([0, 1], "--profile", peer_profile)
    experts = [swarm.start_expert("auto", "--profile", peer_profile) for _ in range(3)]
    claimed = [p.ready["expert"] for p in experts]
    # Auto-claim spreads: the first two peers take different experts, the third doubles one up.
    assert sorted(claimed[:2]) == ["expert.0.0", "expert.0.1"], claimed
    doubled = claimed[2]
    replicas = [p for p in experts if p.ready["expert"] == doubled]
    (alone,) = [p for p in experts if p.ready["expert"] != doubled]

    trainer = swarm.start_trainer("--max-seconds", "600")
    wait_steps(trainer, 6, timeout=90)

    alone.signal(signal.SIGKILL)  # the only peer of its expert: its tokens go to the other one
    killed_at = len(steps(trainer))
    wait_steps(trainer, 4, timeout=90)
    epoch = wait_identical(replicas, at_least=2, timeout=60)

    trainer.signal(signal.SIGTERM)
    trainer.wait_event("summary", 60)
    losses = [e["loss"] for e in steps(trainer)]
    assert len(losses) >= killed_at + 4
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    stage0 = swarm.processes[1]
    assert not [e for e in stage0.events if e.get("event") == "error"]
    assert epoch >= 2
