"""Serving one stage, from joining it to leaving it (on shutdown or to move to another stage).

Joining: build the stage from the manifest's seeded init; if the stage already has peers, announce
`joining` progress, download the stage's state from them (several sources, verified) and load it;
only then register the handlers and announce the stage record. Serving: heartbeat the record,
run the stage's collaborative steps (`StageAverager`), and periodically consider moving to the
bottleneck stage (`plan_move`). Leaving: withdraw (progress `left`), unregister, drain compute.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass

from swarmnet.averaging.allreduce import AllReduceServer
from swarmnet.averaging.collaborative import StageAverager
from swarmnet.averaging.state import check_entries, load_state, snapshot_state
from swarmnet.averaging.strategies import make_strategy
from swarmnet.averaging.sync import NoStateSourceError, download_state
from swarmnet.config import PeerConfig, RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import StageServerRecord
from swarmnet.dht.stages import read_stage, read_swarm
from swarmnet.errors import StateSyncError
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.serving import StageServing
from swarmnet.peer.throughput import measure_throughput
from swarmnet.pipeline.rebalance import move_delay, plan_move
from swarmnet.protocols.stage import StageServicer
from swarmnet.protocols.state import StateServicer
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)

SYNC_ATTEMPTS = 5


@dataclass(frozen=True)
class PeerContext:
    """What outlives a stage: the DHT host, the run, the data plane, the local config."""

    dht: SwarmDHT
    manifest: RunManifest
    config: PeerConfig
    allreduce: AllReduceServer
    metrics_addr: str | None
    launched: float


async def serve_stage(ctx: PeerContext, stage: int, stop: asyncio.Event) -> int | None:
    """Serves `stage` until `stop` (returns None) or until moving pays off (returns the new stage)."""
    dht, manifest, config = ctx.dht, ctx.manifest, ctx.config
    run_id = manifest.run_id
    computer = StageComputer(
        build_stage(manifest, stage), manifest.optimizer, target_batch_size=manifest.training.target_batch_size, device=config.device
    )
    meter = measure_throughput(computer, manifest, stage)
    strategy = make_strategy(computer, manifest.averaging)
    serving = StageServing(manifest, stage, computer, meter, config)
    executor = serving.executor

    async def resync(only: list[str] | None = None) -> None:
        """Downloads the stage's state from stage-mates (retrying while mates come and go, e.g.
        peers that are themselves joining or moving away) and loads it. If the stage turns out
        to have no other peer, we keep the state we have (the seeded init for a new stage)."""
        start = time.monotonic()
        for attempt in range(SYNC_ATTEMPTS):
            sources = [
                (info.peer_id, record.maddrs)
                for info, record in await read_stage(dht, run_id, stage)
                if info.peer_id != dht.peer_id and (only is None or info.peer_id in only)
            ]
            if not sources:
                return
            try:
                result = await download_state(
                    dht.p2p, sources, run_id=run_id, stage=stage, layout_check=functools.partial(check_entries, strategy.state_view())
                )
                break
            except StateSyncError as e:
                if attempt + 1 == SYNC_ATTEMPTS:
                    if isinstance(e, NoStateSourceError):
                        # Every announced mate refuses: they left or moved away. We are the stage
                        # now; a mate that comes back ahead of us makes us sync again.
                        logger.warning("stage %d: no stage-mate holds its state (%s); keeping ours", stage, e)
                        return
                    raise
                logger.info("stage %d: state sync attempt %d failed (%s); retrying", stage, attempt + 1, e)
                await asyncio.sleep(0.5 * 2**attempt)  # backoff while the stage's membership settles
        await executor.run(load_state, strategy.state_view(), result.snapshot)
        await executor.run(strategy.after_state_loaded)
        metrics.STATE_SYNC_SECONDS.observe(time.monotonic() - start)
        logger.info("stage %d: loaded state at step %d (%d bytes) in %.2f s", stage, strategy.epoch, len(result.snapshot.data), time.monotonic() - start)

    averager = StageAverager(
        dht=dht, manifest=manifest, stage=stage, strategy=strategy, executor=executor, server=ctx.allreduce, config=config, resync=resync
    )
    serving.on_backward = averager.notify
    snapshots = _SnapshotCache(lambda: executor.run(snapshot_state, strategy.state_view()), lambda: strategy.epoch)
    state_servicer = StateServicer(run_id=run_id, stage=stage, get_snapshot=snapshots.get)
    stage_servicer = StageServicer(serving)
    registered = False
    try:
        if any(info.peer_id != dht.peer_id for info, _ in await read_stage(dht, run_id, stage)):
            await averager.sync_from_mates()
        await stage_servicer.register(dht.p2p)
        await state_servicer.register(dht.p2p)
        registered = True
        await averager.publish_progress(force=True)
        maddrs = await dht.visible_maddrs()

        def record() -> StageServerRecord:
            metrics.QUEUE_DEPTH.set(serving.queue_depth)
            metrics.THROUGHPUT.set(meter.samples_per_s)
            return StageServerRecord(
                stage=stage,
                throughput=meter.samples_per_s,
                queue_depth=serving.queue_depth,
                device=config.device,
                memory_bytes=computer.memory_bytes,
                step=strategy.epoch,
                metrics_addr=ctx.metrics_addr,
                maddrs=maddrs,
                averaging_addr=f"{ctx.allreduce.host}:{ctx.allreduce.port}",
            )

        key = keys.stage_key(run_id, stage)
        if not await dht.put(key, record(), config.record_ttl):
            logger.warning("first announcement was not stored by any DHT node; will retry")
        await averager.refresh_digest()
        events.emit(
            "ready",
            role="peer",
            peer_id=dht.peer_id,
            stage=stage,
            run_id=run_id,
            step=averager.digest_epoch,
            digest=averager.digest,
            maddrs=maddrs,
            metrics=ctx.metrics_addr,
            throughput=meter.samples_per_s,
            startup_s=round(time.monotonic() - ctx.launched, 3),
            sockets=dht.p2pd_sockets(),
        )
        logger.info("serving stage %d as %s (%.1f samples/s)", stage, dht.peer_id, meter.samples_per_s)
        move = asyncio.Event()
        target: list[int] = []
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(_heartbeat(dht, key, record, config)),
                tasks.create_task(averager.run()),
            ]
            if config.rebalance_period:
                background.append(tasks.create_task(_rebalance(ctx, stage, move, target)))
            stopper = tasks.create_task(stop.wait())
            mover = tasks.create_task(move.wait())
            await asyncio.wait([stopper, mover], return_when=asyncio.FIRST_COMPLETED)
            for task in background + [stopper, mover]:
                task.cancel()
        if target:
            logger.info("moving from stage %d to stage %d", stage, target[0])
            events.emit("moving", role="peer", peer_id=dht.peer_id, stage=stage, to=target[0])
        return target[0] if target else None
    finally:
        await averager.publish_left()
        if registered:
            await _quietly(stage_servicer.unregister(dht.p2p))
            await _quietly(state_servicer.unregister(dht.p2p))
        serving.shutdown()


class _SnapshotCache:
    """One state snapshot per epoch, taken on the compute thread when first asked for."""

    def __init__(self, take, epoch):
        self._take = take
        self._epoch = epoch
        self._cached = None
        self._lock = asyncio.Lock()

    async def get(self):
        async with self._lock:
            if self._cached is None or self._cached.step != self._epoch():
                self._cached = await self._take()
            return self._cached


async def _heartbeat(dht: SwarmDHT, key: str, make_record, config: PeerConfig) -> None:
    while True:
        await asyncio.sleep(config.announce_period * random.uniform(0.8, 1.0))
        try:
            await dht.put(key, make_record(), config.record_ttl)
        except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried at the next period
            logger.warning("could not refresh the stage record: %s", e)


async def _rebalance(ctx: PeerContext, stage: int, move: asyncio.Event, target: list[int]) -> None:
    rng = random.Random()
    while True:
        await asyncio.sleep(move_delay(rng, ctx.config.rebalance_period))
        try:
            snapshot = await read_swarm(ctx.dht, ctx.manifest)
        except Exception as e:  # noqa: BLE001 - rebalancing is best effort
            logger.debug("could not read the swarm: %s", e)
            continue
        destination = plan_move(snapshot, ctx.dht.peer_id, margin=ctx.config.rebalance_margin)
        if destination is None or destination == stage:
            continue
        # Confirm after a short random pause with a fresh view: peers that decided at the same
        # moment see each other's moves and do not leave a stage empty in a herd.
        await asyncio.sleep(rng.uniform(0.0, 0.5) * ctx.config.rebalance_period)
        try:
            confirmed = plan_move(await read_swarm(ctx.dht, ctx.manifest), ctx.dht.peer_id, margin=ctx.config.rebalance_margin)
        except Exception as e:  # noqa: BLE001 - rebalancing is best effort
            logger.debug("could not re-read the swarm: %s", e)
            continue
        if confirmed == destination:
            target.append(destination)
            move.set()
            return


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception as e:  # noqa: BLE001 - p2pd may already be gone on shutdown
        logger.debug("ignored during shutdown: %s", e)
