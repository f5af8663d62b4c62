"""The direct data plane: stage and state calls over plain TCP between mutually reachable peers.

A peer's data port (the all-reduce server's listener, announced as `averaging_addr` in its DHT
record) also accepts direct connections for the stage and state protocols. They carry exactly the
frames a libp2p stream carries (`framing`), but without p2pd's two extra hops and per-chunk
protobuf: tensors go from the sender's buffer to the kernel and from the kernel into the receiver's
tensor with no copy in between, in frames of up to 4 MiB.

A connection starts with a mutual proof of identity, both keys being the Ed25519 keys of the
peers' libp2p ids (the public key is recoverable from the peer id, see `dht.identity`):

1. client → `DirectOpen{protocol, client, server, nonce}`;
2. server → `DirectChallenge{nonce, signature}`: the server signs the client's nonce, the protocol
   and both ids, so the client knows it reached the peer the signed DHT record named;
3. client → `DirectProof{signature}`: the client signs the server's nonce (and the same fields),
   so the server knows who it serves: a stage server keys cached microbatches by that id.
   In a private run the server then checks that id against the run's access policy, with the
   join credential the client put in `DirectOpen` (see `access.py`), and refuses outsiders with
   `AccessDeniedError`.

Then the connection carries calls one after another: a request, its reply, the next request. The
client keeps idle connections in a small pool and reuses them; the server closes a connection after
any error reply (the two sides may disagree about where a refused request ended) and after
`IDLE_TIMEOUT` without a request. The data plane authenticates but does not encrypt (like the
all-reduce plane); a profile turns it off (`direct_data_plane = false`) to keep everything inside
libp2p's encrypted streams.

Any failure to set up a direct connection (refused, unreachable, timed out, a server of another
version) falls back to a libp2p stream through p2pd — the path for peers behind NAT — and the
address is not tried again for `RETRY_DIRECT_AFTER` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
from cryptography.exceptions import InvalidSignature

from swarmnet.dht.identity import Identity, public_key_from_peer_id
from swarmnet.errors import (
    AccessDeniedError,
    BadRequestError,
    PeerBusyError,
    PeerUnavailableError,
    ProtocolError,
    RemoteError,
    SwarmnetError,
)
from swarmnet.protocols.framing import FramedStream, SocketIO, quietly, serve_request
from swarmnet.telemetry import metrics

if TYPE_CHECKING:
    from swarmnet.protocols.access import AccessPolicy

logger = logging.getLogger(__name__)

VERSION = 1
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0
IDLE_TIMEOUT = 60.0
"""Server side: a connection with no request for this long is closed."""
POOL_IDLE = 20.0
"""Client side: an idle pooled connection older than this is closed rather than reused (well
inside the server's `IDLE_TIMEOUT`, so a reused connection is not one the server is closing)."""
POOL_PER_KEY = 8
"""Idle connections kept per (server, protocol)."""
MAX_CONNECTIONS = 256
"""Direct connections a server holds at once; more are refused (the client falls back to p2pd)."""
RETRY_DIRECT_AFTER = 60.0


@dataclass(frozen=True, kw_only=True)
class DirectOpen:
    protocol: str
    client: str
    server: str
    nonce: bytes
    version: int = VERSION
    credential: str = field(default="", metadata={"omit_if_default": True})
    """Private runs: the client's join credential (left out otherwise, as older peers expect)."""


@dataclass(frozen=True, kw_only=True)
class DirectChallenge:
    nonce: bytes
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class DirectProof:
    signature: bytes


class DirectUnavailable(RemoteError):
    """No direct connection could be set up; the caller falls back to a libp2p stream."""

    code = "direct_unavailable"
    retryable = True


def _transcript(role: str, nonce: bytes, hello: DirectOpen) -> bytes:
    """What `role` ("server" or "client") signs: the other side's fresh nonce and the whole open."""
    return msgpack.packb(
        ["swarmnet-direct", VERSION, role, nonce, hello.protocol, hello.client, hello.server, hello.nonce],
        use_bin_type=True,
    )


def _verify(peer_id: str, signature: bytes, data: bytes) -> bool:
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except (ValueError, InvalidSignature):
        return False
    return True


Serve = Callable[[str, FramedStream], Awaitable[None]]


@dataclass(frozen=True)
class _Handler:
    stream_cls: type[FramedStream]
    serve: Serve
    what: str


class DirectEndpoint:
    """Server side: the protocols a peer serves directly, and the connections it holds."""

    def __init__(self, identity: Identity, *, access: AccessPolicy | None = None):
        self.identity = identity
        self.access = access
        """The run's access policy: in a private run only members get past the handshake."""
        self._handlers: dict[str, _Handler] = {}
        self._connections = 0

    def add(self, protocol: str, stream_cls: type[FramedStream], serve: Serve, *, what: str) -> None:
        """Serves `protocol`: `serve(client_peer_id, stream)` answers one request on `stream`."""
        self._handlers[protocol] = _Handler(stream_cls, serve, what)

    def remove(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    async def accept(self, sock: socket.socket, hello: DirectOpen) -> None:
        """Takes over a connection whose first message was `hello`; closes it when done."""
        io = SocketIO(sock)
        stream = FramedStream.over(io, peer=hello.client)
        self._connections += 1
        outcome = "ok"
        try:
            try:
                handler = self._admit(hello)
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    nonce = os.urandom(NONCE_BYTES)
                    signature = self.identity.sign(_transcript("server", hello.nonce, hello))
                    await stream.send_message(DirectChallenge(nonce=nonce, signature=signature))
                    proof = await stream.receive_message(DirectProof)
                if not _verify(hello.client, proof.signature, _transcript("client", nonce, hello)):
                    raise BadRequestError("the client's proof of identity does not verify")
                if self.access is not None:
                    self.access.check(hello.client, hello.credential, protocol=handler.what)
            except SwarmnetError as e:
                outcome = e.code
                await quietly(stream.send_error(e))
                if isinstance(e, AccessDeniedError):
                    # The client sent its first request right after its proof: read it away, so
                    # that closing does not reset the connection before the client reads why.
                    await quietly(stream.finish())
                return
            except TimeoutError:
                outcome = "timeout"
                return
            await self._serve_calls(io, hello.client, hello.protocol, handler)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            outcome = "disconnected"
        finally:
            metrics.DIRECT_CONNECTIONS.labels("accepted", outcome).inc()
            self._connections -= 1
            sock.close()

    def _admit(self, hello: DirectOpen) -> _Handler:
        if hello.version != VERSION:
            raise ProtocolError(f"direct data plane version {hello.version} (this peer speaks {VERSION})")
        if hello.server != self.identity.peer_id:
            raise BadRequestError("this is not the peer the connection was meant for")
        if len(hello.nonce) != NONCE_BYTES:
            raise BadRequestError("malformed nonce")
        if self._connections > MAX_CONNECTIONS:
            raise PeerBusyError("too many direct connections; use libp2p")
        handler = self._handlers.get(hello.protocol)
        if handler is None:
            raise PeerUnavailableError(f"{hello.protocol[:100]!r} is not served here now")
        return handler

    async def _serve_calls(self, io: SocketIO, client: str, protocol: str, handler: _Handler) -> None:
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    first = await io.read_some(1)
            except TimeoutError:
                return
            if not first:
                return  # the client closed the connection
            io.push_back(first)
            if self._handlers.get(protocol) is not handler:
                return  # the protocol stopped being served (e.g. the peer moved on): close
            stream = handler.stream_cls.over(io, peer=client)
            outcome = await serve_request(stream, lambda s=stream: handler.serve(client, s), what=handler.what)
            if outcome != "ok":
                await quietly(stream.finish())
                return


class DirectClient:
    """Client side, one per process: opens authenticated direct connections and pools idle ones."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.credential = ""
        """Private runs: this process's join credential, sent in every `DirectOpen`."""
        self._idle: dict[tuple[str, str, str], list[tuple[float, SocketIO]]] = {}
        self._unreachable: dict[str, float] = {}

    def usable(self, address: str) -> bool:
        until = self._unreachable.get(address)
        if until is not None and time.monotonic() >= until:
            del self._unreachable[address]  # expired: forget it, so the map holds only recent failures
            until = None
        return until is None

    async def open(
        self, address: str, server: str, protocol: str, stream_cls: type[FramedStream]
    ) -> FramedStream:
        """A stream of `protocol` to `server` at `address` (host:port), reusing an idle connection
        when there is one. Raises `DirectUnavailable` when no direct connection can be had (the
        caller then uses libp2p) and the typed error the server refused the connection with."""
        key = (address, server, protocol)
        io = self._take_idle(key)
        if io is None:
            io = await self._connect(address, server, protocol)
            metrics.DIRECT_CONNECTIONS.labels("opened", "ok").inc()
        stream = stream_cls.over(io, peer=server)

        async def release(stream: FramedStream, completed: bool) -> None:
            if completed and not io.buffered:
                self._put_idle(key, io)
            else:
                await io.close()

        stream.on_close = release
        return stream

    def _take_idle(self, key: tuple[str, str, str]) -> SocketIO | None:
        idle = self._idle.get(key, [])
        while idle:
            since, io = idle.pop()
            if time.monotonic() - since < POOL_IDLE and _alive(io.sock):
                return io
            io.sock.close()
        return None

    def _put_idle(self, key: tuple[str, str, str], io: SocketIO) -> None:
        idle = self._idle.setdefault(key, [])
        idle.append((time.monotonic(), io))
        while len(idle) > POOL_PER_KEY:
            idle.pop(0)[1].sock.close()

    async def _connect(self, address: str, server: str, protocol: str) -> SocketIO:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        sock = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                family, kind, proto, _, sockaddr = (await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, sockaddr)
        except (OSError, ValueError) as e:  # TimeoutError is an OSError
            if sock is not None:
                sock.close()
            self._unreachable[address] = time.monotonic() + RETRY_DIRECT_AFTER
            raise DirectUnavailable(f"cannot connect to {address}: {e!r}", peer=server) from e
        io = SocketIO(sock)
        stream = FramedStream.over(io, peer=server)
        hello = DirectOpen(
            protocol=protocol, client=self.identity.peer_id, server=server, nonce=os.urandom(NONCE_BYTES),
            credential=self.credential,
        )
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await stream.send_message(hello)
                challenge = await stream.receive_message(DirectChallenge)
                if not _verify(server, challenge.signature, _transcript("server", hello.nonce, hello)):
                    raise ProtocolError(f"{address} does not prove to be {server}")
                await stream.send_message(DirectProof(signature=self.identity.sign(_transcript("client", challenge.nonce, hello))))
        except (PeerUnavailableError, AccessDeniedError):
            sock.close()
            raise  # the server is there and does not serve us now: libp2p would not either
        except (SwarmnetError, OSError, asyncio.IncompleteReadError) as e:
            sock.close()
            self._unreachable[address] = time.monotonic() + RETRY_DIRECT_AFTER
            raise DirectUnavailable(f"direct handshake with {address} failed: {e!r}", peer=server) from e
        return io

    def close(self) -> None:
        for idle in self._idle.values():
            for _, io in idle:
                io.sock.close()
        self._idle.clear()


def _alive(sock: socket.socket) -> bool:
    """Whether an idle connection is still open: no EOF or unread data waiting on it."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing to read: open and idle
    except OSError:
        return False
    return False  # EOF, or bytes nobody asked for
