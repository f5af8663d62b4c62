"""Stage swarms: many peers per stage average, stay identical, survive a kill, sync and rebalance."""

from __future__ import annotations

import dataclasses
import time

import pytest

from swarmnet.config import AveragingConfig
from swarmnet.testing.processes import ManagedProcess
from swarmnet.testing.waiting import wait_until

from .conftest import tiny_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def stepped(peer: ManagedProcess) -> dict[int, str]:
    """epoch -> parameter digest, from the peer's `ready` and `stepped` events."""
    return {e["epoch"] if e["event"] == "stepped" else e["step"]: e["digest"]
            for e in list(peer.events) if e["event"] in ("stepped", "ready") and "digest" in e}


def wait_common_epoch(peers: list[ManagedProcess], at_least: int, timeout: float) -> int:
    """Waits until every peer reported a digest at one common epoch >= at_least; returns the latest."""

    def common() -> int | None:
        reached = [e for e in set.intersection(*(set(stepped(p)) for p in peers)) if e >= at_least]
        return max(reached) if reached else None

    return wait_until(common, timeout, what=f"a common epoch >= {at_least}")


def assert_identical(peers: list[ManagedProcess], epoch: int) -> None:
    digests = {p.name: stepped(p)[epoch] for p in peers}
    assert len(set(digests.values())) == 1, digests


@pytest.fixture
def peer_profile(tmp_path):
    path = tmp_path / "peer.toml"
    path.write_text("progress_period = 0.1\nrebalance_period = 0\n")
    return str(path)


def test_three_peers_per_stage_stay_identical(swarm, peer_profile):
    stage0 = swarm.start_peers([0, 0, 0], "--profile", peer_profile)
    stage1 = swarm.start_peers([1, 1, 1], "--profile", peer_profile)
    for p in stage0:
        assert p.ready["stage"] == 0
    # Train for a while rather than a number of steps: a round that stalls at start-up (peers'
    # DHT views still differ) absorbs every sample that arrives meanwhile into one step.
    trainer = swarm.start_trainer("--max-seconds", "10")
    summary = trainer.wait_event("summary", 200)
    assert summary["dropped"] == 0
    for stage_peers in (stage0, stage1):
        # What matters: every replica reports the same digest at the same (several-th) step.
        epoch = wait_common_epoch(stage_peers, at_least=3, timeout=60)
        assert_identical(stage_peers, epoch)
    assert summary["final_loss"] < summary["initial_loss"]


@pytest.fixture
def manifest():
    # Short round timeout and join grace so failure paths finish quickly.
    base = tiny_manifest()
    return dataclasses.replace(base, averaging=AveragingConfig(round_timeout=5.0, join_grace=1.0))


def test_peer_killed_mid_round_survivors_stay_identical(swarm, peer_profile):
    from swarmnet.testing.faults import ROUND_DELAY

    survivors = swarm.start_peers([0, 0], "--profile", peer_profile)
    victim = swarm.start_peer(0, "--profile", peer_profile, env={ROUND_DELAY: "60"})
    swarm.start_peer(1, "--profile", peer_profile)
    trainer = swarm.start_trainer("--max-steps", "10")
    victim.wait_event("round", 120)  # the victim froze its gradients and is inside a round
    killed_at = time.monotonic()
    victim.kill()
    epoch = wait_common_epoch(survivors, at_least=1, timeout=60)
    assert time.monotonic() - killed_at < 60
    assert_identical(survivors, epoch)
    summary = trainer.wait_event("summary", 200)
    assert summary["steps"] == 10


def test_peer_joining_mid_training_matches_its_stage_mates(swarm, peer_profile):
    first = swarm.start_peer(0, "--profile", peer_profile)
    swarm.start_peer(1, "--profile", peer_profile)
    trainer = swarm.start_trainer("--max-seconds", "150")  # stopped by the fixture once we are done
    trainer.wait_event(lambda e: e.get("event") == "step" and e["step"] >= 4, 120)
    joiner = swarm.start_peer(0, "--profile", peer_profile)
    assert joiner.ready["step"] >= 1  # it downloaded trained state, not the seeded init
    epoch = wait_common_epoch([first, joiner], at_least=joiner.ready["step"] + 2, timeout=120)
    assert_identical([first, joiner], epoch)
    assert trainer.alive


def test_rebalancing_spreads_peers_over_empty_stages(swarm, tmp_path):
    profile = tmp_path / "rebalance.toml"
    profile.write_text("progress_period = 0.1\nrebalance_period = 2.0\nrebalance_margin = 0.1\n")
    peers = [swarm.start_peer(0, "--profile", str(profile)) for _ in range(3)]
    wait_until(
        lambda: any(e.get("event") == "ready" and e.get("stage") == 1 for p in peers for e in list(p.events)),
        90,
        what="a peer moving to the empty stage",
    )
    trainer = swarm.start_trainer("--max-steps", "3")
    summary = trainer.wait_event("summary", 120)
    assert summary["steps"] == 3 and summary["dropped"] == 0


def test_low_communication_mode_keeps_replicas_identical_at_outer_steps(tmp_path, peer_profile):
    from swarmnet.testing.swarm import LocalSwarm

    diloco = dataclasses.replace(
        tiny_manifest(name="diloco"),
        averaging=AveragingConfig(mode="diloco", outer_every=2, round_timeout=5.0, join_grace=1.0),
    )
    with LocalSwarm(diloco, workdir=tmp_path / "diloco") as local:
        local.start_coordinator()
        stage0 = local.start_peers([0, 0], "--profile", peer_profile)
        local.start_peer(1, "--profile", peer_profile)
        trainer = local.start_trainer("--max-seconds", "14")
        summary = trainer.wait_event("summary", 200)
        assert summary["dropped"] == 0 and summary["final_loss"] < summary["initial_loss"]
        epoch = wait_common_epoch(stage0, at_least=2, timeout=60)
        assert_identical(stage0, epoch)
