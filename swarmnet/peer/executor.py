"""Compute off the event loop: one worker thread per device, with a bounded queue.

RPC I/O, heartbeats and (later) averaging stay on the asyncio loop; torch runs here. Calls run in
submission order, so an optimizer step submitted before a reply is sent happens before any request
that arrives after that reply.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from swarmnet.errors import PeerBusyError

T = TypeVar("T")


class ComputeExecutor:
    def __init__(self, *, max_queue: int, torch_threads: int = 1):
        self.max_queue = max_queue
        self.pending = 0
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="swarmnet-compute",
            initializer=functools.partial(torch.set_num_threads, torch_threads),
        )

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs `fn(*args)` on the compute thread; `PeerBusyError` if the queue is full."""
        if self.pending >= self.max_queue:
            raise PeerBusyError(f"compute queue is full ({self.pending} waiting)")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1

    async def run_timed(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """`run`, also returning the seconds `fn` took on the compute thread: its cost, without
        the wait behind queued calls (which measures load, not capacity)."""

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - start

        return await self.run(timed)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
