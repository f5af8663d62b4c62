"""Frames and chunked tensors over one byte stream: a libp2p stream through p2pd (hivemind's
binary stream handlers, `StreamIO`) or a direct TCP connection of the data plane (`SocketIO`, see
`direct.py`). The frames are the same on both.

A frame is `type (1 byte) | length (4 bytes, big-endian) | payload`:

- `MESSAGE`: msgpack `[name, body]` of a typed message, at most `MAX_MESSAGE_BYTES`;
- `CHUNK`: raw tensor bytes, at most `MAX_FRAME_BYTES` (4 MiB, the size where libp2p unary calls
  stop working), so any tensor streams as a sequence of chunks;
- `ERROR`: msgpack `[code, message]`, a typed error reply (see `swarmnet.errors`).

A message that announces tensors carries a `TensorHeader` per tensor; the receiver checks each header
against what it expects *before* reading any chunk, so an oversized or mistyped tensor is refused
without being buffered. How a tensor's bytes are encoded (none, fp16, int8) is `compression.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import msgpack
import torch

from swarmnet.errors import PeerUnavailableError, ProtocolError, SwarmnetError, error_from_code
from swarmnet.protocols import compression as compression_codec
from swarmnet.protocols.codec import from_body, to_body
from swarmnet.protocols.compression import COMPRESSIONS
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

MESSAGE, CHUNK, ERROR = 1, 2, 3
MAX_MESSAGE_BYTES = 64 * 1024
MAX_FRAME_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_TENSOR_BYTES = 1 << 31
"""Absolute ceiling of one tensor; receivers also pass their own, usually far smaller, bound."""
_HEADER = 5

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, kw_only=True)
class TensorHeader:
    """Describes one tensor that follows as chunks: logical dtype and shape, and how it travels."""

    dtype: str
    shape: list[int]
    compression: str = "none"

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return compression_codec.wire_nbytes(math.prod(self.shape), DTYPES[self.dtype], self.compression)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ProtocolError(f"unsupported dtype {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ProtocolError(f"unsupported compression {self.compression!r}")
        if self.compression != "none" and not DTYPES[self.dtype].is_floating_point:
            raise ProtocolError(f"{self.compression} compression applies to floating-point tensors only")
        if len(self.shape) > 8 or any(d < 0 for d in self.shape):
            raise ProtocolError(f"invalid tensor shape {self.shape}")
        if self.nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor of {self.nbytes} bytes exceeds {MAX_TENSOR_BYTES}")


def header_for(tensor: torch.Tensor, compression: str = "none") -> TensorHeader:
    if tensor.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"cannot send dtype {tensor.dtype}")
    if not tensor.dtype.is_floating_point:
        compression = "none"
    return TensorHeader(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), compression=compression)


class StreamIO:
    """Bytes over an asyncio (reader, writer) pair: a libp2p stream through p2pd."""

    chunk_bytes = CHUNK_BYTES
    transport = "p2p"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def read_exactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def read_into(self, view: memoryview) -> None:
        view[:] = await self.reader.readexactly(len(view))

    async def read_some(self, n: int) -> bytes:
        return await self.reader.read(n)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class SocketIO:
    """Bytes over a raw non-blocking TCP socket (the direct data plane): sends hand the caller's
    buffers to the kernel and receives fill the caller's buffer, with no copy in between, and
    frames may be as large as `MAX_FRAME_BYTES`."""

    chunk_bytes = MAX_FRAME_BYTES
    transport = "direct"

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._out: list[bytes | memoryview] = []
        self._pushed_back = b""

    def write(self, data: bytes | memoryview) -> None:
        self._out.append(data)

    async def drain(self) -> None:
        out, self._out = self._out, []
        loop = asyncio.get_running_loop()
        small = b"".join(bytes(d) for d in out) if sum(len(d) for d in out) <= 64 * 1024 else None
        for data in [small] if small is not None else out:
            await loop.sock_sendall(self.sock, data)

    @property
    def buffered(self) -> bool:
        """Whether bytes are waiting on either side of this object (a connection in that state
        cannot carry another call)."""
        return bool(self._out or self._pushed_back)

    def push_back(self, data: bytes) -> None:
        """Bytes already read (e.g. while waiting for the next request) that reads return first."""
        self._pushed_back = data + self._pushed_back

    async def read_exactly(self, n: int) -> bytes:
        buffer = bytearray(n)
        await self.read_into(memoryview(buffer))
        return bytes(buffer)

    async def read_into(self, view: memoryview) -> None:
        got = min(len(view), len(self._pushed_back))
        if got:
            view[:got] = self._pushed_back[:got]
            self._pushed_back = self._pushed_back[got:]
        loop = asyncio.get_running_loop()
        while got < len(view):
            count = await loop.sock_recv_into(self.sock, view[got:])
            if not count:
                raise asyncio.IncompleteReadError(bytes(view[:got]), len(view))
            got += count

    async def read_some(self, n: int) -> bytes:
        if self._pushed_back:
            data, self._pushed_back = self._pushed_back[:n], self._pushed_back[n:]
            return data
        return await asyncio.get_running_loop().sock_recv(self.sock, n)

    async def close(self) -> None:
        self.sock.close()


class FramedStream:
    """Typed messages, tensors and errors over one byte stream: a libp2p stream through p2pd
    (`FramedStream(reader, writer)`) or a direct TCP connection (`FramedStream.over(SocketIO)`)."""

    protocol = "stage"
    """The protocol's name in metrics (`swarmnet_transferred_bytes_total`, `swarmnet_requests_total`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
        *,
        peer: str | None = None,
        io: StreamIO | SocketIO | None = None,
    ):
        self.io = io if io is not None else StreamIO(reader, writer)
        self.peer = peer
        self.kind: str | None = None
        """The type of the first message received (on a server: the request's kind)."""
        self.on_close: Callable[[FramedStream, bool], Awaitable[None]] | None = None
        """Set by a connection pool: called by `close` instead of closing the transport, with
        whether the call `completed` cleanly (then the connection may carry another call)."""
        self.serving = False
        """Server side (set by `serve_request`): an error frame from the client is a protocol
        violation, not an error of ours to report back with the client's chosen code."""
        self._completed = False
        self._sent = metrics.TRANSFERRED_BYTES.labels(self.protocol, "sent")
        self._received = metrics.TRANSFERRED_BYTES.labels(self.protocol, "received")

    @classmethod
    def over(cls, io: StreamIO | SocketIO, *, peer: str | None = None) -> Self:
        return cls(io=io, peer=peer)

    @property
    def transport(self) -> str:
        return self.io.transport

    # --- writing -------------------------------------------------------------------------------

    def _frame(self, kind: int, payload: bytes | memoryview) -> None:
        self.io.write(bytes([kind]) + len(payload).to_bytes(4, "big"))
        self.io.write(payload)
        self._sent.inc(_HEADER + len(payload))

    async def send_message(self, message: Any) -> None:
        payload = msgpack.packb([type(message).__name__, to_body(message)], use_bin_type=True)
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message {type(message).__name__} is {len(payload)} bytes")
        self._frame(MESSAGE, payload)
        await self.io.drain()

    async def send_tensor(self, tensor: torch.Tensor, header: TensorHeader) -> None:
        data = await _encode(tensor.detach(), header.compression)
        await self.send_raw(memoryview(data.numpy()))

    async def send_raw(self, view: memoryview) -> None:
        """Bytes as CHUNK frames of the transport's chunk size."""
        step = self.io.chunk_bytes
        for offset in range(0, len(view), step):
            self._frame(CHUNK, view[offset : offset + step])
            await self.io.drain()

    async def send_error(self, error: BaseException) -> None:
        code = error.code if isinstance(error, SwarmnetError) else "internal"
        message = str(error) if isinstance(error, SwarmnetError) else f"internal error: {type(error).__name__}"
        self._frame(ERROR, msgpack.packb([code, message[:4000]], use_bin_type=True))
        await self.io.drain()

    # --- reading -------------------------------------------------------------------------------

    async def _read_head(self) -> tuple[int, int]:
        """Type and length of the next frame, checked against the limits before its payload is read."""
        try:
            head = await self.io.read_exactly(_HEADER)
        except asyncio.IncompleteReadError as e:
            raise ProtocolError("stream closed before a frame arrived") from e
        except ConnectionError as e:
            raise PeerUnavailableError(f"connection lost: {e}", peer=self.peer) from e
        kind, length = head[0], int.from_bytes(head[1:], "big")
        limit = MAX_FRAME_BYTES if kind == CHUNK else MAX_MESSAGE_BYTES
        if kind not in (MESSAGE, CHUNK, ERROR):
            raise ProtocolError(f"unknown frame type {kind}")
        if length > limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
        return kind, length

    async def _read_payload_into(self, view: memoryview) -> None:
        try:
            await self.io.read_into(view)
        except asyncio.IncompleteReadError as e:
            raise ProtocolError("stream closed inside a frame") from e
        except ConnectionError as e:
            raise PeerUnavailableError(f"connection lost: {e}", peer=self.peer) from e
        self._received.inc(_HEADER + len(view))

    async def _read_frame(self) -> tuple[int, bytes]:
        kind, length = await self._read_head()
        payload = bytearray(length)
        await self._read_payload_into(memoryview(payload))
        return kind, bytes(payload)

    async def receive_message(self, *expected: type) -> Any:
        """Reads one message of one of the `expected` types; raises the typed error on an ERROR frame."""
        kind, payload = await self._read_frame()
        if kind == ERROR:
            raise self._error_from(payload)
        if kind != MESSAGE:
            raise ProtocolError("expected a message frame")
        try:
            name, body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated exception types
            raise ProtocolError(f"malformed message: {e}") from e
        if self.kind is None and isinstance(name, str):
            self.kind = name if any(cls.__name__ == name for cls in expected) else "unknown"
        for cls in expected:
            if cls.__name__ == name:
                return from_body(cls, body, ProtocolError)
        raise ProtocolError(f"unexpected message {name!r}, expected {[c.__name__ for c in expected]}")

    def _error_from(self, payload: bytes) -> SwarmnetError:
        """The typed error an ERROR frame carries; on a server, a `ProtocolError` instead."""
        if self.serving:
            return ProtocolError("the client sent an error frame instead of its request")
        return decode_error(payload, self.peer)

    async def receive_raw(self, buffer: memoryview) -> None:
        """Fills `buffer` from CHUNK frames (straight into it: no intermediate copy on a direct
        connection); raises the typed error if the peer sends an error frame instead."""
        received = 0
        while received < len(buffer):
            kind, length = await self._read_head()
            if kind == ERROR:
                payload = bytearray(length)
                await self._read_payload_into(memoryview(payload))
                raise self._error_from(bytes(payload))
            if kind != CHUNK:
                raise ProtocolError("expected a data chunk")
            if received + length > len(buffer):
                raise ProtocolError("data chunks exceed the announced size")
            await self._read_payload_into(buffer[received : received + length])
            received += length

    async def receive_tensor(self, header: TensorHeader, max_bytes: int = MAX_TENSOR_BYTES) -> torch.Tensor:
        """Reads the chunks of a tensor whose header the caller has already validated."""
        header.check()
        if header.nbytes > max_bytes:
            raise ProtocolError(f"tensor of {header.nbytes} bytes exceeds the expected {max_bytes}")
        data = torch.empty(header.nbytes, dtype=torch.uint8)
        if header.nbytes:
            await self.receive_raw(memoryview(data.numpy()))
        return await _decode(data, header)

    def completed(self) -> None:
        """Client side: the call's exchange ended cleanly, so a pooled connection may be reused."""
        self._completed = True

    async def finish(self, *, timeout: float = 5.0, limit: int = 64 * 1024 * 1024) -> None:
        """Server side, after the last reply frame: wait until the client closes the stream,
        discarding whatever it still sends (bounded in time and bytes). Closing first, or
        half-closing (p2pd turns a half-close into a full close of the libp2p stream), lets the
        stream be reset while the client is still writing, and a reset drops our reply."""
        discarded = 0
        async with asyncio.timeout(timeout):
            while discarded < limit:
                data = await self.io.read_some(CHUNK_BYTES)
                if not data:
                    return
                discarded += len(data)

    async def close(self) -> None:
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            await on_close(self, self._completed)
            return
        await self.io.close()


_OFF_LOOP_BYTES = 4 * 1024 * 1024
"""Tensors at least this large are encoded and decoded in a worker thread (torch releases the GIL),
so compressing a large activation does not stall the event loop."""


async def _encode(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    try:
        if compression == "none" or tensor.numel() * tensor.element_size() < _OFF_LOOP_BYTES:
            return compression_codec.encode(tensor, compression)
        return await asyncio.to_thread(compression_codec.encode, tensor, compression)
    except ValueError as e:
        raise ProtocolError(str(e)) from e


async def _decode(data: torch.Tensor, header: TensorHeader) -> torch.Tensor:
    dtype = DTYPES[header.dtype]
    try:
        if header.compression == "none" or len(data) < _OFF_LOOP_BYTES:
            return compression_codec.decode(data, header.shape, dtype, header.compression)
        return await asyncio.to_thread(compression_codec.decode, data, header.shape, dtype, header.compression)
    except ValueError as e:
        raise ProtocolError(str(e)) from e


def decode_error(payload: bytes, peer: str | None) -> SwarmnetError:
    try:
        code, message = msgpack.unpackb(payload, raw=False)
        return error_from_code(str(code), str(message), peer)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        return ProtocolError(f"malformed error reply from {peer}: {e}")


async def serve_request(stream: FramedStream, serve: Callable[[], Awaitable[None]], *, what: str) -> str:
    """Runs one server-side request on `stream`: a typed error reply for whatever `serve` raises
    (the handler keeps serving other streams), counted in metrics. Returns the outcome ("ok", an
    error code, "disconnected", "timeout" or "internal")."""
    client = stream.peer
    started = time.perf_counter()
    outcome = "ok"
    stream.serving = True
    try:
        await serve()
    except SwarmnetError as e:
        outcome = e.code
        logger.debug("refused %s request from %s: %s", what, client, e)
        await quietly(stream.send_error(e))
    except (ConnectionError, asyncio.IncompleteReadError):
        outcome = "disconnected"
        logger.debug("%s client %s went away", what, client)
    except TimeoutError:
        outcome = "timeout"
        logger.debug("%s request from %s timed out", what, client)
        await quietly(stream.send_error(PeerUnavailableError("timed out serving the request")))
    except Exception as e:  # keep serving whatever one request did; log it with its traceback
        outcome = "internal"
        logger.exception("internal error serving a %s request from %s", what, client)
        await quietly(stream.send_error(e))
    finally:
        kind = stream.kind or "unknown"
        metrics.REQUESTS.labels(what, kind, outcome).inc()
        if outcome == "ok":
            metrics.REQUEST_SECONDS.labels(what, kind).observe(time.perf_counter() - started)
    return outcome


async def serve_stream(stream: FramedStream, serve: Callable[[], Awaitable[None]], *, what: str) -> None:
    """One request on its own stream (libp2p): `serve_request`, then the graceful end every
    server must follow."""
    try:
        await serve_request(stream, serve, what=what)
    finally:
        await quietly(stream.finish())
        await quietly(stream.close())


async def quietly(coro: Awaitable[object]) -> None:
    """Awaits a best-effort stream operation whose failure changes nothing (the peer is gone)."""
    try:
        await coro
    except (ConnectionError, OSError, ProtocolError, RuntimeError, TimeoutError):
        pass
