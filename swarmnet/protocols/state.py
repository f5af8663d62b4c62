"""State protocol `/swarmnet/state/1`: a stage's state, downloaded in byte ranges from its peers.

One call = one libp2p stream; the client sends one request message, the server answers with one
reply message followed by raw CHUNK frames, or with a typed error frame.

- `StateInfoRequest(run_id, stage)` → `StateInfoReply(step, digest, total_bytes, header_bytes)` and
  the snapshot's canonical header (`averaging.state.encode_header`: step and tensor entries) as
  `header_bytes` of chunks. The header travels as chunks, not inside the reply message, because a
  big stage's entry list outgrows the 64 KiB message limit; the digest covers it, so a lying header
  is caught when the download is verified.
- `StateRangeRequest(run_id, stage, digest, offset, length)` → `StateRangeReply(digest, offset,
  length)` and the bytes `[offset, offset + length)` of that snapshot's data as chunks. A range is at
  most `MAX_RANGE_BYTES`. A digest the server no longer holds gets `UnknownStateError`.

The servicer keeps the last few snapshots (by digest, expiring when unused) so that a download in
progress finishes even when the source has stepped meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from hivemind.p2p import P2P

from swarmnet.averaging.state import StateSnapshot, TensorEntry, decode_header, encode_header
from swarmnet.errors import (
    BadRequestError,
    PeerUnavailableError,
    ProtocolError,
    UnknownRunError,
    UnknownStateError,
)
from swarmnet.protocols import access
from swarmnet.protocols.dial import PeerDialer
from swarmnet.protocols.direct import DirectClient, DirectEndpoint
from swarmnet.protocols.framing import (
    ERROR,
    FramedStream,
    decode_error,
    serve_stream,
)

logger = logging.getLogger(__name__)

PROTOCOL = "/swarmnet/state/1"
MAX_RANGE_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024 * 1024
REQUEST_READ_TIMEOUT = 30.0
SNAPSHOT_TIMEOUT = 120.0
"""Seconds the servicer waits for its provider to produce a snapshot (the compute thread may be busy)."""
REPLY_SEND_TIMEOUT = 120.0
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class StateInfoRequest:
    run_id: str
    stage: int


@dataclass(frozen=True, kw_only=True)
class StateInfoReply:
    step: int
    digest: str
    total_bytes: int
    header_bytes: int
    """Length of the canonical header that follows as chunks."""


@dataclass(frozen=True, kw_only=True)
class StateRangeRequest:
    run_id: str
    stage: int
    digest: str
    offset: int
    length: int


@dataclass(frozen=True, kw_only=True)
class StateRangeReply:
    digest: str
    offset: int
    length: int


@dataclass(frozen=True)
class StateInfo:
    """What a source announces: the snapshot it would serve, without its data."""

    step: int
    digest: str
    total_bytes: int
    entries: list[TensorEntry]


@dataclass
class _Held:
    snapshot: StateSnapshot
    header: bytes
    last_used: float


class StateServicer:
    """Serves the snapshots of one stage of one run, as produced by `get_snapshot`.

    `get_snapshot` is called (one call at a time; concurrent info requests share a call) for every
    info request; it should return a cached snapshot while the state has not changed, and raise a
    `SwarmnetError` (e.g. `PeerUnavailableError`) while this peer has no state worth serving.
    `on_served(client, nbytes)` is told about every range served (for metrics).
    """

    def __init__(
        self,
        run_id: str,
        stage: int,
        get_snapshot: Callable[[], Awaitable[StateSnapshot]],
        *,
        keep: int = 3,
        ttl: float = 300.0,
        max_range_bytes: int = MAX_RANGE_BYTES,
        on_served: Callable[[str, int], None] | None = None,
    ):
        self.run_id = run_id
        self.stage = stage
        self.get_snapshot = get_snapshot
        self.keep = max(1, keep)
        self.ttl = ttl
        self.max_range_bytes = max_range_bytes
        self.on_served = on_served
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._lock = asyncio.Lock()
        self._latest: tuple[float, str] | None = None
        """(monotonic time the latest provider call started, its digest)."""

    async def register(self, p2p: P2P) -> None:
        await access.add_stream_handler(p2p, PROTOCOL, self._handle, what="state")

    async def unregister(self, p2p: P2P) -> None:
        await p2p.remove_binary_stream_handler(PROTOCOL)
        self._held.clear()
        self._latest = None

    @property
    def held_digests(self) -> list[str]:
        """Digests currently servable, oldest first."""
        self._evict()
        return list(self._held)

    def register_direct(self, endpoint: DirectEndpoint) -> None:
        endpoint.add(PROTOCOL, StateStream, lambda client, stream: _serve_state(client, stream, self._addressed), what="state")

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle_state_stream(info, reader, writer, self._addressed)

    def _addressed(self, request: StateInfoRequest | StateRangeRequest) -> StateServicer:
        self._check_target(request.run_id, request.stage)
        return self

    async def answer(self, client: str, stream: StateStream, request: StateInfoRequest | StateRangeRequest) -> None:
        """Answers one request already read from `stream` (and addressed to this servicer)."""
        if isinstance(request, StateInfoRequest):
            held = await self._current()
            snapshot = held.snapshot
            reply = StateInfoReply(
                step=snapshot.step, digest=snapshot.digest, total_bytes=snapshot.total_bytes,
                header_bytes=len(held.header),
            )
            async with asyncio.timeout(REPLY_SEND_TIMEOUT):
                await stream.send_message(reply)
                await stream.send_bytes(memoryview(held.header))
            return
        held = self._lookup(request)
        async with asyncio.timeout(REPLY_SEND_TIMEOUT):
            await self._send_range(stream, held.snapshot, request.offset, request.length)
        if self.on_served is not None:
            self.on_served(client, request.length)

    async def _send_range(
        self, stream: StateStream, snapshot: StateSnapshot, offset: int, length: int
    ) -> None:
        await stream.send_message(StateRangeReply(digest=snapshot.digest, offset=offset, length=length))
        await stream.send_bytes(snapshot.data[offset : offset + length])

    def _check_target(self, run_id: str, stage: int) -> None:
        if run_id != self.run_id:
            raise UnknownRunError(f"this peer serves run {self.run_id}, not {run_id[:80]!r}")
        if stage != self.stage:
            raise BadRequestError(f"this peer serves stage {self.stage}, not {stage}")

    def _lookup(self, request: StateRangeRequest) -> _Held:
        if not _DIGEST.fullmatch(request.digest):
            raise BadRequestError("digest must be 64 lowercase hex digits")
        if not 0 < request.length <= self.max_range_bytes:
            raise BadRequestError(f"range length {request.length} outside 1..{self.max_range_bytes}")
        self._evict()
        held = self._held.get(request.digest)
        if held is None:
            raise UnknownStateError(f"no state with digest {request.digest[:16]}… (the peer stepped since)")
        total = held.snapshot.total_bytes
        if request.offset < 0 or request.offset + request.length > total:
            raise BadRequestError(f"range [{request.offset}, +{request.length}) outside {total} bytes")
        held.last_used = time.monotonic()
        self._held.move_to_end(request.digest)
        return held

    async def _current(self) -> _Held:
        """A snapshot at least as fresh as this request: requests that arrive while the provider is
        running wait for the next call, but requests that arrived before a call started share it."""
        asked = time.monotonic()
        async with self._lock:
            self._evict()
            if self._latest is not None and self._latest[0] >= asked and self._latest[1] in self._held:
                return self._remember_used(self._latest[1])
            started = time.monotonic()
            async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                snapshot = await self.get_snapshot()
            held = self._held.get(snapshot.digest)
            if held is None:
                held = _Held(snapshot, encode_header(snapshot.step, snapshot.entries), started)
                self._held[snapshot.digest] = held
            self._latest = (started, snapshot.digest)
            self._remember_used(snapshot.digest)
            self._evict(keep_digest=snapshot.digest)
            return held

    def _remember_used(self, digest: str) -> _Held:
        held = self._held[digest]
        held.last_used = time.monotonic()
        self._held.move_to_end(digest)
        return held

    def _evict(self, keep_digest: str | None = None) -> None:
        now = time.monotonic()
        for digest in [d for d, h in self._held.items() if now - h.last_used > self.ttl and d != keep_digest]:
            del self._held[digest]
        while len(self._held) > self.keep:
            oldest = next(iter(self._held))
            if oldest == keep_digest:
                break
            del self._held[oldest]


class StateRouter:
    """One `/swarmnet/state/1` handler in front of the servicers of several stages (an archive
    serves every stage of a run from one host)."""

    def __init__(self) -> None:
        self._servicers: dict[tuple[str, int], StateServicer] = {}

    def add(self, servicer: StateServicer) -> None:
        self._servicers[(servicer.run_id, servicer.stage)] = servicer

    async def register(self, p2p: P2P) -> None:
        await access.add_stream_handler(p2p, PROTOCOL, self._handle, what="state")

    async def unregister(self, p2p: P2P) -> None:
        await p2p.remove_binary_stream_handler(PROTOCOL)

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle_state_stream(info, reader, writer, self._addressed)

    def _addressed(self, request: StateInfoRequest | StateRangeRequest) -> StateServicer:
        servicer = self._servicers.get((request.run_id, request.stage))
        if servicer is None:
            if not any(run_id == request.run_id for run_id, _ in self._servicers):
                raise UnknownRunError(f"no state of run {request.run_id[:80]!r} here")
            raise PeerUnavailableError(f"no state of stage {request.stage} here")
        return servicer


async def _handle_state_stream(
    info,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    addressed: Callable[[StateInfoRequest | StateRangeRequest], StateServicer],
) -> None:
    """One state-protocol libp2p stream."""
    client = str(info.peer_id)
    stream = StateStream(reader, writer, peer=client)
    await serve_stream(stream, lambda: _serve_state(client, stream, addressed), what="state")


async def _serve_state(
    client: str, stream: StateStream, addressed: Callable[[StateInfoRequest | StateRangeRequest], StateServicer]
) -> None:
    """Reads one request, hands it to the servicer it is addressed to (`addressed` raises the
    typed error when none is), which answers."""
    async with asyncio.timeout(REQUEST_READ_TIMEOUT):
        request = await stream.receive_message(StateInfoRequest, StateRangeRequest)
    await addressed(request).answer(client, stream, request)


class StateStub:
    """Client side of the state protocol for one remote peer."""

    def __init__(
        self, p2p: P2P, peer_id: str, maddrs: list[str], *, data_addr: str | None = None, direct: DirectClient | None = None
    ):
        self.p2p = p2p
        self.peer_id = peer_id
        self.maddrs = maddrs
        self.dialer = PeerDialer(p2p, peer_id, maddrs, data_addr=data_addr, direct=direct)

    async def info(self, run_id: str, stage: int) -> StateInfo:
        """The snapshot the peer would serve now; raises a typed error or `ProtocolError`."""
        async with self._call() as stream:
            await stream.send_message(StateInfoRequest(run_id=run_id, stage=stage))
            reply = await stream.receive_message(StateInfoReply)
            if not _DIGEST.fullmatch(reply.digest) or not 0 < reply.header_bytes <= MAX_HEADER_BYTES:
                raise ProtocolError(f"malformed state info from {self.peer_id}")
            step, entries = decode_header(await stream.receive_bytes(reply.header_bytes), ProtocolError)
            if step != reply.step or sum(e.nbytes for e in entries) != reply.total_bytes:
                raise ProtocolError(f"state info from {self.peer_id} contradicts its header")
            stream.completed()
            return StateInfo(step=step, digest=reply.digest, total_bytes=reply.total_bytes, entries=entries)

    async def fetch_range(
        self, run_id: str, stage: int, digest: str, offset: int, length: int, *, into: memoryview | None = None
    ) -> bytes | memoryview:
        """Bytes `[offset, offset + length)` of the peer's snapshot `digest` (received straight
        into `into`, when given)."""
        async with self._call() as stream:
            await stream.send_message(
                StateRangeRequest(run_id=run_id, stage=stage, digest=digest, offset=offset, length=length)
            )
            reply = await stream.receive_message(StateRangeReply)
            if (reply.digest, reply.offset, reply.length) != (digest, offset, length):
                raise ProtocolError(f"{self.peer_id} answered a different range")
            data = await stream.receive_bytes(length, into)
            stream.completed()
            return data

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[StateStream]:
        """One stream for one call, closed afterwards; a lost connection is `PeerUnavailableError`."""
        stream = await self._open()
        try:
            yield stream
        except ConnectionError as e:
            raise PeerUnavailableError(f"lost the stream to {self.peer_id}: {e}", peer=self.peer_id) from e
        finally:
            await stream.close()

    async def _open(self) -> StateStream:
        return await self.dialer.open(PROTOCOL, StateStream)


class StateStream(FramedStream):
    """A `FramedStream` that also carries raw byte ranges and this protocol's own error codes."""

    protocol = "state"

    async def send_bytes(self, view: memoryview) -> None:
        await self.send_raw(view)

    async def receive_bytes(self, length: int, into: memoryview | None = None) -> bytes | memoryview:
        """Exactly `length` bytes of CHUNK frames (into `into` when given); a typed error if the
        peer sends an error frame."""
        buffer = into if into is not None else memoryview(bytearray(length))
        if len(buffer) != length:
            raise ValueError(f"a buffer of {len(buffer)} bytes for {length}")
        await self.receive_raw(buffer)
        return buffer if into is not None else bytes(buffer)

    async def _read_frame(self) -> tuple[int, bytes]:
        kind, payload = await super()._read_frame()
        if kind == ERROR:
            raise decode_error(payload, self.peer)
        return kind, payload
