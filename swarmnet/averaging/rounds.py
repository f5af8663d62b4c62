"""One all-reduce round on one member: its connections, the reduction of its own part, and the
checksum that proves every member holds the same result. The protocol is described in
`allreduce.py`, which runs rounds for its server and its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import queue
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from swarmnet.averaging.partition import part_bounds
from swarmnet.averaging.robust import ClipOptions, centered_clip, sum_into
from swarmnet.averaging.wire import (
    CHUNK_ELEMENTS,
    PROTOCOL_VERSION,
    SLOTS_PER_SENDER,
    STOP_POLL,
    AveragingError,
    Done,
    Hello,
    Member,
    PartDigest,
    Welcome,
    connect,
    group_digest,
    hello_transcript,
    recv_into,
    recv_message,
    send_all_blocking,
    send_message,
    tensor_view,
)
from swarmnet.dht.identity import Identity, verify_signature
from swarmnet.errors import ProtocolError

logger = logging.getLogger(__name__)


class Stopped(Exception):
    """A worker thread noticed that its round is over (another part of it failed)."""


class Round:
    """The state of one all-reduce round on one member; `run()` drives it to the end.

    Messages go through the event loop. The bulk data moves in worker threads over blocking
    sockets, one job per link and direction plus one for the sum, coordinated by thread-safe
    queues and events; `stop` ends every job when the round fails.
    """

    def __init__(
        self,
        round_id: str,
        members: tuple[Member, ...],
        my_index: int,
        flat: torch.Tensor,
        weight: float,
        out: torch.Tensor,
        robust: ClipOptions | None = None,
        ignore: frozenset[int] = frozenset(),
        identity: Identity | None = None,
    ):
        loop = asyncio.get_running_loop()
        self.identity = identity
        """Signs our hellos; with one, incoming hellos must be signed by the member they claim."""
        self.round_id, self.members, self.me, self.flat = round_id, members, my_index, flat
        self.n = len(members)
        self.group = group_digest(members)
        self.bounds = part_bounds(flat.numel(), self.n)
        start, end = self.bounds[my_index]
        self.chunks = [
            (c, min(c + CHUNK_ELEMENTS, end - start)) for c in range(0, end - start, CHUNK_ELEMENTS)
        ]
        self.out = out
        self.robust, self.ignore = robust, ignore
        self.ratios: tuple[float, ...] = ()
        """centered_clip: per member, how far its contribution to my part was from the result."""
        self.others = [j for j in range(self.n) if j != my_index]
        self.weights: list[float | None] = [None] * self.n
        self.weights[my_index] = weight
        self.total_weight = 0.0
        self.incoming = {j: loop.create_future() for j in self.others}
        self.digests: list[bytes | None] = [None] * self.n
        self.has_digest = [asyncio.Event() for _ in range(self.n)]
        self.checksum = ""
        self.has_checksum = asyncio.Event()
        self.abort_reason: asyncio.Future[str] = loop.create_future()
        self.sockets: list[socket.socket] = []
        self.finished = False
        # shared with the worker threads
        self.filled: dict[int, queue.SimpleQueue[torch.Tensor]] = {
            j: queue.SimpleQueue() for j in self.others
        }
        self.free: dict[int, queue.SimpleQueue[torch.Tensor]] = {j: queue.SimpleQueue() for j in self.others}
        self.reduced = threading.Event()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=2 * self.n, thread_name_prefix="swarmnet-allreduce")

    def admit(self, hello: Hello, conn: socket.socket) -> str | None:
        """Takes an incoming connection for this round, or returns why it is refused."""
        if self.finished:
            return "round closed"
        if hello.version != PROTOCOL_VERSION:
            return f"unsupported protocol version {hello.version}"
        if hello.group != self.group:
            return "member list differs"
        if hello.sender not in self.incoming:
            return f"invalid sender index {hello.sender}"
        if self.identity is not None and not verify_signature(
            self.members[hello.sender].peer_id, hello_transcript(hello), hello.signature
        ):
            return f"hello not signed by member {hello.sender}'s key"
        if hello.numel != self.flat.numel():
            return f"tensor of {hello.numel} elements, expected {self.flat.numel()}"
        if self.incoming[hello.sender].done():
            return f"duplicate connection from member {hello.sender}"
        self.sockets.append(conn)
        self.incoming[hello.sender].set_result((conn, hello))
        return None

    def abort(self, reason: str) -> None:
        if not self.abort_reason.done():
            self.abort_reason.set_result(reason)

    def close(self) -> None:
        """After `run()` ended: every thread job was awaited, so this only releases resources."""
        self.finished = True
        self.stop.set()
        for future in self.incoming.values():
            future.cancel()
        for sock in self.sockets:
            sock.close()
        self.pool.shutdown(wait=True)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(self._watch())
            work = [tg.create_task(self._reduce()), tg.create_task(self._seal())]
            for j in self.others:
                work.append(tg.create_task(self._link(j, self._send, "sending to")))
                work.append(tg.create_task(self._link(j, self._receive, "receiving from")))
            await asyncio.wait(work)
            watcher.cancel()

    async def _watch(self) -> None:
        raise AveragingError(await self.abort_reason)

    async def _link(self, j: int, work, what: str) -> None:
        try:
            await work(j)
        except (OSError, EOFError, ProtocolError) as e:
            peer = self.members[j]
            raise AveragingError(
                f"{what} member {j} ({peer.peer_id} at {peer.host}:{peer.port}): {e!r}"
            ) from e

    async def _in_thread(self, fn, sock: socket.socket | None = None) -> Any:
        """Runs `fn()` in this round's pool (over `sock` made blocking). Cancelled, it stops the
        round's threads, shuts `sock` down (ending a blocked send or receive) and waits for the
        thread, so that no job outlives the round."""
        if sock is not None:
            sock.setblocking(True)
        future = asyncio.get_running_loop().run_in_executor(self.pool, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.stop.set()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation is what propagates
            raise
        except Stopped as e:
            raise AveragingError("the round was stopped") from e
        finally:
            if sock is not None and future.done() and sock.fileno() != -1:
                sock.setblocking(False)

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(STOP_POLL):
            if self.stop.is_set():
                raise Stopped

    def _take(self, source: queue.SimpleQueue) -> torch.Tensor:
        while True:
            try:
                return source.get(timeout=STOP_POLL)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped from None

    async def _connect(self, member: Member) -> socket.socket:
        sock = await connect(member.host, member.port)
        self.sockets.append(sock)
        return sock

    async def _send(self, j: int) -> None:
        sock = await self._connect(self.members[j])
        weight = self.weights[self.me]
        hello = Hello(
            round_id=self.round_id, group=self.group, sender=self.me, numel=self.flat.numel(), weight=weight
        )
        if self.identity is not None:
            hello = dataclasses.replace(hello, signature=self.identity.sign(hello_transcript(hello)))
        await send_message(sock, hello)
        if (await recv_message(sock, Welcome)).round_id != self.round_id:
            raise ProtocolError("welcomed into another round")
        await self._in_thread(lambda: self._send_data(sock, j), sock)
        await self.has_checksum.wait()
        await send_message(sock, Done(round_id=self.round_id, checksum=self.checksum))

    def _send_data(self, sock: socket.socket, j: int) -> None:  # worker thread
        start, end = self.bounds[j]
        send_all_blocking(sock, tensor_view(self.flat[start:end]))  # my contribution to member j's part
        self._wait(self.reduced)
        start, end = self.bounds[self.me]
        send_all_blocking(sock, tensor_view(self.out[start:end]))  # the part I own, summed

    async def _receive(self, j: int) -> None:
        conn, hello = await self.incoming[j]
        await send_message(conn, Welcome(round_id=self.round_id))
        self.weights[j] = hello.weight
        self.digests[j] = await self._in_thread(lambda: self._receive_data(conn, j), conn)
        self.has_digest[j].set()
        done = await recv_message(conn, Done)
        await self.has_checksum.wait()
        if done.round_id != self.round_id or done.checksum != self.checksum:
            raise AveragingError(f"member {j} holds a different result than member {self.me}")

    def _receive_data(self, conn: socket.socket, j: int) -> bytes:  # worker thread
        for _ in range(SLOTS_PER_SENDER if self.chunks else 0):
            self.free[j].put(torch.empty(self.chunks[0][1], dtype=torch.float32))
        for chunk_start, chunk_end in self.chunks:  # j's contribution to my part, into reused slots
            slot = self._take(self.free[j])
            recv_into(conn, tensor_view(slot[: chunk_end - chunk_start]))
            self.filled[j].put(slot)
        start, end = self.bounds[j]  # then j's summed part, straight into the result
        hasher = PartDigest()
        recv_into(conn, tensor_view(self.out[start:end]), hasher)
        return hasher.digest()

    async def _reduce(self) -> None:
        work = self._reduce_data if self.robust is None else self._reduce_robust
        self.digests[self.me] = await self._in_thread(work)
        self.has_digest[self.me].set()

    def _reduce_data(self) -> bytes:  # worker thread
        """Sums part `me` of every member's tensor in member order: t_0 + t_1 + ... + t_{n-1}."""
        start = self.bounds[self.me][0]
        hasher = PartDigest()
        for chunk_start, chunk_end in self.chunks:
            total = self.out[start + chunk_start : start + chunk_end]
            slots = {k: self._take(self.filled[k]) for k in self.others}
            mine = self.flat[start + chunk_start : start + chunk_end]
            terms = [mine if k == self.me else slots[k][: chunk_end - chunk_start] for k in range(self.n)]
            sum_into(total, terms)
            hasher.update(tensor_view(total))
            for k, slot in slots.items():
                self.free[k].put(slot)
        self.reduced.set()
        return hasher.digest()

    def _reduce_robust(self) -> bytes:  # worker thread
        """Gathers part `me` of every member's tensor (n × the part's size), then aggregates it by
        centered clipping: clipping needs each contribution's whole part, not one chunk of it."""
        start, end = self.bounds[self.me]
        parts = torch.empty(self.n, end - start, dtype=torch.float32)  # row k: member k's contribution
        parts[self.me] = self.flat[start:end]
        for chunk_start, chunk_end in self.chunks:
            for k in self.others:
                slot = self._take(self.filled[k])
                parts[k, chunk_start:chunk_end] = slot[: chunk_end - chunk_start]
                self.free[k].put(slot)
        hasher = PartDigest()
        if self.chunks:  # an empty part has nothing to aggregate (its weights may be unknown)
            weights = [float(w) for w in self.weights]  # all set: every contribution arrived
            result = centered_clip(parts, weights, options=self.robust, ignore=self.ignore)
            self.out[start:end] = result.total
            self.ratios = result.ratios
            hasher.update(tensor_view(self.out[start:end]))
        self.reduced.set()
        return hasher.digest()

    async def _seal(self) -> None:
        """The checksum of the whole result: every part's digest, the total weight and the size."""
        for event in self.has_digest:
            await event.wait()
        total = self.weights[0]
        for weight in self.weights[1:]:
            total += weight
        self.total_weight = total
        digest = hashlib.sha256(struct.pack("<qqd", self.flat.numel(), self.n, total))
        for part in self.digests:
            digest.update(part)
        self.checksum = digest.hexdigest()
        self.has_checksum.set()
