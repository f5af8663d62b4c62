"""Compute off the event loop: one worker thread per device, fed by a fair queue.

RPC I/O, heartbeats and averaging stay on the asyncio loop; torch runs here, one call at a time.

Order and fairness. Calls are tagged start-time-fair-queuing style: a call's tag is one more than
the larger of the queue's virtual time (the tag of the call last started) and its client's previous
tag; the smallest tag runs next, ties in submission order. So
- one client's calls run in the order it submitted them (the peer's gradient-call order relies on
  it), and a call submitted while nothing of its client is queued runs after everything submitted
  before it (an optimizer step submitted before a reply is sent happens before any request that
  arrives after that reply);
- a client with a long backlog does not delay the others: a newcomer's call is tagged right after
  the running one, ahead of the backlog, so a flooding client only slows itself.
Client calls are refused with `PeerBusyError` when the queue holds `max_queue` calls or the client
already has `max_per_client` queued; the peer's own calls (client "") are never refused.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from swarmnet.errors import PeerBusyError

T = TypeVar("T")

MAX_TAGS = 4096
"""Clients' last tags remembered; tags of clients with nothing queued are dropped beyond this."""


class ComputeExecutor:
    def __init__(self, *, max_queue: int, torch_threads: int = 1, max_per_client: int | None = None):
        self.max_queue = max_queue
        self.max_per_client = max_per_client or max_queue
        self.pending = 0
        """Calls queued or running."""
        self._per_client: Counter[str] = Counter()
        self._last_tag: dict[str, int] = {}
        self._vtime = 0
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, Callable[[], Any], asyncio.Future]] = []
        self._running = False
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="swarmnet-compute",
            initializer=functools.partial(torch.set_num_threads, torch_threads),
        )

    async def run(self, fn: Callable[..., T], *args, client: str = "") -> T:
        """Runs `fn(*args)` on the compute thread; `PeerBusyError` if a client's call finds the
        queue or its own share of it full."""
        if client:
            if self.pending >= self.max_queue:
                raise PeerBusyError(f"compute queue is full ({self.pending} waiting)")
            if self._per_client[client] >= self.max_per_client:
                raise PeerBusyError(f"this client already has {self._per_client[client]} calls queued here")
        tag = max(self._vtime, self._last_tag.get(client, 0)) + 1
        self._last_tag[client] = tag
        if len(self._last_tag) > MAX_TAGS:
            self._last_tag = {c: t for c, t in self._last_tag.items() if t > self._vtime or self._per_client[c]}
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (tag, next(self._seq), functools.partial(fn, *args), future))
        self.pending += 1
        self._per_client[client] += 1
        self._pump()
        try:
            return await future
        finally:
            self.pending -= 1
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]

    def _pump(self) -> None:
        """Starts the next queued call if none is running (on the event loop)."""
        while not self._running and self._heap:
            tag, _, call, future = heapq.heappop(self._heap)
            if future.done():  # its caller was cancelled while it waited
                continue
            self._vtime = tag
            self._running = True
            try:
                job = asyncio.get_running_loop().run_in_executor(self._pool, call)
            except RuntimeError as e:  # the pool was shut down
                self._running = False
                future.set_exception(e)
                continue
            job.add_done_callback(functools.partial(self._finished, future))

    def _finished(self, future: asyncio.Future, job: asyncio.Future) -> None:
        self._running = False
        if not future.done():
            if job.cancelled():
                future.cancel()
            elif job.exception() is not None:
                future.set_exception(job.exception())
            else:
                future.set_result(job.result())
        self._pump()

    async def run_timed(self, fn: Callable[..., T], *args, client: str = "") -> tuple[T, float]:
        """`run`, also returning the seconds `fn` took on the compute thread: its cost, without
        the wait behind queued calls (which measures load, not capacity)."""

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - start

        return await self.run(timed, client=client)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
