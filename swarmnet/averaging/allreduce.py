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
import logging
import math
import socket
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

import torch

from swarmnet.averaging.robust import ClipOptions
from swarmnet.averaging.rounds import Round
from swarmnet.averaging.wire import (
    CLOSED_ROUNDS_REMEMBERED,
    HELLO_TIMEOUT,
    MAX_PENDING,
    PENDING_TIMEOUT,
    AveragingError,
    Handoff,
    HandoffAck,
    Hello,
    Member,
    Ping,
    Pong,
    connect,
    recv_exactly,
    recv_message,
    send_all,
    send_message,
    send_refusal,
    tensor_view,
    tune,
)
from swarmnet.dht.identity import Identity
from swarmnet.errors import SwarmnetError
from swarmnet.protocols.direct import DirectEndpoint, DirectOpen
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

__all__ = ["AllReduceServer", "AveragingError", "Member", "RoundResult", "all_reduce", "all_reduce_round"]


# --- the server and the call -------------------------------------------------------------------


class AllReduceServer:
    """Accepts other members' connections and hands each to the local round it names."""

    def __init__(self, listener: socket.socket, *, pending_timeout: float):
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self._pending_timeout = pending_timeout
        self._rounds: dict[str, Round] = {}
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

    def _open(self, round_: Round) -> None:
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

    async def _wait_for_round(self, round_id: str) -> Round | None:
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
    round_ = Round(round_id, members, my_index, flat, float(weight), result, robust, ignored, server.identity)
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
