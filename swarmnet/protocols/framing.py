"""Frames and chunked tensors over one libp2p stream (hivemind's binary stream handlers).

A frame is `type (1 byte) | length (4 bytes, big-endian) | payload`:

- `MESSAGE`: msgpack `[name, body]` of a typed message, at most `MAX_MESSAGE_BYTES`;
- `CHUNK`: raw tensor bytes, at most `MAX_FRAME_BYTES` (4 MiB, the size where libp2p unary calls
  stop working), so any tensor streams as a sequence of chunks;
- `ERROR`: msgpack `[code, message]`, a typed error reply (see `swarmnet.errors`).

A message that announces tensors carries a `TensorHeader` per tensor; the receiver checks each header
against what it expects *before* reading any chunk, so an oversized or mistyped tensor is refused
without being buffered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from swarmnet.errors import PeerUnavailableError, ProtocolError, SwarmnetError, error_from_code
from swarmnet.protocols.codec import from_body, to_body
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
COMPRESSIONS = ("none", "fp16")


@dataclass(frozen=True, kw_only=True)
class TensorHeader:
    """Describes one tensor that follows as chunks: logical dtype and shape, and how it travels."""

    dtype: str
    shape: list[int]
    compression: str = "none"

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float16 if self.compression == "fp16" else DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.wire_dtype.itemsize

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ProtocolError(f"unsupported dtype {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ProtocolError(f"unsupported compression {self.compression!r}")
        if self.compression == "fp16" and not DTYPES[self.dtype].is_floating_point:
            raise ProtocolError("fp16 compression applies to floating-point tensors only")
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


class FramedStream:
    """Typed messages, tensors and errors over one asyncio (reader, writer) pair."""

    protocol = "stage"
    """The protocol's name in metrics (`swarmnet_transferred_bytes_total`, `swarmnet_requests_total`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer: str | None = None):
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.kind: str | None = None
        """The type of the first message received (on a server: the request's kind)."""
        self._sent = metrics.TRANSFERRED_BYTES.labels(self.protocol, "sent")
        self._received = metrics.TRANSFERRED_BYTES.labels(self.protocol, "received")

    # --- writing -------------------------------------------------------------------------------

    def _frame(self, kind: int, payload: bytes | memoryview) -> None:
        self.writer.write(bytes([kind]) + len(payload).to_bytes(4, "big"))
        self.writer.write(payload)
        self._sent.inc(_HEADER + len(payload))

    async def send_message(self, message: Any) -> None:
        payload = msgpack.packb([type(message).__name__, to_body(message)], use_bin_type=True)
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message {type(message).__name__} is {len(payload)} bytes")
        self._frame(MESSAGE, payload)
        await self.writer.drain()

    async def send_tensor(self, tensor: torch.Tensor, header: TensorHeader) -> None:
        data = tensor.detach().to("cpu", header.wire_dtype).contiguous().view(-1).view(torch.uint8)
        view = memoryview(data.numpy())
        for offset in range(0, len(view), CHUNK_BYTES):
            self._frame(CHUNK, view[offset : offset + CHUNK_BYTES])
            await self.writer.drain()

    async def send_error(self, error: BaseException) -> None:
        code = error.code if isinstance(error, SwarmnetError) else "internal"
        message = str(error) if isinstance(error, SwarmnetError) else f"internal error: {type(error).__name__}"
        self._frame(ERROR, msgpack.packb([code, message[:4000]], use_bin_type=True))
        await self.writer.drain()

    # --- reading -------------------------------------------------------------------------------

    async def _read_frame(self) -> tuple[int, bytes]:
        try:
            head = await self.reader.readexactly(_HEADER)
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
        try:
            payload = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise ProtocolError("stream closed inside a frame") from e
        except ConnectionError as e:
            raise PeerUnavailableError(f"connection lost: {e}", peer=self.peer) from e
        self._received.inc(_HEADER + length)
        return kind, payload

    async def receive_message(self, *expected: type) -> Any:
        """Reads one message of one of the `expected` types; raises the typed error on an ERROR frame."""
        kind, payload = await self._read_frame()
        if kind == ERROR:
            raise decode_error(payload, self.peer)
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

    async def receive_tensor(self, header: TensorHeader, max_bytes: int = MAX_TENSOR_BYTES) -> torch.Tensor:
        """Reads the chunks of a tensor whose header the caller has already validated."""
        header.check()
        if header.nbytes > max_bytes:
            raise ProtocolError(f"tensor of {header.nbytes} bytes exceeds the expected {max_bytes}")
        buffer = bytearray(header.nbytes)
        received = 0
        while received < len(buffer):
            kind, payload = await self._read_frame()
            if kind == ERROR:
                raise decode_error(payload, self.peer)
            if kind != CHUNK:
                raise ProtocolError("expected a tensor chunk")
            if received + len(payload) > len(buffer):
                raise ProtocolError("tensor chunks exceed the announced size")
            buffer[received : received + len(payload)] = payload
            received += len(payload)
        if not buffer:
            return torch.empty(header.shape, dtype=DTYPES[header.dtype])
        tensor = torch.frombuffer(buffer, dtype=header.wire_dtype).reshape(header.shape)
        return tensor.to(DTYPES[header.dtype])

    async def finish(self, *, timeout: float = 5.0, limit: int = 64 * 1024 * 1024) -> None:
        """Server side, after the last reply frame: wait until the client closes the stream,
        discarding whatever it still sends (bounded in time and bytes). Closing first, or
        half-closing (p2pd turns a half-close into a full close of the libp2p stream), lets the
        stream be reset while the client is still writing, and a reset drops our reply."""
        discarded = 0
        async with asyncio.timeout(timeout):
            while discarded < limit:
                data = await self.reader.read(CHUNK_BYTES)
                if not data:
                    return
                discarded += len(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def decode_error(payload: bytes, peer: str | None) -> SwarmnetError:
    try:
        code, message = msgpack.unpackb(payload, raw=False)
        return error_from_code(str(code), str(message), peer)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        return ProtocolError(f"malformed error reply from {peer}: {e}")


async def serve_stream(stream: FramedStream, serve: Callable[[], Awaitable[None]], *, what: str) -> None:
    """Runs one server-side request on `stream`: a typed error reply for whatever `serve` raises
    (the handler keeps serving other streams), then the graceful end every server must follow."""
    client = stream.peer
    started = time.perf_counter()
    outcome = "ok"
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
        await quietly(stream.finish())
        await quietly(stream.close())


async def quietly(coro: Awaitable[object]) -> None:
    """Awaits a best-effort stream operation whose failure changes nothing (the peer is gone)."""
    try:
        await coro
    except (ConnectionError, OSError, ProtocolError, RuntimeError, TimeoutError):
        pass
