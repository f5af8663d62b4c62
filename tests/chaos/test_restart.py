"""Checkpoints and the coordinator's archive: a swarm killed whole resumes where it was, and a stage
whose every peer left is restored from the archive."""

from __future__ import annotations

import signal

import pytest

from swarmnet.testing import chaos

from .conftest import steps, wait_steps

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_everything_killed_and_restarted_resumes_from_checkpoints_then_archive_restores_a_stage(
    make_swarm, peer_profile, tmp_path
):
    archive = str(tmp_path / "archive")
    ckpt = [str(tmp_path / f"ckpt{i}") for i in range(2)]
    before = make_swarm()
    before.start_coordinator("--archive", archive, "--archive-period", "1")
    old = [before.start_peer(s, "--profile", peer_profile, "--checkpoint-dir", ckpt[s], wait=False) for s in (0, 1)]
    for peer in old:
        peer.wait_event("ready", 90)
    trainer = before.start_trainer("--max-seconds", "240")
    wait_steps(trainer, 6, 90)
    # Wait until both peers checkpointed the step the trainer reached, then kill every process.
    reached = steps(trainer)[-1]["step"]
    for s, peer in enumerate(old):
        peer.wait_event(lambda e: e.get("event") == "checkpoint" and e["step"] >= reached - 1, 60)
    losses_before = [e["loss"] for e in steps(trainer)]
    for process in reversed(before.processes):
        chaos.kill(process)
    saved = [max(e["step"] for e in p.events if e.get("event") == "checkpoint") for p in old]

    after = make_swarm()
    after.workdir.joinpath("coordinator.key").write_bytes(before.workdir.joinpath("coordinator.key").read_bytes())
    coordinator = after.start_coordinator("--archive", archive, "--archive-period", "1")
    new = [after.start_peer(s, "--profile", peer_profile, "--checkpoint-dir", ckpt[s], wait=False) for s in (0, 1)]
    for s, peer in enumerate(new):
        ready = peer.wait_event("ready", 90)
        assert ready["origin"] == "checkpoint" and ready["step"] == saved[s], ready
    trainer = after.start_trainer("--max-seconds", "240")
    first = trainer.wait_event("step", 90)
    assert first["step"] == min(saved) + 1  # the run goes on at the stages' step (at most one step lost)
    assert first["step"] >= reached
    # The loss curve continues: far below where the run started, near where it stopped.
    assert first["loss"] < losses_before[0] - 0.5 * (losses_before[0] - losses_before[-1]), (first, losses_before)
    wait_steps(trainer, 2, 60)
    trainer.signal(signal.SIGTERM)
    trainer.wait_event("summary", 60)

    # Stage 1's only peer leaves; the archive holds its last step; a fresh peer restores it.
    last, digest = max((e["epoch"], e["digest"]) for e in new[1].events if e.get("event") == "stepped")
    archived = coordinator.wait_event(lambda e: e.get("event") == "archived" and e["stage"] == 1 and e["step"] == last, 60)
    assert chaos.leave(new[1], timeout=30) == 0
    fresh = after.start_peer(1, "--profile", peer_profile)
    assert fresh.ready["origin"] == "archive"
    assert (fresh.ready["step"], fresh.ready["digest"]) == (archived["step"], digest)  # the same parameters
