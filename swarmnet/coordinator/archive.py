"""The coordinator's archive of every stage's state, so that a stage whose peers all left comes back.

Every `period` the archive looks at each stage's announced step; when a stage is further along than
the archived copy, it downloads the stage's state from the stage's peers (the same verified,
multi-source download a joining peer uses), saves it atomically to disk (`CheckpointStore`), and
serves it over the state protocol. An `ArchiveRecord` in the DHT says which steps it holds; a peer
joining a stage with no live peers restores from it when it is newer than its own checkpoint.

The archive never builds the model: it stores verified bytes (digest-checked on download and on
disk), and the peer that restores checks the layout against its own stage before loading.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from swarmnet.averaging.state import StateSnapshot
from swarmnet.averaging.sync import download_state
from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import ArchivedStage, ArchiveRecord
from swarmnet.dht.stages import read_stage
from swarmnet.errors import PeerUnavailableError, SwarmnetError
from swarmnet.peer.checkpoint import CheckpointStore
from swarmnet.protocols.state import StateRouter, StateServicer
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)


class StageArchive:
    def __init__(self, dht: SwarmDHT, manifest: RunManifest, root: Path, *, period: float = 30.0, keep: int = 2):
        self.dht = dht
        self.manifest = manifest
        self.run_id = manifest.run_id
        self.period = period
        self.store = CheckpointStore(root, manifest.run_id, keep=keep)
        self.held: dict[int, StateSnapshot] = {}
        self.router = StateRouter()
        for stage in range(manifest.training.num_stages):
            self.router.add(StateServicer(self.run_id, stage, lambda s=stage: self._snapshot(s)))

    async def _snapshot(self, stage: int) -> StateSnapshot:
        snapshot = self.held.get(stage)
        if snapshot is None:
            raise PeerUnavailableError(f"the archive holds no state of stage {stage} yet")
        return snapshot

    async def start(self) -> None:
        """Loads what earlier runs of the coordinator archived, starts serving it."""
        for stage in range(self.manifest.training.num_stages):
            snapshot = await asyncio.to_thread(self.store.latest, stage)
            if snapshot is not None:
                self._hold(stage, snapshot)
                logger.info("archive: stage %d at step %d from %s", stage, snapshot.step, self.store.run_dir)
        await self.router.register(self.dht.p2p)

    def _hold(self, stage: int, snapshot: StateSnapshot) -> None:
        self.held[stage] = snapshot
        metrics.ARCHIVED_STEP.labels(stage=str(stage)).set(snapshot.step)

    async def run(self) -> None:
        """Archives and announces every `period` until cancelled."""
        while True:
            for stage in range(self.manifest.training.num_stages):
                try:
                    await self.archive_stage(stage)
                except (SwarmnetError, OSError, TimeoutError) as e:
                    logger.warning("archive: stage %d not archived this time: %s", stage, e)
            try:
                await self.announce()
            except Exception as e:  # noqa: BLE001 - retried at the next period
                logger.warning("archive: could not announce: %s", e)
            await asyncio.sleep(self.period)

    async def archive_stage(self, stage: int) -> bool:
        """Downloads `stage`'s state if its peers are past the archived step; True if it did."""
        found = await read_stage(self.dht, self.manifest, stage)
        held = self.held.get(stage)
        held_step = held.step if held is not None else -1
        if not found or max(info.step for info, _ in found) <= held_step:
            return False
        sources = [(info.peer_id, record.maddrs, record.averaging_addr) for info, record in found]
        result = await download_state(self.dht.p2p, sources, run_id=self.run_id, stage=stage, direct=self.dht.direct)
        snapshot = result.snapshot
        if snapshot.step <= held_step:
            return False
        await asyncio.to_thread(self.store.save, stage, snapshot)
        self._hold(stage, snapshot)
        logger.info("archive: stage %d at step %d (%d bytes)", stage, snapshot.step, snapshot.total_bytes)
        events.emit("archived", stage=stage, step=snapshot.step, digest=snapshot.digest)
        return True

    async def announce(self) -> None:
        if not self.held:
            return
        record = ArchiveRecord(
            stages=[ArchivedStage(stage=s, step=h.step, digest=h.digest) for s, h in sorted(self.held.items())],
            maddrs=await self.dht.visible_maddrs(),
        )
        await self.dht.put(keys.archive_key(self.run_id), record, max(3 * self.period, 30.0))
