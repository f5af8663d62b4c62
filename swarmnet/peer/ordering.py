"""Gradient calls applied in the order their trainer sent them.

A stage's peer adds a step's gradients in microbatch order, as `train --local` does, so float sums
come out bit-identical. The trainer used to enforce that by waiting for each gradient call to
*return* before sending the next one for the same stage: one round trip per microbatch, which on a
50 ms link serialised every step. Now the trainer only waits until the previous call was *sent*,
and tags each call with its sequence number and the one it sent before to the same peer; the peer
holds a call back until its predecessor has been handed to the compute thread (which runs calls in
submission order). Calls can then overlap on the wire and still be applied in order.

The wait is bounded: a predecessor that never arrives (its connection broke on the way) delays its
successor by at most `ORDER_WAIT` seconds, then the successor goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque

logger = logging.getLogger(__name__)

ORDER_WAIT = 5.0
MAX_SEQUENCES = 1024
"""Ordering keys (client, trainer session) remembered; the least recently used is forgotten."""
MAX_DONE = 256
"""Sequence numbers remembered as handed over, per key."""


class _Sequence:
    def __init__(self) -> None:
        self.done: set[int] = set()
        self.order: deque[int] = deque()
        self.waiters: dict[int, asyncio.Event] = {}

    def mark(self, seq: int) -> None:
        if seq in self.done:
            return
        self.done.add(seq)
        self.order.append(seq)
        while len(self.order) > MAX_DONE:
            self.done.discard(self.order.popleft())
        event = self.waiters.pop(seq, None)
        if event is not None:
            event.set()


class CallOrder:
    """Per (client, ordering key): which sequence numbers have been handed to compute."""

    def __init__(self, wait: float = ORDER_WAIT):
        self.wait = wait
        self._sequences: OrderedDict[tuple[str, str], _Sequence] = OrderedDict()

    def _get(self, key: tuple[str, str]) -> _Sequence:
        sequence = self._sequences.get(key)
        if sequence is None:
            sequence = self._sequences[key] = _Sequence()
            while len(self._sequences) > MAX_SEQUENCES:
                self._sequences.popitem(last=False)
        else:
            self._sequences.move_to_end(key)
        return sequence

    async def wait_for(self, client: str, key: str, after: int) -> None:
        """Returns once call `after` of (`client`, `key`) was handed over, or after `wait` s."""
        if not key or after < 0:
            return
        sequence = self._get((client, key))
        if after in sequence.done:
            return
        event = sequence.waiters.setdefault(after, asyncio.Event())
        try:
            async with asyncio.timeout(self.wait):
                await event.wait()
        except TimeoutError:
            if sequence.waiters.get(after) is event:
                del sequence.waiters[after]
            logger.info("call %d of %s from %s never came; going on without it", after, key, client[-6:])

    def handed_over(self, client: str, key: str, seq: int) -> None:
        """Call `seq` was submitted to compute (or refused): its successor may go."""
        if key and seq >= 0:
            self._get((client, key)).mark(seq)
