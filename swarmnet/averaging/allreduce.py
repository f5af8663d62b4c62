"""All-reduce data plane: peers of one stage sum flat float32 tensors and weights, or all fail.

Butterfly all-reduce over direct TCP between the members of a group (`members`, same order on
every member). Member `i` owns part `i` of the tensor (`part_bounds(numel, n)`).

Every member opens one connection to every other member and speaks on it, in this order:

1. `Hello{round_id, group, sender, numel, weight}`; the receiver answers `Welcome` or refuses
   with an error frame (unknown/closed round, other member list, wrong index, duplicate, size);
2. its contribution to the receiver's part (raw float32 bytes, size implied by `numel`);
3. the reduced part it owns, once it has summed everyone's contributions in member order (or, with
   `centered_clip`, aggregated them robustly: `robust.py`; the wire is the same);
4. `Done{round_id, checksum}`: a sha256 over the size, the total weight and an xxh3-64 of every part
   of the reduced tensor as this member holds it (see `PartDigest`).

A member returns only after every other member reported the checksum it computed itself, so a
returned result is complete and identical everywhere. Anything else (a refusal, a lost connection,
a mismatch, the `timeout`) raises `AveragingError` and closes every connection of the round,
which makes the other members fail too instead of waiting. Only the final `Done` exchange can
disagree: a member that loses a link after everyone else verified raises, holding the same result.

Messages use the frame layout of `swarmnet.protocols.framing` and go through the event loop. Bulk
data is unframed and moves in worker threads over blocking sockets (`sendall`/`recv_into` release
the GIL; on loopback about twice as fast as the event loop's socket calls), read straight into the
result or into two reused 4 MiB slots per sender, summed chunk by chunk as contributions arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import queue
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch

from swarmnet.averaging.partition import part_bounds
from swarmnet.averaging.robust import ClipOptions, centered_clip, sum_into
from swarmnet.averaging.wire import (
    CHUNK_ELEMENTS,
    CLOSED_ROUNDS_REMEMBERED,
    HELLO_TIMEOUT,
    MAX_PENDING,
    PENDING_TIMEOUT,
    PROTOCOL_VERSION,
    SLOTS_PER_SENDER,
    STOP_POLL,
    AveragingError,
    Done,
    Handoff,
    HandoffAck,
    Hello,
    Member,
    PartDigest,
    Ping,
    Pong,
    Welcome,
    group_digest,
    hello_transcript,
    recv_exactly,
    recv_into,
    recv_message,
    send_all,
    send_all_blocking,
    send_message,
    send_refusal,
    tensor_view,
    tune,
)
from swarmnet.dht.identity import Identity, verify_signature
from swarmnet.errors import ProtocolError, SwarmnetError
from swarmnet.protocols.direct import DirectEndpoint, DirectOpen
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

__all__ = ["AllReduceServer", "AveragingError", "Member", "RoundResult", "all_reduce", "all_reduce_round"]


class _Stopped(Exception):
    """A worker thread noticed that its round is over (another part of it failed)."""


# --- one round ---------------------------------------------------------------------------------


class _Round:
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
        except _Stopped as e:
            raise AveragingError("the round was stopped") from e
        finally:
            if sock is not None and future.done() and sock.fileno() != -1:
                sock.setblocking(False)

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(STOP_POLL):
            if self.stop.is_set():
                raise _Stopped

    def _take(self, source: queue.SimpleQueue) -> torch.Tensor:
        while True:
            try:
                return source.get(timeout=STOP_POLL)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

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


# --- the server and the call -------------------------------------------------------------------


class AllReduceServer:
    """Accepts other members' connections and hands each to the local round it names."""

    def __init__(self, listener: socket.socket, *, pending_timeout: float):
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self._pending_timeout = pending_timeout
        self._rounds: dict[str, _Round] = {}
        self._closed_rounds: OrderedDict[str, None] = OrderedDict()
        self._changed = asyncio.Event()
        self._pending = 0
        self._closing = False
        self._serving: asyncio.Task | None = None
        self.handoff_target: HandoffTarget | None = None
        """Who takes gradients handed off by leaving stage-mates (the stage being served)."""
        self.direct: DirectEndpoint | None = None
        """The stage and state protocols served on this port (the peer's direct data plane)."""
        self.identity: Identity | None = None
        """The peer's key: with it, rounds sign their hellos and admit only hellos signed by the
        member they claim to be (`wire.Hello.signature`). Every real peer sets it."""

    @classmethod
    async def create(
        cls, host: str = "127.0.0.1", port: int = 0, *, pending_timeout: float = PENDING_TIMEOUT
    ) -> AllReduceServer:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        listener = socket.create_server(address, family=family, backlog=128)
        listener.setblocking(False)
        server = cls(listener, pending_timeout=pending_timeout)
        server._serving = asyncio.create_task(server._serve(), name=f"allreduce-server:{server.port}")
        return server

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops accepting, drops held connections and fails the rounds still running here."""
        if self._closing:
            return
        self._closing = True
        for round_ in self._rounds.values():
            round_.abort("the local all-reduce server was closed")
        self._notify()
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.wait([self._serving])
        self._listener.close()

    def _open(self, round_: _Round) -> None:
        if self._closing:
            raise AveragingError("the all-reduce server is closed")
        if round_.round_id in self._rounds or round_.round_id in self._closed_rounds:
            raise AveragingError(f"round id {round_.round_id!r} was already used on this server")
        self._rounds[round_.round_id] = round_
        self._notify()

    def _release(self, round_id: str) -> None:
        self._rounds.pop(round_id, None)
        self._closed_rounds[round_id] = None
        while len(self._closed_rounds) > CLOSED_ROUNDS_REMEMBERED:
            self._closed_rounds.popitem(last=False)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self._listener)
                except OSError as e:  # e.g. out of file descriptors: back off, keep serving
                    logger.warning("all-reduce server could not accept: %s", e)
                    await asyncio.sleep(0.1)
                    continue
                if self._pending >= MAX_PENDING:
                    conn.close()
                    continue
                tune(conn)
                tg.create_task(self._admit(conn))

    async def _admit(self, conn: socket.socket) -> None:
        self._pending += 1
        handed_over = False
        direct: DirectOpen | None = None
        kind, outcome = "unknown", "ok"
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await recv_message(conn, (Hello, Ping, Handoff, DirectOpen))
            kind = type(hello).__name__
            if isinstance(hello, DirectOpen):
                if self.direct is None:
                    outcome = "refused"
                    async with asyncio.timeout(1.0):
                        await send_refusal(conn, "no direct data plane here")
                else:
                    direct, handed_over = hello, True
            elif isinstance(hello, Ping):
                async with asyncio.timeout(1.0):
                    await send_message(conn, Pong())
            elif isinstance(hello, Handoff):
                await self._take_handoff(conn, hello)
            else:
                round_ = await self._wait_for_round(hello.round_id)
                reason = "unknown or closed round" if round_ is None else round_.admit(hello, conn)
                handed_over = reason is None
                if reason is not None:
                    outcome = "refused"
                    logger.debug("refused a connection for round %r: %s", hello.round_id, reason)
                    async with asyncio.timeout(1.0):
                        await send_refusal(conn, reason)
        except (OSError, EOFError, SwarmnetError) as e:  # TimeoutError is an OSError
            outcome = e.code if isinstance(e, SwarmnetError) else "timeout" if isinstance(e, TimeoutError) else "disconnected"
            logger.debug("dropped an incoming all-reduce connection: %r", e)
        except Exception:  # keep serving whatever one connection did
            outcome = "internal"
            logger.exception("internal error admitting an all-reduce connection")
        finally:
            if direct is None:
                metrics.REQUESTS.labels("averaging", kind, outcome).inc()
            self._pending -= 1
            if not handed_over:
                conn.close()
        if direct is not None and self.direct is not None:
            try:
                await self.direct.accept(conn, direct)  # counted per call by the protocol served
            except Exception:  # one connection's failure must never stop this port's accept loop
                logger.exception("internal error serving a direct connection")
                conn.close()

    async def _take_handoff(self, conn: socket.socket, handoff: Handoff) -> None:
        target = self.handoff_target
        reason = "this peer takes no handoffs now" if target is None else target.check_handoff(handoff)
        if reason is None:
            tensor = torch.empty(handoff.numel, dtype=torch.float32)
            async with asyncio.timeout(HELLO_TIMEOUT + handoff.numel * 4 / 50e6):  # >= 50 MB/s
                await recv_exactly(conn, tensor_view(tensor))
            reason = await target.accept_handoff(handoff, tensor)
        async with asyncio.timeout(HELLO_TIMEOUT):
            await send_message(conn, HandoffAck(accepted=reason is None, reason=reason or ""))

    async def _wait_for_round(self, round_id: str) -> _Round | None:
        try:
            async with asyncio.timeout(self._pending_timeout):
                while round_id not in self._rounds:
                    if round_id in self._closed_rounds or self._closing:
                        return None
                    await self._changed.wait()
        except TimeoutError:
            return None
        return self._rounds[round_id]


class HandoffTarget(Protocol):
    def check_handoff(self, handoff: Handoff) -> str | None:
        """Why the handoff is refused before its data is read (None: accept the data)."""

    async def accept_handoff(self, handoff: Handoff, tensor: torch.Tensor) -> str | None:
        """Takes the handed-off sums; returns why not (None: taken)."""


async def connect(host: str, port: int) -> socket.socket:
    """A tuned, non-blocking TCP connection to a member's all-reduce server (closed on failure)."""
    loop = asyncio.get_running_loop()
    family, kind, proto, _, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    try:
        tune(sock)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def hand_off(host: str, port: int, handoff: Handoff, tensor: torch.Tensor, timeout: float = 30.0) -> str | None:
    """Sends a handoff to a stage-mate's all-reduce server; None if it took it, else why not."""
    try:
        async with asyncio.timeout(timeout):
            with contextlib.closing(await connect(host, port)) as sock:
                await send_message(sock, handoff)
                await send_all(sock, tensor_view(tensor.contiguous()))
                ack = await recv_message(sock, HandoffAck)
        return None if ack.accepted else ack.reason or "refused"
    except (OSError, EOFError, SwarmnetError) as e:  # TimeoutError is an OSError
        return f"{type(e).__name__}: {e}"


async def ping(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Probes a member's all-reduce server: None if it answered, else why not ("refused": the
    process is gone; "silent": frozen, hung or cut off; or the error)."""
    try:
        async with asyncio.timeout(timeout):
            with contextlib.closing(await connect(host, port)) as sock:
                await send_message(sock, Ping())
                await recv_message(sock, Pong)
        return None
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "silent"
    except (OSError, EOFError, SwarmnetError) as e:
        return f"error: {e}"


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """What one member holds after a completed round."""

    total: torch.Tensor
    """The sum (or, with centered clipping, `robust mean × total_weight`), identical on all members."""
    total_weight: float
    outliers: dict[str, float]
    """centered_clip: the members whose contribution to the part *this* member owns was an outlier,
    with its distance to the result in clipping radii (never this member itself). Each owner judges
    only its part: other members may have found others."""


async def all_reduce(
    server: AllReduceServer,
    *,
    round_id: str,
    members: Sequence[Member],
    my_index: int,
    tensor: torch.Tensor,
    weight: float,
    timeout: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Sums `tensor` and `weight` over `members`; returns `(sum, total_weight)`, identical on all.

    Raises `AveragingError` on every member if the round cannot complete for everyone within
    `timeout` seconds. `tensor` (float32, any shape) is never modified. The sum has its shape and
    is a new tensor, or `out` (contiguous CPU float32 of as many elements, apart from `tensor`)
    when given: reusing one spares a fresh allocation per round (on a failure its contents are
    unspecified).
    """
    result = await all_reduce_round(
        server, round_id=round_id, members=members, my_index=my_index, tensor=tensor, weight=weight,
        timeout=timeout, out=out,
    )
    return result.total, result.total_weight


async def all_reduce_round(
    server: AllReduceServer,
    *,
    round_id: str,
    members: Sequence[Member],
    my_index: int,
    tensor: torch.Tensor,
    weight: float,
    timeout: float,
    out: torch.Tensor | None = None,
    robust: ClipOptions | None = None,
    ignore: Collection[str] = (),
) -> RoundResult:
    """`all_reduce`, optionally robust: with `robust`, each part owner aggregates its part by
    centered clipping (every member of the round must pass the same options, as the run manifest
    makes them), gives no weight to the members in `ignore` (peer ids: those it banned), and
    reports the outliers it found (also counted in `swarmnet_averaging_outliers_total`)."""
    members = tuple(members)
    if not 0 <= my_index < len(members):
        raise ValueError(f"my_index {my_index} is outside a group of {len(members)}")
    if len({m.peer_id for m in members}) != len(members):
        raise ValueError("members must have distinct peer ids")
    if tensor.dtype != torch.float32:
        raise ValueError(f"all_reduce sums float32 tensors, got {tensor.dtype}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    if out is None:
        result = torch.empty_like(flat)
    else:
        _check_out(out, flat)
        result = out.view(-1)
    if len(members) == 1:
        result.copy_(flat)
        total = result.view(tensor.shape).to(tensor.device) if out is None else out
        return RoundResult(total=total, total_weight=float(weight), outliers={})
    ignored = frozenset(k for k, m in enumerate(members) if m.peer_id in ignore)
    round_ = _Round(round_id, members, my_index, flat, float(weight), result, robust, ignored, server.identity)
    server._open(round_)
    try:
        async with asyncio.timeout(timeout):
            await round_.run()
    except TimeoutError as e:
        raise AveragingError(f"round {round_id!r} did not complete within {timeout} s") from e
    except BaseExceptionGroup as group:
        failures, bugs = group.split((AveragingError, OSError, EOFError, SwarmnetError))
        if bugs is not None or failures is None:
            raise
        first = failures
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise AveragingError(f"round {round_id!r} failed on member {my_index}: {first}") from group
    finally:
        server._release(round_id)
        round_.close()
    outliers = {}
    if robust is not None:
        for k, ratio in enumerate(round_.ratios):
            if k != my_index and ratio > robust.outlier_ratio:
                outliers[members[k].peer_id] = ratio
                metrics.AVERAGING_OUTLIERS.labels(peer=members[k].peer_id).inc()
    total = out if out is not None else round_.out.view(tensor.shape).to(tensor.device)
    return RoundResult(total=total, total_weight=round_.total_weight, outliers=outliers)


def _check_out(out: torch.Tensor, flat: torch.Tensor) -> None:
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("out must be a contiguous CPU float32 tensor")
    if out.numel() != flat.numel():
        raise ValueError(f"out has {out.numel()} elements, the tensor {flat.numel()}")
    nbytes = flat.numel() * 4
    if nbytes and out.data_ptr() < flat.data_ptr() + nbytes and flat.data_ptr() < out.data_ptr() + nbytes:
        raise ValueError("out must not share memory with the tensor")
