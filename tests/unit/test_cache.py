"""`ExpiringCache`: size bound, time to live on an injected clock, pop semantics."""

from __future__ import annotations

import pytest

from swarmnet.peer.cache import ExpiringCache

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_put_get_pop():
    cache: ExpiringCache[str] = ExpiringCache(4, 10.0, clock=FakeClock())
    cache.put("a", "A")
    assert cache.get("a") == "A"
    assert cache.get("a") == "A"  # get does not remove
    assert len(cache) == 1
    assert cache.pop("a") == "A"
    assert cache.pop("a") is None  # pop removes
    assert cache.get("a") is None
    assert len(cache) == 0


def test_missing_keys_give_none():
    cache: ExpiringCache[int] = ExpiringCache(2, 1.0, clock=FakeClock())
    assert cache.get("nope") is None and cache.pop("nope") is None


def test_tuple_keys_are_distinct_per_client():
    cache: ExpiringCache[int] = ExpiringCache(4, 10.0, clock=FakeClock())
    cache.put(("alice", "mb-1"), 1)
    cache.put(("bob", "mb-1"), 2)
    assert cache.pop(("bob", "mb-1")) == 2
    assert cache.pop(("alice", "mb-1")) == 1


def test_size_is_bounded_and_the_oldest_is_evicted_first():
    cache: ExpiringCache[int] = ExpiringCache(3, 10.0, clock=FakeClock())
    for i in range(5):
        cache.put(i, i)
        assert len(cache) == min(i + 1, 3)
    assert cache.evicted == 2
    assert [cache.get(i) for i in range(5)] == [None, None, 2, 3, 4]


def test_putting_an_existing_key_refreshes_it_without_growing():
    clock = FakeClock()
    cache: ExpiringCache[str] = ExpiringCache(2, 10.0, clock=clock)
    cache.put("a", "old")
    cache.put("b", "B")
    clock.now += 5
    cache.put("a", "new")  # now the newest entry
    assert len(cache) == 2 and cache.evicted == 0
    cache.put("c", "C")  # evicts "b", the oldest
    assert cache.get("b") is None
    assert cache.get("a") == "new"
    clock.now += 6  # "a" lives 10 s from its second put
    assert cache.get("a") == "new"


def test_entries_expire_after_ttl():
    clock = FakeClock()
    cache: ExpiringCache[str] = ExpiringCache(10, 5.0, clock=clock)
    cache.put("a", "A")
    clock.now += 2
    cache.put("b", "B")
    clock.now += 2.999
    assert cache.get("a") == "A"
    clock.now += 0.001  # exactly ttl after "a" was put
    assert cache.get("a") is None
    assert cache.get("b") == "B"
    assert len(cache) == 1
    clock.now += 2
    assert cache.pop("b") is None
    assert len(cache) == 0
    assert cache.evicted == 2


def test_expired_entries_do_not_count_against_the_size():
    clock = FakeClock()
    cache: ExpiringCache[int] = ExpiringCache(2, 1.0, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    clock.now += 1.5
    cache.put("c", 3)
    cache.put("d", 4)
    assert cache.get("c") == 3 and cache.get("d") == 4
    assert len(cache) == 2


@pytest.mark.parametrize(("max_size", "ttl"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_bounds_are_refused(max_size, ttl):
    with pytest.raises(ValueError):
        ExpiringCache(max_size, ttl)


def test_one_owner_evicts_only_its_own_entries():
    cache: ExpiringCache[int] = ExpiringCache(8, 60.0, max_per_owner=3)
    cache.put(("honest", 0), 0)
    for i in range(100):  # a flood from one client
        cache.put(("flood", i), i)
    assert cache.get(("honest", 0)) == 0
    assert [cache.get(("flood", i)) for i in (96, 97, 98, 99)] == [None, 97, 98, 99]
    assert len(cache) == 4
