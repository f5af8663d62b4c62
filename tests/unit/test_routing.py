"""Tests of `swarmnet.pipeline.routing`: stochastic wiring (pure, no network)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swarmnet.pipeline.routing import choose_peer, routing_weights
from swarmnet.pipeline.snapshot import PeerInfo

pytestmark = pytest.mark.timeout(30)


def peer(peer_id: str, throughput: float = 1.0, queue_depth: int = 0) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, stage=0, throughput=throughput, queue_depth=queue_depth)


def draw(peers, n: int, seed: int = 0, **kwargs) -> Counter:
    rng = random.Random(seed)
    return Counter(choose_peer(peers, rng=rng, **kwargs).peer_id for _ in range(n))


# --- routing_weights ------------------------------------------------------------------------------


def test_weights_follow_throughput_over_queue():
    weights = routing_weights([peer("a", 10.0, 0), peer("b", 10.0, 4), peer("c", 2.0, 1)])
    assert weights == pytest.approx({"a": 10.0, "b": 2.0, "c": 1.0})
    assert list(weights) == ["a", "b", "c"]


def test_zero_throughput_gets_small_positive_weight():
    weights = routing_weights([peer("new", 0.0), peer("old", 100.0)])
    assert 0 < weights["new"] < weights["old"]
    assert weights["new"] == pytest.approx(1e-3)
    assert routing_weights([peer("new", 0.0)], min_throughput=0.5) == {"new": 0.5}


def test_banned_peers_are_excluded():
    weights = routing_weights([peer("a"), peer("b"), peer("c")], banned={"b"})
    assert set(weights) == {"a", "c"}


def test_duplicate_peer_ids_keep_first_entry():
    assert routing_weights([peer("a", 3.0), peer("a", 9.0)]) == {"a": 3.0}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_min_throughput_must_be_positive(bad):
    with pytest.raises(ValueError):
        routing_weights([peer("a")], min_throughput=bad)


# --- choose_peer ----------------------------------------------------------------------------------


def test_no_peers_gives_none():
    assert choose_peer([], rng=random.Random(0)) is None


def test_all_banned_gives_none():
    assert choose_peer([peer("a"), peer("b")], banned={"a", "b"}, rng=random.Random(0)) is None


def test_single_peer_is_always_chosen():
    only = peer("a", 3.0, 2)
    rng = random.Random(0)
    assert all(choose_peer([only], rng=rng) is only for _ in range(100))


def test_banned_peers_are_never_chosen():
    counts = draw([peer("a"), peer("b", 1000.0), peer("c")], 2000, banned=("b",))
    assert "b" not in counts
    assert set(counts) == {"a", "c"}


def test_choices_are_proportional_to_weights():
    peers = [peer("fast", 6.0), peer("mid", 3.0), peer("slow", 1.0), peer("queued", 6.0, 5)]
    # weights 6 : 3 : 1 : 1 -> shares 6/11, 3/11, 1/11, 1/11
    n = 22_000
    counts = draw(peers, n, seed=1234)
    expected = {"fast": 6 / 11, "mid": 3 / 11, "slow": 1 / 11, "queued": 1 / 11}
    for peer_id, share in expected.items():
        assert counts[peer_id] / n == pytest.approx(share, abs=0.02), counts


def test_zero_throughput_peers_are_still_chosen_sometimes():
    counts = draw([peer("new", 0.0), peer("old", 1.0)], 20_000, seed=5)
    # Expected share is 1e-3 / 1.001 ~ 20 of 20,000 draws.
    assert 0 < counts["new"] < 200, counts
    assert counts["old"] > 19_000


def test_all_zero_throughput_peers_share_uniformly():
    counts = draw([peer("a", 0.0), peer("b", 0.0), peer("c", 0.0)], 3000, seed=3)
    for peer_id in "abc":
        assert 850 < counts[peer_id] < 1150, counts


def test_choice_is_deterministic_given_rng():
    peers = [peer("a", 1.0), peer("b", 2.0), peer("c", 3.0)]
    assert draw(peers, 200, seed=9) == draw(peers, 200, seed=9)


def test_returns_the_peer_info_itself():
    a = peer("a")
    assert choose_peer([a], rng=random.Random(0)) is a
