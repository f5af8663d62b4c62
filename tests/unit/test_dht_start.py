"""`SwarmDHT.create` on a busy host: a p2pd that misses its start-up deadline is started again
(hivemind has already stopped it), and so is a node whose initial peers did not answer the DHT's
bootstrap ping (with a fresh p2pd, the failed one stopped); any other start failure is final."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2PDaemonError

from swarmnet.dht import node
from swarmnet.dht.identity import Identity
from swarmnet.errors import ConfigError, SwarmError


def _start(monkeypatch, tmp_path, failures: list[Exception]) -> list[float]:
    """Runs `SwarmDHT.create` with p2pd's start replaced by `failures`, one per attempt; returns
    the start-up timeout each attempt was given."""
    timeouts: list[float] = []

    async def create(**kwargs):
        timeouts.append(kwargs["startup_timeout"])
        raise failures[len(timeouts) - 1]

    monkeypatch.setattr(node.P2P, "create", create)
    identity = Identity.load_or_create(tmp_path / "peer.key")
    with pytest.raises(ConfigError, match="could not start the libp2p host"):
        asyncio.run(node.SwarmDHT.create(identity=identity))
    return timeouts


@pytest.mark.timeout(10)
def test_a_late_p2pd_is_started_again_then_given_up_on(monkeypatch, tmp_path):
    late = P2PDaemonError("Daemon failed to start in 30.0 seconds")
    timeouts = _start(monkeypatch, tmp_path, [late] * node.P2PD_START_ATTEMPTS)
    assert timeouts == [node.P2PD_STARTUP_TIMEOUT] * node.P2PD_START_ATTEMPTS


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "failure", [P2PDaemonError("Failed to start p2pd daemon: no such file"), OSError("address already in use")]
)
def test_other_start_failures_are_final(monkeypatch, tmp_path, failure):
    assert len(_start(monkeypatch, tmp_path, [failure])) == 1


@pytest.mark.timeout(10)
def test_an_unanswered_bootstrap_is_tried_again_then_a_swarm_error(monkeypatch, tmp_path):
    started: list[object] = []
    stopped: list[object] = []

    class _Daemon:
        async def shutdown(self) -> None:
            stopped.append(self)

    async def create_p2p(**kwargs):
        started.append(_Daemon())
        return started[-1]

    async def create_node(**kwargs):
        raise RuntimeError("DHTNode bootstrap failed: none of the initial_peers responded to a ping.")

    monkeypatch.setattr(node.P2P, "create", create_p2p)
    monkeypatch.setattr(node.DHTNode, "create", create_node)
    identity = Identity.load_or_create(tmp_path / "peer.key")
    with pytest.raises(SwarmError, match="none of the initial peers answered"):
        asyncio.run(node.SwarmDHT.create(identity=identity, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"]))
    assert len(started) == node.BOOTSTRAP_ATTEMPTS and stopped == started  # every daemon stopped
