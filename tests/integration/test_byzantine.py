"""A lying stage peer among honest replicas: the trainer's audits catch it within a bounded number
of microbatches, ban it, and the run ends where a clean run of the same swarm ends."""

from __future__ import annotations

import sys

import pytest

from swarmnet.testing.swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STEPS = 24
AUDIT_FRACTION = 0.5


def as_liar(command: list[str]) -> list[str]:
    """`swarmnet join ...` → the same command run by the malicious launcher."""
    assert command[1:3] == ["-m", "swarmnet.cli"], command
    return [sys.executable, "-m", "swarmnet.testing.byzantine", "--scale", "1.0", *command[3:]]


def train(swarm: LocalSwarm, *, liar: bool) -> tuple[dict, list[dict], list[float], str | None]:
    """Stage 0 served by three peers (the third a liar or not), stage 1 by one; trains STEPS steps
    with audits. Returns the trainer's summary, its ban events, its step losses, the liar's id."""
    swarm.start_coordinator()
    profile = swarm.workdir / "peer.toml"
    profile.write_text("progress_period = 0.1\nrebalance_period = 0\n")
    swarm.start_peers([0, 0, 1], "--profile", str(profile))
    third = swarm.start_peer(0, "--profile", str(profile), wrap=as_liar if liar else None)
    trainer = swarm.start_trainer("--max-steps", str(STEPS), "--audit-fraction", str(AUDIT_FRACTION))
    summary = trainer.wait_event("summary", 240)
    events = list(trainer.events)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    return summary, [e for e in events if e["event"] == "liar_banned"], losses, third.ready["peer_id"]


def test_a_lying_peer_is_caught_banned_and_the_loss_matches_a_clean_run(manifest, tmp_path):
    with LocalSwarm(manifest, workdir=tmp_path / "attacked") as swarm:
        summary, bans, losses, liar_id = train(swarm, liar=True)
    assert summary["steps"] == STEPS
    assert [b["peer_id"] for b in bans] == [liar_id] and bans[0]["stage"] == 0
    # The liar gets about a third of stage 0's forwards and half of those are audited: caught
    # after a few audits (the bound leaves room for unlucky routing).
    assert bans[0]["audits"] <= 40, bans

    with LocalSwarm(manifest, workdir=tmp_path / "clean") as swarm:
        clean_summary, clean_bans, clean_losses, _ = train(swarm, liar=False)
    assert clean_summary["steps"] == STEPS and not clean_bans  # audits convict no honest peer

    # Same data in the same order: compare the last steps' mean loss (one step's is noisy).
    attacked, clean = sum(losses[-4:]) / 4, sum(clean_losses[-4:]) / 4
    relative = abs(attacked - clean) / clean
    print(f"caught after {bans[0]['audits']} audits; last-4-step loss {attacked:.4f} vs clean {clean:.4f} "
          f"({relative:.2%}); dropped {summary['dropped']} vs {clean_summary['dropped']}")
    assert relative < 0.05, (losses, clean_losses)
