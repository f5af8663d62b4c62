"""Bounded, expiring cache of microbatch inputs kept between a forward and its backward."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """At most `max_size` entries, each dropped `ttl` seconds after insertion; oldest evicted first.

    With `max_per_owner`, one owner (`owner(key)`, by default the key's first item: the client)
    holds at most that many entries; its own oldest makes room for its newest, so a client that
    floods the cache evicts only its own entries, never another client's."""

    def __init__(
        self,
        max_size: int,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_per_owner: int | None = None,
        owner: Callable[[Hashable], Hashable] = lambda key: key[0],  # type: ignore[index]
    ):
        if max_size < 1 or ttl <= 0 or (max_per_owner is not None and max_per_owner < 1):
            raise ValueError("max_size and max_per_owner must be >= 1 and ttl > 0")
        self.max_size = max_size
        self.ttl = ttl
        self.max_per_owner = max_per_owner
        self._owner = owner
        self._clock = clock
        self._items: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.evicted = 0

    def put(self, key: Hashable, value: V) -> None:
        self._expire()
        self._items.pop(key, None)
        if self.max_per_owner is not None:
            who = self._owner(key)
            mine = [k for k in self._items if self._owner(k) == who]
            for old in mine[: max(0, len(mine) + 1 - self.max_per_owner)]:
                del self._items[old]
                self.evicted += 1
        self._items[key] = (self._clock() + self.ttl, value)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
            self.evicted += 1

    def pop(self, key: Hashable) -> V | None:
        self._expire()
        item = self._items.pop(key, None)
        return item[1] if item else None

    def get(self, key: Hashable) -> V | None:
        self._expire()
        item = self._items.get(key)
        return item[1] if item else None

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            key, (deadline, _) = next(iter(self._items.items()))
            if deadline > now:
                break
            del self._items[key]
            self.evicted += 1
