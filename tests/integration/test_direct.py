"""The direct data plane on real sockets: stage calls over direct TCP with pooled connections,
mutual proof of identity (forged opens refused, the server keeps serving), compression, and the
fallback to a libp2p stream through a real p2pd when the data port cannot be reached."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import torch

from swarmnet.averaging.allreduce import AllReduceServer
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.errors import BadRequestError, PeerUnavailableError
from swarmnet.protocols import direct
from swarmnet.protocols.framing import FramedStream
from swarmnet.protocols.stage import PROTOCOL, ForwardResult, StageServicer, StageStub
from swarmnet.telemetry import metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Doubler:
    """A stage backend that returns twice its input (checks pass everything but NaN)."""

    def __init__(self) -> None:
        self.clients: list[str] = []

    def check_forward(self, request, client: str = "") -> None:
        pass

    def check_backward(self, request, client: str = "") -> None:
        pass

    async def forward(self, client, request, x, targets) -> ForwardResult:
        self.clients.append(client)
        if not torch.isfinite(x).all():
            raise BadRequestError("non-finite input")
        return ForwardResult(output=x * 2, grad_input=None, loss=None, step=7)

    async def backward(self, client, request, grad_output):
        return grad_output * 2, 7


def count(family, *labels: str) -> float:
    return family.labels(*labels)._value.get()


def test_direct_calls_pool_authenticate_and_fall_back():
    asyncio.run(_scenario())


async def _scenario() -> None:
    ids = [Identity.ephemeral() for _ in range(3)]
    hosts: list[SwarmDHT] = []
    try:
        server = await SwarmDHT.create(identity=ids[0])
        hosts.append(server)
        maddrs = await server.visible_maddrs()
        client = await SwarmDHT.create(identity=ids[1], initial_peers=maddrs, client_mode=True)
        hosts.append(client)
        backend = Doubler()
        servicer = StageServicer(backend)
        await servicer.register(server.p2p)
        async with await AllReduceServer.create() as data_port:
            data_port.direct = direct.DirectEndpoint(ids[0])
            servicer.register_direct(data_port.direct)
            addr = f"127.0.0.1:{data_port.port}"
            x = torch.randn(4, 16, 32)

            # Direct calls: one connection, reused by the next calls; the server knows who called.
            opened = count(metrics.DIRECT_CONNECTIONS, "opened", "ok")
            stub = StageStub(client.p2p, server.peer_id, maddrs, data_addr=addr, direct=client.direct)
            direct_streams = count(metrics.STREAMS, "stage", "direct")
            for _ in range(3):
                result = await asyncio.wait_for(stub.forward("run", "mb", 0, x), 20)
                assert torch.equal(result.output, x * 2) and result.step == 7
            assert count(metrics.STREAMS, "stage", "direct") - direct_streams == 3
            assert count(metrics.DIRECT_CONNECTIONS, "opened", "ok") - opened == 1
            assert backend.clients == [client.peer_id] * 3
            grad = await asyncio.wait_for(stub.backward("run", "mb", 0, x), 20)
            assert torch.equal(grad, x * 2)

            # A typed error travels back, the connection is dropped, and the next call still works.
            with pytest.raises(BadRequestError):
                await asyncio.wait_for(stub.forward("run", "mb", 0, torch.full((2, 3), float("nan"))), 20)
            assert torch.equal((await asyncio.wait_for(stub.forward("run", "mb", 0, x), 20)).output, x * 2)

            # int8 and fp16 on the wire both ways.
            for compression, tolerance in (("int8", 0.05), ("fp16", 0.01)):
                lossy = StageStub(
                    client.p2p, server.peer_id, maddrs, data_addr=addr, direct=client.direct, compression=compression
                )
                out = (await asyncio.wait_for(lossy.forward("run", "mb", 0, x), 20)).output
                assert out.dtype == torch.float32 and (out - x * 2).abs().max() < tolerance * x.abs().max() * 2

            # Forged opens: a client claiming someone else's id, and an open meant for another peer.
            refused = count(metrics.DIRECT_CONNECTIONS, "accepted", BadRequestError.code)
            await _forged_open(addr, server.peer_id, claimed=ids[1].peer_id, signer=ids[2])
            assert count(metrics.DIRECT_CONNECTIONS, "accepted", BadRequestError.code) - refused == 1
            impostor = direct.DirectClient(ids[1])
            with pytest.raises(direct.DirectUnavailable):
                await impostor.open(addr, ids[2].peer_id, PROTOCOL, FramedStream)
            assert torch.equal((await asyncio.wait_for(stub.forward("run", "mb", 0, x), 20)).output, x * 2)

            # An unreachable data port: the call goes through p2pd instead, and stays there.
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                dead_addr = f"127.0.0.1:{closed.getsockname()[1]}"
            p2p_streams = count(metrics.STREAMS, "stage", "p2p")
            fallback = StageStub(client.p2p, server.peer_id, maddrs, data_addr=dead_addr, direct=client.direct)
            for _ in range(2):
                assert torch.equal((await asyncio.wait_for(fallback.forward("run", "mb", 0, x), 30)).output, x * 2)
            assert count(metrics.STREAMS, "stage", "p2p") - p2p_streams == 2
            assert not client.direct.usable(dead_addr)

            # A protocol no longer served: refused as unavailable, not silently sent elsewhere.
            data_port.direct.remove(PROTOCOL)
            fresh = direct.DirectClient(ids[1])
            with pytest.raises(PeerUnavailableError):
                await fresh.open(addr, server.peer_id, PROTOCOL, FramedStream)
            fresh.close()
    finally:
        for host in hosts:
            await host.shutdown()
        for identity in ids:
            identity.path.unlink(missing_ok=True)


async def _forged_open(addr: str, server_id: str, *, claimed: str, signer: Identity) -> None:
    """Opens a connection as `claimed` but signs with `signer`'s key: the server must refuse."""
    host, _, port = addr.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    stream = FramedStream(reader, writer, peer=server_id)
    try:
        hello = direct.DirectOpen(protocol=PROTOCOL, client=claimed, server=server_id, nonce=os.urandom(32))
        await stream.send_message(hello)
        challenge = await asyncio.wait_for(stream.receive_message(direct.DirectChallenge), 10)
        forged = signer.sign(direct._transcript("client", challenge.nonce, hello))
        await stream.send_message(direct.DirectProof(signature=forged))
        with pytest.raises(BadRequestError, match="proof of identity"):
            await asyncio.wait_for(stream.receive_message(direct.DirectChallenge), 10)
    finally:
        await stream.close()
