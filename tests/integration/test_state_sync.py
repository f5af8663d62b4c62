"""State sync over real libp2p hosts: parallel download from several stage-mates, resuming when a
source dies mid-download, ignoring stale sources, typed errors for bad ranges."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator

import pytest

from swarmnet.averaging.state import StateSnapshot, StateSyncError, check_entries, load_state, snapshot_state
from swarmnet.averaging.sync import download_state
from swarmnet.config import ModelConfig, RunManifest
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.errors import BadRequestError, PeerUnavailableError, ProtocolError, UnknownRunError
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer
from swarmnet.protocols import state as proto
from swarmnet.protocols.dial import PeerDialer
from swarmnet.protocols.state import MAX_RANGE_BYTES, StateServicer, StateStub, UnknownStateError

from .conftest import tiny_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STAGE = 1
PIECE = 64 * 1024


def manifest() -> RunManifest:
    """The tiny run, widened so that stage 1 with its AdamW state is ~10 MB (~150 pieces of 64 KiB)."""
    wide = ModelConfig(d_model=256, n_layers=2, n_heads=4, d_ff=1024, max_seq_len=32)
    return dataclasses.replace(tiny_manifest("state-sync"), model=wide)


def trained_computer(m: RunManifest, steps: int) -> StageComputer:
    import torch

    c = StageComputer(build_stage(m, STAGE), m.optimizer, target_batch_size=m.training.microbatch_size)
    B, T, D = m.training.microbatch_size, m.training.seq_len, m.model.d_model
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, targets = torch.randn(B, T, D, generator=g), torch.randint(0, 256, (B, T), generator=g)
        assert c.loss_backward(x, targets).stepped
    return c


def provider(snapshot: StateSnapshot):
    async def get() -> StateSnapshot:
        return snapshot

    return get


@contextlib.asynccontextmanager
async def hosts(n: int, *, client_mode: bool = False) -> AsyncIterator[list[SwarmDHT]]:
    """`n` real libp2p hosts (each its own p2pd) on 127.0.0.1; all shut down and cleaned up."""
    identities = [Identity.ephemeral() for _ in range(n)]
    started: list[SwarmDHT] = []
    try:
        for identity in identities:
            started.append(await SwarmDHT.create(identity=identity, client_mode=client_mode))
        yield started
    finally:
        for dht in started:
            with contextlib.suppress(Exception):
                await dht.shutdown()
        for identity in identities:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()


async def serve(dht: SwarmDHT, servicer: StateServicer) -> tuple[str, list[str]]:
    await servicer.register(dht.p2p)
    return dht.peer_id, await dht.visible_maddrs()


class DiesAfterFirstPiece(StateServicer):
    """Serves one piece, then holds every later request until its host is shut down. `served` is
    set once the client has read that piece and closed its stream (the server drains until then)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = asyncio.Event()
        self.release = asyncio.Event()
        self._first_writer = None

    async def _send_range(self, stream, snapshot, offset, length) -> None:
        if self._first_writer is not None:
            await self.release.wait()
            raise PeerUnavailableError("shut down")
        self._first_writer = stream.io.writer
        await super()._send_range(stream, snapshot, offset, length)

    async def _handle(self, info, reader, writer) -> None:
        await super()._handle(info, reader, writer)
        if writer is self._first_writer:
            self.served.set()


# --- downloads ---------------------------------------------------------------------------------------


def test_download_from_three_sources_is_identical_and_uses_several():
    m = manifest()
    source = trained_computer(m, steps=2)
    snap = snapshot_state(source)
    assert snap.total_bytes > 4 << 20

    async def main() -> None:
        async with hosts(3) as servers, hosts(1, client_mode=True) as (client,):
            sources = [await serve(s, StateServicer(m.run_id, STAGE, provider(snap))) for s in servers]
            result = await download_state(
                client.p2p, sources, run_id=m.run_id, stage=STAGE, piece_bytes=PIECE, parallel=4, timeout=60
            )
            assert result.snapshot == snap
            assert result.total_bytes == snap.total_bytes
            assert len(result.bytes_by_source) > 1, result.bytes_by_source
            assert set(result.bytes_by_source) <= {pid for pid, _ in sources}
            target = StageComputer(build_stage(m, STAGE), m.optimizer, target_batch_size=4)
            load_state(target, result.snapshot)
            assert snapshot_state(target).digest == snap.digest

    asyncio.run(main())


def test_download_resumes_when_a_source_dies_mid_download():
    m = manifest()
    snap = snapshot_state(trained_computer(m, steps=1))

    async def main() -> None:
        async with hosts(3) as servers, hosts(1, client_mode=True) as (client,):
            victim_host, *others = servers
            victim = DiesAfterFirstPiece(m.run_id, STAGE, provider(snap))
            sources = [await serve(victim_host, victim)]
            sources += [await serve(s, StateServicer(m.run_id, STAGE, provider(snap))) for s in others]

            async def kill_victim() -> None:
                await victim.served.wait()
                await victim_host.shutdown()

            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(kill_victim())
                    download = group.create_task(download_state(
                        client.p2p, sources, run_id=m.run_id, stage=STAGE, piece_bytes=PIECE, parallel=4,
                        timeout=60, call_timeout=20,
                    ))
            finally:
                victim.release.set()
            result = download.result()
            assert result.snapshot.digest == snap.digest and result.snapshot == snap
            served = result.bytes_by_source
            assert served.get(victim_host.peer_id) == PIECE, served  # its one piece was kept
            assert sum(served.values()) == snap.total_bytes
            assert all(served.get(s.peer_id, 0) > 0 for s in others), served

    asyncio.run(main())


def test_stale_foreign_and_failing_sources_are_ignored():
    m = manifest()
    fresh = snapshot_state(trained_computer(m, steps=2))
    stale = snapshot_state(trained_computer(m, steps=1))
    other_model = dataclasses.replace(m, model=dataclasses.replace(m.model, d_ff=512))
    foreign = snapshot_state(trained_computer(other_model, steps=3))  # a higher step, the wrong layout
    target = StageComputer(build_stage(m, STAGE), m.optimizer, target_batch_size=4)

    async def not_ready() -> StateSnapshot:
        raise PeerUnavailableError("still syncing")

    async def main() -> None:
        async with hosts(5) as servers, hosts(1, client_mode=True) as (client,):
            good = [await serve(s, StateServicer(m.run_id, STAGE, provider(fresh))) for s in servers[:2]]
            old = await serve(servers[2], StateServicer(m.run_id, STAGE, provider(stale)))
            broken = await serve(servers[3], StateServicer(m.run_id, STAGE, not_ready))
            wrong = await serve(servers[4], StateServicer(m.run_id, STAGE, provider(foreign)))
            nobody = Identity.ephemeral()
            nobody.path.unlink()
            missing = (nobody.peer_id, ["/ip4/127.0.0.1/tcp/9"])  # nothing listens there
            result = await download_state(
                client.p2p, [old, broken, wrong, *good, missing], run_id=m.run_id, stage=STAGE,
                piece_bytes=PIECE, timeout=60, call_timeout=10,
                layout_check=functools.partial(check_entries, target),
            )
            assert result.snapshot.digest == fresh.digest and result.snapshot.step == 2
            assert set(result.bytes_by_source) <= {pid for pid, _ in good}

    asyncio.run(main())


def test_all_sources_dead_raises_within_the_timeout():
    m = manifest()
    snap = snapshot_state(trained_computer(m, steps=1))

    async def main() -> None:
        async with hosts(2) as servers, hosts(1, client_mode=True) as (client,):
            sources = [await serve(s, StateServicer(m.run_id, STAGE, provider(snap))) for s in servers]
            for s in servers:
                await s.shutdown()
            started = time.monotonic()
            with pytest.raises(StateSyncError):
                await download_state(
                    client.p2p, sources, run_id=m.run_id, stage=STAGE, timeout=20, call_timeout=5
                )
            assert time.monotonic() - started < 20

    asyncio.run(main())


def test_every_source_dying_mid_download_raises():
    m = manifest()
    snap = snapshot_state(trained_computer(m, steps=1))

    async def main() -> None:
        async with hosts(2) as servers, hosts(1, client_mode=True) as (client,):
            victims = [DiesAfterFirstPiece(m.run_id, STAGE, provider(snap)) for _ in servers]
            sources = [await serve(s, v) for s, v in zip(servers, victims)]

            async def kill_all() -> None:
                for server, victim in zip(servers, victims):
                    await victim.served.wait()
                    await server.shutdown()

            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(kill_all())
                    download = group.create_task(download_state(
                        client.p2p, sources, run_id=m.run_id, stage=STAGE, piece_bytes=PIECE,
                        timeout=60, call_timeout=20,
                    ))
            except* StateSyncError as errors:
                assert "pieces missing" in str(errors.exceptions[0])
            else:
                pytest.fail(f"download succeeded without any source: {download.result()}")
            finally:
                for victim in victims:
                    victim.release.set()

    asyncio.run(main())


# --- bad requests --------------------------------------------------------------------------------------


def test_bad_range_requests_get_typed_errors_and_the_servicer_keeps_serving():
    m = manifest()
    computer = trained_computer(m, steps=1)
    snapshots = [snapshot_state(computer)]

    async def changing() -> StateSnapshot:
        return snapshots[-1]

    async def main() -> None:
        async with hosts(1) as (server,), hosts(1, client_mode=True) as (client,):
            servicer = StateServicer(m.run_id, STAGE, changing, keep=2, max_range_bytes=256 * 1024)
            pid, maddrs = await serve(server, servicer)
            stub = StateStub(client.p2p, pid, maddrs)

            async def expect(error: type, coro) -> None:
                with pytest.raises(error):
                    await asyncio.wait_for(coro, 30)

            info = await stub.info(m.run_id, STAGE)
            assert (info.step, info.digest) == (1, snapshots[0].digest)
            assert info.total_bytes == snapshots[0].total_bytes
            assert info.entries == snapshots[0].entries
            digest, total = info.digest, info.total_bytes

            await expect(UnknownRunError, stub.info("0" * 16, STAGE))
            await expect(BadRequestError, stub.info(m.run_id, 0))
            def fetch(offset: int, length: int, *, run_id=m.run_id, stage=STAGE, digest=digest):
                return stub.fetch_range(run_id, stage, digest, offset, length)

            await expect(UnknownRunError, fetch(0, 10, run_id="0" * 16))
            await expect(BadRequestError, fetch(0, 10, stage=0))
            await expect(BadRequestError, fetch(total - 5, 10))  # beyond the end
            await expect(BadRequestError, fetch(total, 1))
            await expect(BadRequestError, fetch(-1, 10))
            await expect(BadRequestError, fetch(0, 0))
            await expect(BadRequestError, fetch(0, 256 * 1024 + 1))  # longer than this servicer allows
            await expect(BadRequestError, fetch(0, MAX_RANGE_BYTES + 1))
            await expect(BadRequestError, fetch(0, 10, digest="not-a-digest"))
            await expect(UnknownStateError, fetch(0, 10, digest="0" * 64))

            # Malformed frames: an unknown frame type and a garbage message get protocol errors.
            unknown_frame = bytes([9]) + (4).to_bytes(4, "big") + b"junk"
            garbage_message = bytes([1]) + (3).to_bytes(4, "big") + b"\xc1\xc1\xc1"
            for junk in (unknown_frame, garbage_message):
                stream = await raw_stream(client, pid, maddrs)
                try:
                    stream.io.write(junk)
                    await stream.io.drain()
                    with pytest.raises(ProtocolError):
                        await asyncio.wait_for(stream.receive_message(proto.StateInfoReply), 30)
                finally:
                    await stream.close()

            # The source steps: a digest stays servable while it is among the `keep` most recently
            # used, so a download in progress keeps its snapshot alive; unused ones expire.
            snapshots.append(snapshot_state(trained_computer(m, steps=2)))
            assert (await stub.info(m.run_id, STAGE)).step == 2
            assert await stub.fetch_range(m.run_id, STAGE, digest, 0, 100) == bytes(snapshots[0].data[:100])
            snapshots.append(snapshot_state(trained_computer(m, steps=3)))
            assert (await stub.info(m.run_id, STAGE)).step == 3
            assert digest in servicer.held_digests and snapshots[1].digest not in servicer.held_digests
            snapshots.append(snapshot_state(trained_computer(m, steps=4)))
            latest = await stub.info(m.run_id, STAGE)
            assert latest.step == 4 and servicer.held_digests == [snapshots[2].digest, latest.digest]
            await expect(UnknownStateError, stub.fetch_range(m.run_id, STAGE, digest, 0, 100))

            # After all that, the servicer still serves a whole valid range.
            data = await stub.fetch_range(m.run_id, STAGE, latest.digest, total - 1000, 1000)
            assert data == bytes(snapshots[-1].data[total - 1000 :])

    asyncio.run(main())


async def raw_stream(client: SwarmDHT, peer_id: str, maddrs: list[str]) -> proto.StateStream:
    return await PeerDialer(client.p2p, peer_id, maddrs).open(proto.PROTOCOL, proto.StateStream)
