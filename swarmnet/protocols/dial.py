"""Opening call streams to a peer known from its DHT record: over the direct data plane when the
peer announces one and it can be reached, else as a libp2p stream through p2pd. In a private run
(the host has an access policy, `access.attach`) a libp2p stream opens with this process's
`AccessHello`; a direct connection carries its credential in the handshake."""

from __future__ import annotations

import logging

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmnet.errors import PeerUnavailableError
from swarmnet.protocols import access
from swarmnet.protocols.direct import DirectClient, DirectUnavailable
from swarmnet.protocols.framing import FramedStream
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)


class PeerDialer:
    """Opens one stream per call to one peer. With a `direct` client and the peer's `data_addr`,
    calls go over direct TCP (pooled, authenticated connections); when that cannot be set up,
    they fall back to p2pd, which connects to the peer's announced addresses once (p2pd may not
    know them otherwise). Any failure is a retryable `PeerUnavailableError`."""

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        maddrs: list[str],
        *,
        data_addr: str | None = None,
        direct: DirectClient | None = None,
    ):
        self.p2p = p2p
        self.peer_id = peer_id
        self.maddrs = maddrs
        self.data_addr = data_addr
        self.direct = direct
        self._connected = False

    async def open(self, protocol: str, stream_cls: type[FramedStream] = FramedStream) -> FramedStream:
        if self.direct is not None and self.data_addr and self.direct.usable(self.data_addr):
            try:
                stream = await self.direct.open(self.data_addr, self.peer_id, protocol, stream_cls)
            except DirectUnavailable as e:
                logger.info("no direct connection to %s (%s); using libp2p", self.peer_id, e)
            else:
                metrics.STREAMS.labels(stream_cls.protocol, "direct").inc()
                return stream
        try:
            pid = PeerID.from_base58(self.peer_id)
            if not self._connected and self.maddrs:
                # hivemind's P2P has no public connect(); its daemon client does. p2pd wants the
                # addresses without their /p2p/<id> suffix.
                await self.p2p._client.connect(pid, [Multiaddr(m.split("/p2p/")[0]) for m in self.maddrs])
                self._connected = True
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, protocol)
            stream = stream_cls(reader, writer, peer=self.peer_id)
            policy = access.policy_for(self.p2p)
            if policy is not None and policy.private:
                await stream.send_message(policy.hello())
        except Exception as e:  # bad peer ids, and p2pd's dial failures (ControlFailure, ConnectionError)
            self._connected = False
            raise PeerUnavailableError(f"cannot open a stream to {self.peer_id}: {e}", peer=self.peer_id) from e
        metrics.STREAMS.labels(stream_cls.protocol, "p2p").inc()
        return stream
