"""Composition root of the coordinator: bootstrap DHT node, manifest publisher, swarm observer.

The coordinator is not on the training path: it publishes the signed manifest (refreshing it well
before it expires) and watches the swarm; peers and trainers talk to each other directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from swarmnet.config import RunManifest
from swarmnet.coordinator.archive import StageArchive
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import MANIFEST_REFRESH, publish_manifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.stages import read_swarm
from swarmnet.telemetry import events

logger = logging.getLogger(__name__)


async def run_coordinator(
    *,
    manifest: RunManifest,
    identity: Identity,
    host: str,
    port: int,
    initial_peers: Sequence[str],
    stop: asyncio.Event,
    observe_period: float = 10.0,
    archive_dir: str | None = None,
    archive_period: float = 30.0,
) -> None:
    dht = await SwarmDHT.create(identity=identity, initial_peers=initial_peers, host=host, port=port)
    async with dht:
        await publish_manifest(dht, manifest)
        archive = None
        if archive_dir is not None:
            archive = StageArchive(dht, manifest, Path(archive_dir), period=archive_period)
            await archive.start()
        maddrs = await dht.visible_maddrs()
        logger.info("run %s (%s) published by %s", manifest.run_id, manifest.name, dht.peer_id)
        for maddr in maddrs:
            print(f"coordinator listening on {maddr}", flush=True)
        print(f"join with: swarmnet join --initial-peers {maddrs[0]} --stage auto", flush=True)
        events.emit(
            "ready",
            role="coordinator",
            peer_id=dht.peer_id,
            run_id=manifest.run_id,
            maddrs=maddrs,
            sockets=dht.p2pd_sockets(),
        )
        async with asyncio.TaskGroup() as tasks:
            publisher = tasks.create_task(_republish(dht, manifest))
            observer = tasks.create_task(_observe(dht, manifest, observe_period))
            archiver = tasks.create_task(archive.run()) if archive is not None else None
            await stop.wait()
            for task in (publisher, observer, archiver):
                if task is not None:
                    task.cancel()
    events.emit("stopped", role="coordinator", peer_id=identity.peer_id)


async def _republish(dht: SwarmDHT, manifest: RunManifest) -> None:
    while True:
        await asyncio.sleep(MANIFEST_REFRESH)
        try:
            if not await publish_manifest(dht, manifest):
                logger.warning("manifest refresh was not stored by any DHT node")
        except Exception as e:  # retried at the next period, long before the record expires
            logger.warning("could not refresh the manifest: %s", e)


async def _observe(dht: SwarmDHT, manifest: RunManifest, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            snapshot = await read_swarm(dht, manifest)
        except Exception as e:  # observation is best effort
            logger.debug("could not read the swarm: %s", e)
            continue
        throughput = snapshot.stage_throughput()
        per_stage = snapshot.by_stage()
        summary = ", ".join(
            f"stage {s}: {len(per_stage[s])} peers {throughput[s]:.1f}/s" for s in range(snapshot.num_stages)
        )
        logger.info("swarm: %s", summary)
        events.emit("swarm", peers=[len(per_stage[s]) for s in range(snapshot.num_stages)], throughput=throughput)
