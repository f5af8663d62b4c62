"""Stage protocol `/swarmnet/stage/1`: forward and backward of one microbatch through one stage.

One call = one libp2p stream: the client sends a request message and its tensors as chunks, the
server answers with a reply message and its tensors, or with a typed error frame.

- `ForwardRequest(input)` → `ForwardReply(output)`: the server caches the input for the backward.
- `ForwardRequest(input, targets)` to the last stage → `ForwardReply(loss, grad_input)`: the last
  stage computes the loss and its backward at once (nothing to cache).
- `BackwardRequest(grad_output)` → `BackwardReply(grad_input)`: the server recomputes the forward of
  the cached input with grad, back-propagates and accumulates parameter gradients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from hivemind.p2p import P2P

from swarmnet.protocols import access
from swarmnet.protocols.dial import PeerDialer
from swarmnet.protocols.direct import DirectClient, DirectEndpoint
from swarmnet.protocols.framing import (
    MAX_TENSOR_BYTES,
    FramedStream,
    TensorHeader,
    header_for,
    serve_stream,
)
from swarmnet.protocols.links import LinkEstimate, choose_compression

logger = logging.getLogger(__name__)

PROTOCOL = "/swarmnet/stage/1"
REQUEST_READ_TIMEOUT = 60.0


@dataclass(frozen=True, kw_only=True)
class _Ordered:
    """The order fields of both requests (gradient calls only; see `swarmnet.peer.ordering`)."""

    order_key: str = field(default="", metadata={"omit_if_default": True})
    """The trainer's ordering key (its session) for `seq` and `after`; the three fields are left
    out when unused (the compatibility rule in `protocols/codec.py`)."""
    seq: int = field(default=-1, metadata={"omit_if_default": True})
    """This call's place in the trainer's gradient-call order (see `swarmnet.peer.ordering`)."""
    after: int = field(default=-1, metadata={"omit_if_default": True})
    """The call the trainer sent to this peer before this one: applied first (-1: none)."""


@dataclass(frozen=True, kw_only=True)
class ForwardRequest(_Ordered):
    run_id: str
    microbatch_id: str
    stage: int
    input: TensorHeader
    targets: TensorHeader | None = None
    """Only for the last stage: compute the loss and its backward in this call."""
    reply_compression: str = "none"


@dataclass(frozen=True, kw_only=True)
class ForwardReply:
    output: TensorHeader | None
    grad_input: TensorHeader | None
    loss: float | None
    step: int


@dataclass(frozen=True, kw_only=True)
class BackwardRequest(_Ordered):
    run_id: str
    microbatch_id: str
    stage: int
    grad_output: TensorHeader
    reply_compression: str = "none"


@dataclass(frozen=True, kw_only=True)
class BackwardReply:
    grad_input: TensorHeader | None
    step: int


@dataclass(frozen=True)
class ForwardResult:
    output: torch.Tensor | None
    grad_input: torch.Tensor | None
    loss: float | None
    step: int


class StageBackend(Protocol):
    """What the servicer needs from a peer: validation and compute, raising typed errors."""

    def check_forward(self, request: ForwardRequest, client: str = "") -> None: ...

    def check_backward(self, request: BackwardRequest, client: str = "") -> None: ...

    async def forward(
        self, client: str, request: ForwardRequest, x: torch.Tensor, targets: torch.Tensor | None
    ) -> ForwardResult: ...

    async def backward(
        self, client: str, request: BackwardRequest, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]: ...


class StageServicer:
    """Serves forward/backward for one `StageBackend` on a P2P host."""

    def __init__(self, backend: StageBackend):
        self.backend = backend

    async def register(self, p2p: P2P) -> None:
        # Behind the access check of private runs (the direct plane checks in its handshake).
        await access.add_stream_handler(p2p, PROTOCOL, self._handle, what="stage")

    async def unregister(self, p2p: P2P) -> None:
        await p2p.remove_binary_stream_handler(PROTOCOL)

    def register_direct(self, endpoint: DirectEndpoint) -> None:
        endpoint.add(PROTOCOL, FramedStream, self._serve, what="stage")

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = str(info.peer_id)
        stream = FramedStream(reader, writer, peer=client)
        await serve_stream(stream, lambda: self._serve(client, stream), what="stage")

    async def _serve(self, client: str, stream: FramedStream) -> None:
        async with asyncio.timeout(REQUEST_READ_TIMEOUT):
            request = await stream.receive_message(ForwardRequest, BackwardRequest)
            if isinstance(request, ForwardRequest):
                self.backend.check_forward(request, client)
                x = await stream.receive_tensor(request.input)
                targets = await stream.receive_tensor(request.targets) if request.targets else None
            else:
                self.backend.check_backward(request, client)
                grad_output = await stream.receive_tensor(request.grad_output)
        if isinstance(request, ForwardRequest):
            result = await self.backend.forward(client, request, x, targets)
            out = _header(result.output, request.reply_compression)
            grad = _header(result.grad_input, request.reply_compression)
            await stream.send_message(ForwardReply(output=out, grad_input=grad, loss=result.loss, step=result.step))
            await _send(stream, result.output, out)
            await _send(stream, result.grad_input, grad)
        else:
            grad_input, step = await self.backend.backward(client, request, grad_output)
            grad = _header(grad_input, request.reply_compression)
            await stream.send_message(BackwardReply(grad_input=grad, step=step))
            await _send(stream, grad_input, grad)


class StageStub:
    """Client side of the stage protocol for one remote peer."""

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        maddrs: list[str],
        *,
        compression: str = "none",
        max_reply_bytes: int = MAX_TENSOR_BYTES,
        data_addr: str | None = None,
        direct: DirectClient | None = None,
        auto_thresholds: tuple[float, float] = (2000.0, 400.0),
    ):
        self.p2p = p2p
        self.max_reply_bytes = max_reply_bytes
        self.peer_id = peer_id
        self.maddrs = maddrs
        self.data_addr = data_addr
        self.compression = compression
        """`none`, `fp16`, `int8`, or `auto`: chosen per call from `link`'s measured bandwidth
        with `auto_thresholds` (Mbit/s below which fp16, then int8, are used)."""
        self.auto_thresholds = auto_thresholds
        self.link = LinkEstimate()
        self.dialer = PeerDialer(p2p, peer_id, maddrs, data_addr=data_addr, direct=direct)

    async def forward(
        self,
        run_id: str,
        microbatch_id: str,
        stage: int,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        order: CallTicket | None = None,
    ) -> ForwardResult:
        compression = self._compression()
        header = header_for(x, compression)
        request = ForwardRequest(
            run_id=run_id,
            microbatch_id=microbatch_id,
            stage=stage,
            input=header,
            targets=header_for(targets) if targets is not None else None,
            reply_compression=compression,
            **_order_fields(order),
        )
        stream = await self._open()
        try:
            with _refusal_is_read_below():
                await stream.send_message(request)
                await stream.send_tensor(x, header)
                if targets is not None:
                    await stream.send_tensor(targets, request.targets)
            _sent(order)
            reply = await stream.receive_message(ForwardReply)
            started = time.perf_counter()
            output = await stream.receive_tensor(reply.output, self.max_reply_bytes) if reply.output else None
            grad = await stream.receive_tensor(reply.grad_input, self.max_reply_bytes) if reply.grad_input else None
            stream.completed()
            self._measured(started, reply.output, reply.grad_input)
            return ForwardResult(output=output, grad_input=grad, loss=reply.loss, step=reply.step)
        finally:
            await stream.close()

    async def backward(
        self,
        run_id: str,
        microbatch_id: str,
        stage: int,
        grad_output: torch.Tensor,
        *,
        order: CallTicket | None = None,
    ) -> torch.Tensor | None:
        compression = self._compression()
        header = header_for(grad_output, compression)
        request = BackwardRequest(
            run_id=run_id,
            microbatch_id=microbatch_id,
            stage=stage,
            grad_output=header,
            reply_compression=compression,
            **_order_fields(order),
        )
        stream = await self._open()
        try:
            with _refusal_is_read_below():
                await stream.send_message(request)
                await stream.send_tensor(grad_output, header)
            _sent(order)
            reply = await stream.receive_message(BackwardReply)
            started = time.perf_counter()
            grad = await stream.receive_tensor(reply.grad_input, self.max_reply_bytes) if reply.grad_input else None
            stream.completed()
            self._measured(started, reply.grad_input)
            return grad
        finally:
            await stream.close()

    async def _open(self) -> FramedStream:
        return await self.dialer.open(PROTOCOL)

    def _compression(self) -> str:
        fp16_below, int8_below = self.auto_thresholds
        return choose_compression(self.compression, self.link.mbps, fp16_below=fp16_below, int8_below=int8_below)

    def _measured(self, started: float, *headers: TensorHeader | None) -> None:
        self.link.observe(sum(h.nbytes for h in headers if h is not None), time.perf_counter() - started)


@dataclass
class CallTicket:
    """A gradient call's place in its trainer's order (see `swarmnet.peer.ordering`): `sent` is
    called once the request and its tensors are written, so the next call may go."""

    key: str
    seq: int
    after: int
    sent: Callable[[], None] | None = None


def _order_fields(order: CallTicket | None) -> dict:
    return {} if order is None else {"order_key": order.key, "seq": order.seq, "after": order.after}


def _sent(order: CallTicket | None) -> None:
    if order is not None and order.sent is not None:
        order.sent()


@contextlib.contextmanager
def _refusal_is_read_below():
    """A server refuses a bad request from its header and closes the stream while we still send
    tensor chunks: stop sending and read its typed error reply instead of failing on the write."""
    try:
        yield
    except (ConnectionError, BrokenPipeError) as e:
        logger.debug("server closed the stream while we were sending: %s", e)


def _header(tensor: torch.Tensor | None, compression: str) -> TensorHeader | None:
    return header_for(tensor, compression) if tensor is not None else None


async def _send(stream: FramedStream, tensor: torch.Tensor | None, header: TensorHeader | None) -> None:
    if tensor is not None and header is not None:
        await stream.send_tensor(tensor, header)
