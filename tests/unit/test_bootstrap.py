"""Where processes find the swarm: flag, environment, profile; coordinator bootstrap answers."""

from __future__ import annotations

import asyncio

import pytest

from swarmnet.dht.bootstrap import choose_initial_peers, parse_bootstrap, resolve_initial_peers
from swarmnet.errors import ConfigError
from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot
from swarmnet.pipeline.stage_choice import choose_stage, explain_stage_choice

pytestmark = pytest.mark.timeout(30)

MADDR = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWexample"


def test_flag_then_environment_then_profile():
    assert choose_initial_peers(["/ip4/1"], ["/ip4/3"], env="/ip4/2") == (["/ip4/1"], "--initial-peers")
    assert choose_initial_peers(None, ["/ip4/3"], env=" /ip4/2, http://c:8470\n") == (
        ["/ip4/2", "http://c:8470"], "SWARMNET_INITIAL_PEERS"
    )
    assert choose_initial_peers([], ("/ip4/3",), env="") == (["/ip4/3"], "the profile's initial_peers")
    with pytest.raises(ConfigError, match="SWARMNET_INITIAL_PEERS"):
        choose_initial_peers(None, (), env="")


def test_bootstrap_answers_are_checked():
    assert parse_bootstrap({"maddrs": [MADDR], "peer_id": "x"}) == [MADDR]
    for bad in (None, [], {"maddrs": []}, {"maddrs": "x"}, {"maddrs": [1]}, {"maddrs": ["not-a-maddr"]}):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)


def test_multiaddrs_pass_through_and_junk_is_refused():
    assert asyncio.run(resolve_initial_peers([MADDR])) == [MADDR]
    with pytest.raises(ConfigError, match="neither a multiaddr"):
        asyncio.run(resolve_initial_peers(["coordinator:8470"]))


def test_stage_choice_is_explained():
    peers = (PeerInfo(peer_id="a", stage=0, throughput=40.0, queue_depth=0), PeerInfo(peer_id="b", stage=1, throughput=10.0, queue_depth=0))
    snapshot = SwarmSnapshot(num_stages=3, peers=peers)
    stage = choose_stage(snapshot)
    assert stage == 2 and explain_stage_choice(snapshot, stage).startswith("nobody served stage 2")
    full = SwarmSnapshot(num_stages=2, peers=peers)
    assert explain_stage_choice(full, choose_stage(full)).startswith("stage 1 was the bottleneck at 10.0 samples/s")
    assert "checkpoint at step 7" in explain_stage_choice(snapshot, 2, held={2: 7})


def test_wildcard_servers_announce_a_reachable_address():
    from swarmnet.protocols.addresses import announced_host

    maddrs = ["/ip4/127.0.0.1/tcp/1/p2p/x", "/ip6/::1/tcp/1", "/ip4/10.1.2.3/tcp/1/p2p/x"]
    assert announced_host("0.0.0.0", maddrs) == "10.1.2.3"
    assert announced_host("", maddrs[:1]) == "127.0.0.1"
    assert announced_host("192.168.1.5", maddrs) == "192.168.1.5"
