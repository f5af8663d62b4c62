"""Opening libp2p streams to a peer known from its DHT record (peer id + announced multiaddrs)."""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmnet.errors import PeerUnavailableError


class PeerDialer:
    """Connects to the peer's announced addresses once (p2pd may not know them otherwise), then
    opens one stream per call; any failure is a retryable `PeerUnavailableError`."""

    def __init__(self, p2p: P2P, peer_id: str, maddrs: list[str]):
        self.p2p = p2p
        self.peer_id = peer_id
        self.maddrs = maddrs
        self._connected = False

    async def open(self, protocol: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            pid = PeerID.from_base58(self.peer_id)
            if not self._connected and self.maddrs:
                # hivemind's P2P has no public connect(); its daemon client does. p2pd wants the
                # addresses without their /p2p/<id> suffix.
                await self.p2p._client.connect(pid, [Multiaddr(m.split("/p2p/")[0]) for m in self.maddrs])
                self._connected = True
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, protocol)
        except Exception as e:  # bad peer ids, and p2pd's dial failures (ControlFailure, ConnectionError)
            self._connected = False
            raise PeerUnavailableError(f"cannot open a stream to {self.peer_id}: {e}", peer=self.peer_id) from e
        return reader, writer
