"""Composition root of the coordinator: bootstrap DHT node, manifest publisher, swarm observer.

The coordinator is not on the training path: it publishes the signed manifest (refreshing it well
before it expires) and watches the swarm; peers and trainers talk to each other directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from swarmnet.config import RunManifest
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import MANIFEST_TTL, publish_manifest
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
) -> None:
    dht = await SwarmDHT.create(
        identity=identity, initial_peers=initial_peers, host=host, port=port, check_identity=bool(initial_peers)
    )
    async with dht:
        await publish_manifest(dht, manifest)
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
            await stop.wait()
            publisher.cancel()
            observer.cancel()
    events.emit("stopped", role="coordinator", peer_id=identity.peer_id)


async def _republish(dht: SwarmDHT, manifest: RunManifest) -> None:
    while True:
        await asyncio.sleep(MANIFEST_TTL / 4)
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
