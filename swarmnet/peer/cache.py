"""Bounded, expiring cache of microbatch inputs kept between a forward and its backward."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """At most `max_size` entries, each dropped `ttl` seconds after insertion; oldest evicted first."""

    def __init__(self, max_size: int, ttl: float, *, clock: Callable[[], float] = time.monotonic):
        if max_size < 1 or ttl <= 0:
            raise ValueError("max_size must be >= 1 and ttl > 0")
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.evicted = 0

    def put(self, key: Hashable, value: V) -> None:
        self._expire()
        self._items.pop(key, None)
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
