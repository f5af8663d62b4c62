"""Composition root of the coordinator: bootstrap DHT node, manifest publisher, swarm observer.

The coordinator is not on the training path: it publishes the signed manifest (refreshing it well
before it expires) and watches the swarm; peers and trainers talk to each other directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import REGISTRY

from swarmnet.config import RunManifest
from swarmnet.coordinator.archive import StageArchive
from swarmnet.coordinator.http import StatusServer
from swarmnet.coordinator.view import SwarmCollector, SwarmHistory, read_view
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import MANIFEST_REFRESH, publish_manifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.protocols.access import AccessPolicy
from swarmnet.protocols.access import describe as describe_access
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)


async def run_coordinator(
    *,
    manifest: RunManifest,
    identity: Identity,
    host: str,
    port: int,
    initial_peers: Sequence[str],
    stop: asyncio.Event,
    observe_period: float = 5.0,
    archive_dir: str | None = None,
    archive_period: float = 30.0,
    http_host: str | None = None,
    http_port: int | None = 0,
    join_token: str | None = None,
) -> None:
    history = SwarmHistory()
    status = None
    if http_port is not None:
        status = StatusServer(history, http_host or host, http_port, refresh=max(2, round(observe_period)))
    collector = SwarmCollector(history)
    REGISTRY.register(collector)
    try:
        dht = await SwarmDHT.create(identity=identity, initial_peers=initial_peers, host=host, port=port)
        async with dht:
            policy = AccessPolicy.for_run(manifest, join_token, identity.peer_id)
            policy.check_self()
            dht.use_access(policy)  # before the archive and the observer read or serve anything
            await _serve(dht, manifest, history, status, stop, observe_period, archive_dir, archive_period)
    finally:
        REGISTRY.unregister(collector)
        if status is not None:
            status.close()
    events.emit("stopped", role="coordinator", peer_id=identity.peer_id)


async def _serve(
    dht: SwarmDHT,
    manifest: RunManifest,
    history: SwarmHistory,
    status: StatusServer | None,
    stop: asyncio.Event,
    observe_period: float,
    archive_dir: str | None,
    archive_period: float,
) -> None:
    await publish_manifest(dht, manifest)
    archive = None
    if archive_dir is not None:
        archive = StageArchive(dht, manifest, Path(archive_dir), period=archive_period)
        await archive.start()
    maddrs = await dht.visible_maddrs()
    logger.info("run %s (%s) published by %s", manifest.run_id, manifest.name, dht.peer_id)
    if manifest.access.private:
        print(f"run {manifest.run_id} ({manifest.name}) is {describe_access(manifest.access)}", flush=True)
    for maddr in maddrs:
        print(f"coordinator listening on {maddr}", flush=True)
    print(f"join with: swarmnet join --initial-peers {maddrs[0]} --stage auto", flush=True)
    http = None
    if status is not None:
        status.bootstrap = {"run_id": manifest.run_id, "peer_id": dht.peer_id, "maddrs": maddrs}
        http = status.start().address
        print(f"status page: http://{http}/  (metrics: /metrics, Prometheus service discovery: /sd)", flush=True)
    events.emit(
        "ready",
        role="coordinator",
        peer_id=dht.peer_id,
        run_id=manifest.run_id,
        maddrs=maddrs,
        sockets=dht.p2pd_sockets(),
        http=http,
    )
    async with asyncio.TaskGroup() as tasks:
        publisher = tasks.create_task(_republish(dht, manifest))
        observer = tasks.create_task(_observe(dht, manifest, history, observe_period))
        archiver = tasks.create_task(archive.run()) if archive is not None else None
        await stop.wait()
        for task in (publisher, observer, archiver):
            if task is not None:
                task.cancel()


async def _republish(dht: SwarmDHT, manifest: RunManifest) -> None:
    while True:
        await asyncio.sleep(MANIFEST_REFRESH)
        try:
            if not await publish_manifest(dht, manifest):
                logger.warning("manifest refresh was not stored by any DHT node")
        except Exception as e:  # retried at the next period, long before the record expires
            logger.warning("could not refresh the manifest: %s", e)


async def _observe(dht: SwarmDHT, manifest: RunManifest, history: SwarmHistory, period: float) -> None:
    """Reads the swarm every `period` seconds into `history` (the status page, `/sd` and the
    `swarmnet_swarm_*` metrics all show its latest view)."""
    while True:
        try:
            view = await read_view(dht, manifest)
        except Exception as e:  # observation is best effort; the next one may succeed
            metrics.SWARM_OBSERVATIONS.labels("failed").inc()
            logger.debug("could not read the swarm: %s", e)
        else:
            metrics.SWARM_OBSERVATIONS.labels("ok").inc()
            for event in history.update(view):
                (logger.warning if event.failure else logger.info)("swarm: %s", event.message)
            summary = ", ".join(f"stage {s.stage}: {len(s.peers)} peers {s.throughput:.1f}/s" for s in view.stages)
            logger.debug("swarm: %s", summary)
            events.emit(
                "swarm",
                peers=[len(s.peers) for s in view.stages],
                throughput=[s.throughput for s in view.stages],
                trainers=len(view.trainers),
                global_step=view.global_step,
            )
        await asyncio.sleep(period)
