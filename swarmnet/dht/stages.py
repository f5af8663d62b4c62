"""Reading stage servers from the DHT into the pure snapshot types of `swarmnet.pipeline`."""

from __future__ import annotations

import asyncio
import logging

from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import SignedRecord, StageServerRecord
from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot

logger = logging.getLogger(__name__)


async def read_stage(dht: SwarmDHT, run_id: str, stage: int) -> list[tuple[PeerInfo, StageServerRecord]]:
    """Live servers of one stage, each as a routing snapshot and its full record. A peer that
    announced it left the stage (shut down or moved) or is leaving it is dropped at once, though its
    server record lives on until it expires."""
    return (await read_stage_and_progress(dht, run_id, stage))[0]


async def read_stage_and_progress(
    dht: SwarmDHT, run_id: str, stage: int, *, include_leaving: bool = False
) -> tuple[list[tuple[PeerInfo, StageServerRecord]], list[SignedRecord]]:
    """`read_stage`, plus the stage's progress records it read on the way. `include_leaving` keeps
    peers that are draining before they leave (stage-mates still average with them)."""
    servers, progress = await asyncio.gather(
        dht.get(keys.stage_key(run_id, stage)), dht.get(keys.progress_key(run_id, stage))
    )
    gone = {
        signed.peer_id
        for signed in progress
        if signed.record.left or (signed.record.leaving and not include_leaving)
    }
    found = []
    for signed in servers:
        if signed.peer_id in gone:
            continue
        record = signed.record
        if record.stage != stage:
            continue
        try:
            info = PeerInfo(
                peer_id=signed.peer_id,
                stage=stage,
                throughput=record.throughput,
                queue_depth=record.queue_depth,
                step=record.step,
                expires_at=signed.expiration,
            )
        except ValueError as e:
            logger.debug("ignoring record of %s: %s", signed.peer_id, e)
            continue
        found.append((info, record))
    return found, progress


async def read_archives(dht: SwarmDHT, run_id: str, stage: int) -> list[tuple[str, list[str], int]]:
    """Nodes that archive `stage`'s state, as (peer id, multiaddrs, archived step), newest first."""
    found = []
    for signed in await dht.get(keys.archive_key(run_id)):
        for archived in signed.record.stages:
            if archived.stage == stage:
                found.append((signed.peer_id, signed.record.maddrs, archived.step))
    return sorted(found, key=lambda a: -a[2])


async def read_swarm(dht: SwarmDHT, manifest: RunManifest) -> SwarmSnapshot:
    """A snapshot of every stage's announced servers."""
    stages = range(manifest.training.num_stages)
    per_stage = await asyncio.gather(*(read_stage(dht, manifest.run_id, s) for s in stages))
    peers = tuple(info for found in per_stage for info, _ in found)
    return SwarmSnapshot(num_stages=manifest.training.num_stages, peers=peers)
