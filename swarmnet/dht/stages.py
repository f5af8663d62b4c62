"""Reading stage and expert servers from the DHT into the pure snapshot types of `swarmnet.pipeline`.

Functions that take a `unit` serve stages and experts alike (see `swarmnet.models.moe` for units):
a stage's servers live under its stage key, an expert's under its MoE layer's prefix key.
"""

from __future__ import annotations

import asyncio
import logging

from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import SignedRecord, StageServerRecord
from swarmnet.models.moe import expert_uids, layer_prefix, parse_uid, uid_of, unit_of
from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot

logger = logging.getLogger(__name__)


def server_key(manifest: RunManifest, unit: int) -> str:
    """Where the servers of `unit` announce themselves."""
    uid = uid_of(manifest, unit)
    if uid is None:
        return keys.stage_key(manifest.run_id, unit)
    return keys.expert_key(manifest.run_id, layer_prefix(parse_uid(uid)[0]))


async def read_stage(dht: SwarmDHT, manifest: RunManifest, stage: int) -> list[tuple[PeerInfo, StageServerRecord]]:
    """Live servers of one unit (a stage or an expert), each as a routing snapshot and its full
    record. A peer that announced it left the unit (shut down or moved) or is leaving it is dropped
    at once, though its server record lives on until it expires."""
    return (await read_stage_and_progress(dht, manifest, stage))[0]


async def read_stage_and_progress(
    dht: SwarmDHT, manifest: RunManifest, stage: int, *, include_leaving: bool = False
) -> tuple[list[tuple[PeerInfo, StageServerRecord]], list[SignedRecord]]:
    """`read_stage`, plus the unit's progress records it read on the way. `include_leaving` keeps
    peers that are draining before they leave (stage-mates still average with them)."""
    run_id = manifest.run_id
    servers, progress = await asyncio.gather(
        dht.get(server_key(manifest, stage)), dht.get(keys.progress_key(run_id, stage))
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
        info = _info(signed, record)
        if info is not None:
            found.append((info, record))
    return found, progress


def _info(signed: SignedRecord, record: StageServerRecord) -> PeerInfo | None:
    try:
        return PeerInfo(
            peer_id=signed.peer_id,
            stage=record.stage,
            throughput=record.throughput,
            queue_depth=record.queue_depth,
            step=record.step,
            expires_at=signed.expiration,
        )
    except ValueError as e:
        logger.debug("ignoring record of %s: %s", signed.peer_id, e)
        return None


async def read_experts(
    dht: SwarmDHT, manifest: RunManifest, layer: int
) -> dict[str, list[tuple[PeerInfo, StageServerRecord]]]:
    """Prefix search: the announced servers of every expert of MoE layer `layer`, by uid, from one
    DHT read. Records whose uid and unit disagree, or name another layer, are ignored."""
    prefix = layer_prefix(layer)
    found: dict[str, list[tuple[PeerInfo, StageServerRecord]]] = {}
    uids = set(expert_uids(manifest))
    for signed in await dht.get(keys.expert_key(manifest.run_id, prefix)):
        record = signed.record
        uid = record.expert
        if uid not in uids or not uid.startswith(prefix) or unit_of(manifest, uid) != record.stage:
            continue
        info = _info(signed, record)
        if info is not None:
            found.setdefault(uid, []).append((info, record))
    return found


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
    per_stage = await asyncio.gather(*(read_stage(dht, manifest, s) for s in stages))
    peers = tuple(info for found in per_stage for info, _ in found)
    return SwarmSnapshot(num_stages=manifest.training.num_stages, peers=peers)
