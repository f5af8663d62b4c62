"""Coordinator, peers and a trainer find each other through the DHT; forged manifests are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_peers_and_trainer_meet_through_the_dht(swarm, manifest):
    coordinator = swarm.coordinator.ready
    assert coordinator["run_id"] == manifest.run_id
    assert all(m.startswith("/ip4/127.0.0.1/") for m in coordinator["maddrs"])

    # One peer finds the swarm through the coordinator's bootstrap URL in the environment (no
    # --initial-peers, no peer id known in advance), and says what it detected and chose.
    http = f"http://{coordinator['http']}"
    env_peer = swarm.spawn("peer-env", "join", "--stage", "1", "--host", "127.0.0.1", env={"SWARMNET_INITIAL_PEERS": http})
    peers = [swarm.start_peer(0), env_peer]
    env_peer.wait_event("ready", 90)
    assert [p.ready["stage"] for p in peers] == [0, 1]
    assert {p.ready["run_id"] for p in peers} == {manifest.run_id}
    said = "\n".join(env_peer.output)
    assert f"initial peers from SWARMNET_INITIAL_PEERS: {http}" in said
    assert "device cpu (" in said and "chose stage 1: as asked (--stage 1)" in said
    assert f"peer metrics: http://{env_peer.ready['metrics']}/metrics" in said
    assert "measured" in said and "samples/s" in said

    # `swarmnet status` is checked against a live swarm in tests/observability/test_live.py.
    trainer = swarm.start_trainer("--max-steps", "2", initial_peers=[http])
    summary = trainer.wait_event("summary", 90)
    assert summary["steps"] == 2 and summary["dropped"] == 0
    assert trainer.popen.wait(30) == 0


def test_auto_stage_fills_the_empty_stage(swarm):
    first = swarm.start_peer(1)
    second = swarm.start_peer("auto")
    assert first.ready["stage"] == 1
    assert second.ready["stage"] == 0


def test_forged_manifests_are_refused(swarm, manifest, tmp_path):
    victim = swarm.coordinator.ready["peer_id"]
    forge = subprocess.run(
        [sys.executable, "-m", "swarmnet.testing.forge", "--initial-peers", *swarm.initial_peers, "--victim", victim],
        capture_output=True, text=True, timeout=60, env=swarm.env, check=True,
    )
    result = json.loads(forge.stdout.strip().splitlines()[-1])
    assert result["foreign_subkey_stored"] is False  # no DHT node accepts a signature for another's slot
    # A replayed older copy of a validly signed record is refused; readers see the newest.
    assert result["original_stored"] is True and result["replay_stored"] is False, result
    assert result["steps_read_after_replay"] == [2], result
    for reason in ("forged", "replayed"):  # the coordinator is the swarm's only DHT node so far
        assert _metric(swarm.coordinator, f'swarmnet_records_rejected_total{{reason="{reason}"}}') >= 1, reason

    profile = tmp_path / "peer.toml"
    profile.write_text("manifest_timeout = 3.0\n")
    # The hash-mismatched manifest is refused on verification: nobody can join the run it claims.
    refused = swarm.spawn("peer-forged", "join", "--initial-peers", *swarm.initial_peers, "--stage", "0",
                          "--run-id", result["claimed_run_id"], "--profile", str(profile))
    assert refused.popen.wait(60) == 2
    assert "no verified manifest" in refused.log_path.read_text()

    # The genuine run is still found and served.
    peer = swarm.start_peer(0)
    assert peer.ready["run_id"] == manifest.run_id


def _metric(process, sample: str) -> float:
    """The value of one sample on a process's Prometheus `/metrics` (0 when absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{process.ready['http']}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0
