"""The trainer's view of who serves each stage: DHT records cached for a few seconds."""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.utils import get_dht_time

from swarmnet.config import RunManifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.stages import read_stage_and_progress
from swarmnet.pipeline.snapshot import PeerInfo
from swarmnet.protocols.stage import StageStub

logger = logging.getLogger(__name__)


class StageDirectory:
    """Stage servers by stage, refreshed from the DHT when older than `max_age` or empty."""

    def __init__(self, dht: SwarmDHT, manifest: RunManifest, *, max_age: float = 5.0, compression: str = "none"):
        self.dht = dht
        self.manifest = manifest
        self.max_age = max_age
        self.compression = compression
        self._peers: dict[int, list[PeerInfo]] = {}
        self._stubs: dict[str, StageStub] = {}
        self._fetched_at: dict[int, float] = {}
        self._locks = {s: asyncio.Lock() for s in range(manifest.training.num_stages)}
        self._refreshing: dict[int, asyncio.Task] = {}
        training, model = manifest.training, manifest.model
        # Replies are activations or their gradients: never larger than one float32 microbatch.
        self._max_reply_bytes = training.microbatch_size * training.seq_len * max(model.d_model, model.vocab_size) * 4

    async def peers(self, stage: int, *, force: bool = False) -> list[PeerInfo]:
        """The stage's known peers. An empty view or `force` waits for a DHT read; a merely old
        view is returned at once and refreshed in the background, so a slow DHT answer (a node
        busy joining, a dead node's timeout) never stalls the pipeline."""
        if force or not self._peers.get(stage):
            async with self._locks[stage]:
                await self._refresh(stage)
        elif time.monotonic() - self._fetched_at.get(stage, -1e9) > self.max_age and stage not in self._refreshing:
            task = asyncio.create_task(self._refresh_locked(stage), name=f"directory-refresh-{stage}")
            self._refreshing[stage] = task
            task.add_done_callback(lambda _: self._refreshing.pop(stage, None))
        return self._peers.get(stage, [])

    async def close(self) -> None:
        """Cancels background refreshes (before the DHT shuts down)."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _refresh_locked(self, stage: int) -> None:
        async with self._locks[stage]:
            await self._refresh(stage)

    def stub(self, peer_id: str) -> StageStub:
        return self._stubs[peer_id]

    async def _refresh(self, stage: int) -> None:
        """Merges fresh records with known ones; a peer is forgotten when its record expires or
        when it announces that it left or is leaving the stage."""
        now = get_dht_time()
        known = {p.peer_id: p for p in self._peers.get(stage, []) if p.expires_at > now}
        try:
            found, progress = await read_stage_and_progress(self.dht, self.manifest, stage)
        except Exception as e:  # a failed DHT read leaves the known peers in place
            logger.warning("could not read stage %d from the DHT: %s", stage, e)
            found, progress = [], []
        for signed in progress:
            if signed.record.left or signed.record.leaving:
                known.pop(signed.peer_id, None)
        network = self.manifest.network
        for info, record in found:
            known[info.peer_id] = info
            stub = self._stubs.get(info.peer_id)
            if stub is None or stub.maddrs != record.maddrs or stub.data_addr != record.averaging_addr:
                self._stubs[info.peer_id] = StageStub(
                    self.dht.p2p,
                    info.peer_id,
                    record.maddrs,
                    compression=self.compression,
                    max_reply_bytes=self._max_reply_bytes,
                    data_addr=record.averaging_addr,
                    direct=self.dht.direct,
                    auto_thresholds=(network.auto_fp16_below_mbps, network.auto_int8_below_mbps),
                )
        if not found and known:
            logger.info("stage %d: DHT returned no records; keeping %d known peers", stage, len(known))
        self._peers[stage] = list(known.values())
        self._fetched_at[stage] = time.monotonic()
