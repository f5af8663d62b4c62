"""In-memory byte streams: drive a servicer's stream handler with bytes, no p2pd and no socket.

A libp2p stream handler receives an `asyncio.StreamReader` and an `asyncio.StreamWriter`
(`FramedStream(reader, writer)`). `feed(data)` gives a reader that yields `data` and then end of
stream (a client that sent its request and half-closed), and `MemoryWriter` collects what the
handler answers; `frames(answer)` cuts the answer into the frames of `swarmnet.protocols.framing`.
Create readers inside a running event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgpack

from swarmnet.protocols.codec import to_body
from swarmnet.protocols.framing import CHUNK, ERROR, MESSAGE

HEADER_BYTES = 5
"""Frame header: type (1 byte) and payload length (4 bytes, big-endian)."""


class MemoryWriter:
    """The part of `asyncio.StreamWriter` that `framing.StreamIO` uses, collecting bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        if self.closed:
            raise ConnectionResetError("write to a closed stream")
        self.data += data

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("drain of a closed stream")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def feed(data: bytes) -> asyncio.StreamReader:
    """A reader that yields `data`, then end of stream."""
    reader = asyncio.StreamReader(limit=2**24)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@dataclass(frozen=True)
class PeerInfo:
    """Stands for hivemind's `StreamInfo`: stream handlers read only `info.peer_id`."""

    peer_id: str


def frame(kind: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One frame: `type | length (4 bytes, big-endian) | payload`."""
    return bytes([kind]) + len(payload).to_bytes(4, "big") + bytes(payload)


def message_frame(message: object) -> bytes:
    """The MESSAGE frame `FramedStream.send_message` writes for a typed message."""
    return frame(MESSAGE, msgpack.packb([type(message).__name__, to_body(message)], use_bin_type=True))


def chunk_frames(data: bytes, chunk: int = 1 << 20) -> bytes:
    """`data` as CHUNK frames of at most `chunk` bytes."""
    return b"".join(frame(CHUNK, data[i : i + chunk]) for i in range(0, len(data), chunk))


def frames(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    """Cuts bytes written by a `FramedStream` into `(type, payload)` frames; ValueError unless the
    bytes are whole frames of known types."""
    out, offset = [], 0
    while offset < len(data):
        if len(data) - offset < HEADER_BYTES:
            raise ValueError(f"{len(data) - offset} trailing bytes are not a frame")
        kind, length = data[offset], int.from_bytes(data[offset + 1 : offset + HEADER_BYTES], "big")
        if kind not in (MESSAGE, CHUNK, ERROR):
            raise ValueError(f"unknown frame type {kind}")
        payload = bytes(data[offset + HEADER_BYTES : offset + HEADER_BYTES + length])
        if len(payload) != length:
            raise ValueError("truncated frame")
        out.append((kind, payload))
        offset += HEADER_BYTES + length
    return out
