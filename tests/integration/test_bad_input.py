"""Bad input to a live peer gets a typed error reply, and the peer keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
import torch

from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.errors import (
    BadRequestError,
    PeerUnavailableError,
    ProtocolError,
    UnknownMicrobatchError,
    UnknownRunError,
)
from swarmnet.protocols import stage as proto
from swarmnet.protocols.dial import PeerDialer
from swarmnet.protocols.framing import CHUNK, MAX_FRAME_BYTES, FramedStream, TensorHeader
from swarmnet.protocols.stage import StageStub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_bad_input_gets_typed_errors_and_peer_keeps_serving(swarm, manifest):
    peer = swarm.start_peer(1)  # the last stage: forward takes activations and targets
    asyncio.run(_attack(peer.ready, manifest))
    assert peer.alive


async def _attack(ready: dict, manifest) -> None:
    B, T, D = manifest.training.microbatch_size, manifest.training.seq_len, manifest.model.d_model
    run_id = manifest.run_id
    good_x = torch.randn(B, T, D)
    good_targets = torch.randint(0, 256, (B, T))
    identity = Identity.ephemeral()
    try:
        async with await SwarmDHT.create(identity=identity, client_mode=True) as client:
            stub = StageStub(client.p2p, ready["peer_id"], ready["maddrs"])

            async def expect(error: type, coro) -> None:
                with pytest.raises(error):
                    await asyncio.wait_for(coro, 30)

            async def raw(write) -> FramedStream:
                stream = await PeerDialer(client.p2p, ready["peer_id"], ready["maddrs"]).open(proto.PROTOCOL)
                await write(stream)
                return stream

            # Unknown run, wrong stage, wrong dtype and shape, NaN/Inf, out-of-range targets.
            await expect(UnknownRunError, stub.forward("0" * 16, "mb", 1, good_x, good_targets))
            await expect(PeerUnavailableError, stub.forward(run_id, "mb", 0, good_x, good_targets))  # not this stage
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, good_x.double().float().half(), good_targets))
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, torch.randn(B, T, D + 1), good_targets))
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, torch.randn(B + 1, T, D), good_targets))
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, good_x, None))
            nan = good_x.clone()
            nan[0, 0, 0] = math.nan
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, nan, good_targets))
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, good_x * math.inf, good_targets))
            await expect(BadRequestError, stub.forward(run_id, "mb", 1, good_x, good_targets + 1000))
            # Unknown microbatch: the last stage has no backward; any backward is refused.
            await expect(BadRequestError, stub.backward(run_id, "never-seen", 1, good_x))

            # Malformed frames: unknown frame type, oversized chunk, garbage message, short tensor.
            async def unknown_frame(s: FramedStream) -> None:
                s.io.write(bytes([9]) + (4).to_bytes(4, "big") + b"junk")
                await s.io.drain()

            async def oversized(s: FramedStream) -> None:
                header = TensorHeader(dtype="float32", shape=[B, T, D])
                await s.send_message(proto.ForwardRequest(run_id=run_id, microbatch_id="big", stage=1, input=header,
                                                          targets=TensorHeader(dtype="int64", shape=[B, T])))
                s.io.write(bytes([CHUNK]) + (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
                await s.io.drain()

            async def garbage(s: FramedStream) -> None:
                s.io.write(bytes([1]) + (6).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1\xc1")
                await s.io.drain()

            async def truncated(s: FramedStream) -> None:
                header = TensorHeader(dtype="float32", shape=[B, T, D])
                await s.send_message(proto.ForwardRequest(run_id=run_id, microbatch_id="short", stage=1, input=header,
                                                          targets=TensorHeader(dtype="int64", shape=[B, T])))
                s.io.write(bytes([CHUNK]) + (8).to_bytes(4, "big") + bytes(8))
                s.io.writer.write_eof()
                await s.io.drain()

            for attack in (unknown_frame, oversized, garbage, truncated):
                stream = await raw(attack)
                try:
                    with pytest.raises(ProtocolError):
                        await asyncio.wait_for(stream.receive_message(proto.ForwardReply), 30)
                finally:
                    await stream.close()

            # After all that, the peer still serves a valid request.
            result = await asyncio.wait_for(stub.forward(run_id, "ok", 1, good_x, good_targets), 30)
            assert result.loss is not None and math.isfinite(result.loss)
            assert result.grad_input is not None and result.grad_input.shape == good_x.shape
    finally:
        with contextlib.suppress(FileNotFoundError):
            identity.path.unlink()


def test_unknown_microbatch_on_a_middle_stage(swarm, manifest):
    peer = swarm.start_peer(0)
    asyncio.run(_unknown_microbatch(peer.ready, manifest))
    assert peer.alive


async def _unknown_microbatch(ready: dict, manifest) -> None:
    B, T, D = manifest.training.microbatch_size, manifest.training.seq_len, manifest.model.d_model
    identity = Identity.ephemeral()
    try:
        async with await SwarmDHT.create(identity=identity, client_mode=True) as client:
            stub = StageStub(client.p2p, ready["peer_id"], ready["maddrs"])
            with pytest.raises(UnknownMicrobatchError):
                await asyncio.wait_for(stub.backward(manifest.run_id, "never-seen", 0, torch.randn(B, T, D)), 30)
            tokens = torch.randint(0, 256, (B, T))
            out = await asyncio.wait_for(stub.forward(manifest.run_id, "mb-1", 0, tokens), 30)
            grad = await asyncio.wait_for(stub.backward(manifest.run_id, "mb-1", 0, torch.ones_like(out.output)), 30)
            assert grad is None  # token inputs have no gradient
    finally:
        with contextlib.suppress(FileNotFoundError):
            identity.path.unlink()
