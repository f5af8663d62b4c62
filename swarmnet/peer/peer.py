"""Composition root of the peer role: join the DHT, read the manifest, pick a stage, serve it.

Lifecycle: DHT up → verified manifest → stage chosen → stage built with the manifest's seeded init
→ throughput measured → handler registered → record announced (and refreshed) → serve until `stop`
→ handler removed, compute drained, DHT and p2pd shut down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from swarmnet.config import PeerConfig, RunManifest
from swarmnet.dht import keys
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import fetch_manifest, peer_ids_of
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import StageServerRecord
from swarmnet.dht.stages import read_swarm
from swarmnet.errors import ConfigError
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.serving import StageServing
from swarmnet.peer.throughput import measure_throughput
from swarmnet.pipeline.stage_choice import choose_stage
from swarmnet.protocols.stage import StageServicer
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)


async def run_peer(
    *,
    config: PeerConfig,
    initial_peers: Sequence[str],
    stage: int | None,
    run_id: str | None,
    identity: Identity,
    stop: asyncio.Event,
) -> None:
    """Serves one stage until `stop` is set. `stage=None` means auto (the bottleneck stage)."""
    launched = time.monotonic()
    dht = await SwarmDHT.create(identity=identity, initial_peers=initial_peers, host=config.host, port=config.port)
    async with dht:
        manifest = await fetch_manifest(dht, run_id=run_id, preferred_signers=peer_ids_of(initial_peers), timeout=config.manifest_timeout
        )
        num_stages = manifest.training.num_stages
        if stage is None:
            stage = choose_stage(await read_swarm(dht, manifest), random.Random())
        elif not 0 <= stage < num_stages:
            raise ConfigError(f"--stage {stage} is outside 0..{num_stages - 1} for run {manifest.run_id}")
        logger.info("run %s (%s): serving stage %d of %d", manifest.run_id, manifest.name, stage, num_stages)

        computer = StageComputer(
            build_stage(manifest, stage),
            manifest.optimizer,
            target_batch_size=manifest.training.target_batch_size,
            device=config.device,
        )
        meter = measure_throughput(computer, manifest, stage)
        serving = StageServing(manifest, stage, computer, meter, config)
        servicer = StageServicer(serving)
        metrics_addr = metrics.serve_metrics(config.host, config.metrics_port)
        try:
            await servicer.register(dht.p2p)
            maddrs = await dht.visible_maddrs()

            def current_record() -> StageServerRecord:
                metrics.QUEUE_DEPTH.set(serving.queue_depth)
                metrics.THROUGHPUT.set(meter.samples_per_s)
                return StageServerRecord(
                    stage=stage,
                    throughput=meter.samples_per_s,
                    queue_depth=serving.queue_depth,
                    device=config.device,
                    memory_bytes=computer.memory_bytes,
                    step=computer.step,
                    metrics_addr=metrics_addr,
                    maddrs=maddrs,
                )

            key = keys.stage_key(manifest.run_id, stage)
            if not await dht.put(key, current_record(), config.record_ttl):
                logger.warning("first announcement was not stored by any DHT node; will retry")
            events.emit(
                "ready",
                role="peer",
                peer_id=dht.peer_id,
                stage=stage,
                run_id=manifest.run_id,
                maddrs=maddrs,
                metrics=metrics_addr,
                throughput=meter.samples_per_s,
                startup_s=round(time.monotonic() - launched, 3),
                sockets=dht.p2pd_sockets(),
            )
            logger.info("serving stage %d as %s (%.1f samples/s)", stage, dht.peer_id, meter.samples_per_s)
            async with asyncio.TaskGroup() as tasks:
                announcer = tasks.create_task(_announce_forever(dht, key, current_record, config))
                await stop.wait()
                announcer.cancel()
        finally:
            await _try_unregister(servicer, dht)
            serving.shutdown()
    events.emit("stopped", role="peer", peer_id=identity.peer_id, step=computer.step)


async def _announce_forever(dht: SwarmDHT, key: str, make_record, config: PeerConfig) -> None:
    while True:
        await asyncio.sleep(config.announce_period * random.uniform(0.8, 1.0))
        try:
            await dht.put(key, make_record(), config.record_ttl)
        except Exception as e:  # a failed heartbeat is retried at the next period
            logger.warning("could not refresh the stage record: %s", e)


async def _try_unregister(servicer: StageServicer, dht: SwarmDHT) -> None:
    try:
        await servicer.unregister(dht.p2p)
    except Exception as e:  # p2pd may already be gone on shutdown
        logger.debug("could not remove the stream handler: %s", e)

