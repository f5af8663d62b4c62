"""Serving one stage, from joining it to leaving it (on shutdown or to move to another stage).

Joining: build the stage from the manifest's seeded init, then take the newest state there is: the
stage-mates' (announce `joining`, download from several of them, verified), or — when this peer's
own checkpoint is newer, or the stage has no peers — the local checkpoint or the coordinator's
archive, whichever is further along. Only then register the handlers and announce the stage record.
Serving: heartbeat the record, run the stage's collaborative steps (`StageAverager`), save a
checkpoint after every `checkpoint_every` steps, and periodically consider moving to the bottleneck
stage (`plan_move`). Leaving (SIGTERM or a move): drain — announce `leaving` so trainers send no new
work, answer the backwards of microbatches already here, let a round in progress finish — then hand
the gradients accumulated towards the next step to a stage-mate (so their samples still count), save
a last checkpoint, announce `left`, unregister and stop compute.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from swarmnet.averaging.allreduce import AllReduceServer
from swarmnet.averaging.collaborative import StageAverager
from swarmnet.averaging.state import check_entries, load_state, snapshot_state
from swarmnet.averaging.strategies import make_strategy
from swarmnet.averaging.sync import NoStateSourceError, download_state
from swarmnet.config import PeerConfig, RunManifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import StageServerRecord
from swarmnet.dht.stages import read_archives, read_stage, read_swarm, server_key
from swarmnet.errors import StateSyncError
from swarmnet.models.moe import NoExperts, attach_experts, moe_layers, uid_of
from swarmnet.models.partition import build_unit, unit_batch_size
from swarmnet.peer.checkpoint import CheckpointStore
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.experts import RemoteExperts
from swarmnet.peer.serving import StageServing
from swarmnet.peer.throughput import measure_throughput
from swarmnet.pipeline.rebalance import move_delay, plan_move
from swarmnet.protocols.addresses import announced_host
from swarmnet.protocols.stage import PROTOCOL as STAGE_PROTOCOL
from swarmnet.protocols.stage import StageServicer
from swarmnet.protocols.state import PROTOCOL as STATE_PROTOCOL
from swarmnet.protocols.state import StateServicer
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)

SYNC_ATTEMPTS = 5


@dataclass
class PeerContext:
    """What outlives a stage: the DHT host, the run, the data plane, the local config."""

    dht: SwarmDHT
    manifest: RunManifest
    config: PeerConfig
    allreduce: AllReduceServer
    metrics_addr: str | None
    launched: float
    moved_at: float | None = None
    """When (monotonic) this peer last moved to another stage."""


async def serve_stage(ctx: PeerContext, stage: int, stop: asyncio.Event) -> int | None:
    """Serves unit `stage` — a pipeline stage, or an expert (units from `num_stages` on) — until
    `stop` (returns None) or until moving pays off (returns the new stage; experts never move)."""
    dht, manifest, config = ctx.dht, ctx.manifest, ctx.config
    run_id = manifest.run_id

    uid = uid_of(manifest, stage)  # an expert's uid; None for a pipeline stage

    def build():
        module = build_unit(manifest, stage)
        computer = StageComputer(module, manifest.optimizer, target_batch_size=unit_batch_size(manifest, stage), device=config.device)
        gates = moe_layers(module)
        if gates:  # the probe times the stage without its experts (they are measured on their own peers)
            computer.moe = attach_experts(module, NoExperts(manifest.model.moe.num_experts))
        meter = measure_throughput(computer, manifest, stage)
        return computer, meter, make_strategy(computer, manifest.averaging), [gate.layer for gate in gates]

    # Off the event loop: we are in the DHT already, and other nodes' requests to us (and so
    # their own DHT reads) must not wait for model construction, lazy torch imports or the probe.
    computer, meter, strategy, gate_layers = await asyncio.to_thread(build)
    experts = None
    if gate_layers:  # this stage holds MoE gates: their experts are other peers
        experts = RemoteExperts(dht, manifest, gate_layers, loop=asyncio.get_running_loop())
        computer.moe = attach_experts(computer.module, experts)
    serving = StageServing(manifest, stage, computer, meter, config)
    executor = serving.executor

    async def load(snapshot, source: str) -> None:
        await executor.run(load_state, strategy.state_view(), snapshot)
        await executor.run(strategy.after_state_loaded)
        logger.info("stage %d: loaded state at step %d from %s", stage, strategy.epoch, source)

    async def download(sources: list[tuple[str, list[str], str | None]]):
        return await download_state(
            dht.p2p,
            sources,
            run_id=run_id,
            stage=stage,
            layout_check=functools.partial(check_entries, strategy.state_view()),
            direct=dht.direct,
        )

    async def resync(only: list[str] | None = None) -> None:
        """Downloads the stage's state from stage-mates (retrying while mates come and go, e.g.
        peers that are themselves joining or moving away) and loads it. If the stage turns out
        to have no other peer, we keep the state we have (the seeded init for a new stage)."""
        start = time.monotonic()
        for attempt in range(SYNC_ATTEMPTS):
            sources = [
                (info.peer_id, record.maddrs, record.averaging_addr)
                for info, record in await read_stage(dht, manifest, stage)
                if info.peer_id != dht.peer_id and (only is None or info.peer_id in only)
            ]
            if not sources:
                return
            try:
                result = await download(sources)
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
        await load(result.snapshot, f"{len(result.bytes_by_source)} stage-mate(s)")
        metrics.STATE_SYNC_SECONDS.observe(time.monotonic() - start)
        metrics.STATE_SYNC_BYTES.inc(sum(result.bytes_by_source.values()))
        logger.info("stage %d: synced %d bytes in %.2f s", stage, len(result.snapshot.data), time.monotonic() - start)

    store = CheckpointStore(Path(config.checkpoint_dir), run_id, keep=config.checkpoint_keep) if config.checkpoint_dir else None

    async def restore() -> str:
        """Loads the newest state available for joining the stage; returns where it came from."""
        mates = [(info, record) for info, record in await read_stage(dht, manifest, stage) if info.peer_id != dht.peer_id]
        local = await asyncio.to_thread(store.latest, stage) if store is not None else None
        local_step = local.step if local is not None else -1
        if mates:
            if local_step > max(info.step for info, _ in mates) and await load_local(local):
                return "checkpoint"
            await averager.sync_from_mates()
            return "peers"
        archives = [a for a in await read_archives(dht, run_id, stage) if a[2] > max(local_step, 0)]
        if archives:
            try:
                result = await download([(peer_id, maddrs) for peer_id, maddrs, _ in archives])
                await load(result.snapshot, "the archive")
                return "archive"
            except StateSyncError as e:
                logger.warning("stage %d: could not restore from the archive (%s)", stage, e)
        if local is not None and await load_local(local):
            return "checkpoint"
        return "init"

    async def load_local(snapshot) -> bool:
        try:
            await load(snapshot, "the local checkpoint")
            return True
        except StateSyncError as e:  # e.g. written by another version of the model code
            logger.warning("stage %d: ignoring the local checkpoint at step %d: %s", stage, snapshot.step, e)
            return False

    averager = StageAverager(
        dht=dht, manifest=manifest, stage=stage, strategy=strategy, executor=executor, server=ctx.allreduce, config=config, resync=resync
    )
    serving.on_backward = averager.notify
    snapshots = _SnapshotCache(lambda: executor.run(snapshot_state, strategy.state_view()), lambda: strategy.epoch)
    state_servicer = StateServicer(run_id=run_id, stage=stage, get_snapshot=snapshots.get)
    stage_servicer = StageServicer(serving)
    checkpoints = _Checkpointer(store, stage, snapshots, lambda: strategy.epoch, config.checkpoint_every)
    registered = False
    try:
        origin = await restore()
        await stage_servicer.register(dht.p2p)
        await state_servicer.register(dht.p2p)
        if ctx.allreduce.direct is not None:
            stage_servicer.register_direct(ctx.allreduce.direct)
            state_servicer.register_direct(ctx.allreduce.direct)
        registered = True
        await averager.publish_progress(force=True)
        maddrs = await dht.visible_maddrs()
        # A data plane bound to every interface is announced at an address stage-mates can reach.
        averaging_addr = f"{announced_host(ctx.allreduce.host, maddrs)}:{ctx.allreduce.port}"

        def record() -> StageServerRecord:
            metrics.QUEUE_DEPTH.set(serving.queue_depth)
            metrics.THROUGHPUT.set(meter.samples_per_s)
            metrics.OPTIMIZER_STEP.set(strategy.epoch)
            return StageServerRecord(
                stage=stage,
                throughput=meter.samples_per_s,
                queue_depth=serving.queue_depth,
                device=config.device,
                memory_bytes=computer.memory_bytes,
                step=strategy.epoch,
                metrics_addr=ctx.metrics_addr,
                maddrs=maddrs,
                averaging_addr=averaging_addr,
                expert=uid,
                failed_rounds=averager.failed_rounds,
            )

        key = server_key(manifest, stage)
        metrics.set_peer_info(
            run_id=run_id, unit=stage, stage=None if uid else stage, expert=uid, device=config.device
        )
        if experts is not None:
            await experts.refresh()
        if not await dht.put(key, record(), config.record_ttl):
            logger.warning("first announcement was not stored by any DHT node; will retry")
        await averager.refresh_digest()
        print(
            f"serving {uid or f'stage {stage}'} as {dht.peer_id}: measured {meter.samples_per_s:.1f} "
            f"{'tokens' if uid else 'samples'}/s, state from {origin}",
            flush=True,
        )
        events.emit(
            "ready",
            role="peer",
            peer_id=dht.peer_id,
            stage=stage,
            expert=uid,
            run_id=run_id,
            step=averager.digest_epoch,
            digest=averager.digest,
            origin=origin,
            maddrs=maddrs,
            metrics=ctx.metrics_addr,
            throughput=meter.samples_per_s,
            startup_s=round(time.monotonic() - ctx.launched, 3),
            sockets=dht.p2pd_sockets(),
        )
        logger.info("serving %s as %s (%.1f samples/s)", uid or f"stage {stage}", dht.peer_id, meter.samples_per_s)
        move = asyncio.Event()
        target: list[int] = []
        async with asyncio.TaskGroup() as tasks:
            averaging = tasks.create_task(averager.run())
            background = [tasks.create_task(_heartbeat(dht, key, record, config)), averaging]
            ctx.allreduce.handoff_target = averager
            if store is not None:
                background.append(tasks.create_task(checkpoints.run(config.progress_period)))
            if experts is not None:
                background.append(tasks.create_task(experts.run()))
            # Experts do not move: `--expert auto` already claimed the least served one.
            rebalancer = tasks.create_task(_rebalance(ctx, stage, move, target)) if config.rebalance_period and uid is None else None
            stopper = tasks.create_task(stop.wait())
            mover = tasks.create_task(move.wait())
            await asyncio.wait([stopper, mover], return_when=asyncio.FIRST_COMPLETED)
            for task in [stopper, mover, rebalancer]:
                if task is not None:
                    task.cancel()
            await _drain(serving, averager, config.leave_timeout, stage)
            averaging.cancel()
            await asyncio.wait([averaging])
            ctx.allreduce.handoff_target = None
            handed = await averager.hand_off()
            events.emit("drained", stage=stage, handed_off=handed, uncommitted=averager.strategy.samples)
            for task in background:
                task.cancel()
        await checkpoints.save_now()
        if target:
            ctx.moved_at = time.monotonic()
            logger.info("moving from stage %d to stage %d", stage, target[0])
            events.emit("moving", role="peer", peer_id=dht.peer_id, stage=stage, to=target[0])
        return target[0] if target else None
    finally:
        if experts is not None:
            experts.closed = True
        if ctx.allreduce.handoff_target is averager:
            ctx.allreduce.handoff_target = None
        await averager.publish_left()
        if registered:
            if ctx.allreduce.direct is not None:
                ctx.allreduce.direct.remove(STAGE_PROTOCOL)
                ctx.allreduce.direct.remove(STATE_PROTOCOL)
            await _quietly(stage_servicer.unregister(dht.p2p))
            await _quietly(state_servicer.unregister(dht.p2p))
        serving.shutdown()


DRAIN_QUIET = 2.0
"""Seconds without calls after which microbatches still held are given up when leaving."""


async def _drain(serving: StageServing, averager: StageAverager, timeout: float, stage: int) -> None:
    """Leaves without losing work, within `timeout`: no new microbatches (announced `leaving`),
    the backwards of held microbatches answered, a round in progress finished."""
    serving.draining = True
    averager.leaving = True
    start = time.monotonic()
    try:
        await averager.publish_progress(force=True)
    except Exception as e:  # noqa: BLE001 - leaving must not fail
        logger.debug("could not announce leaving: %s", e)
    deadline = start + timeout
    while time.monotonic() < deadline:
        if serving.idle(DRAIN_QUIET) and not averager.in_round:
            break
        await asyncio.sleep(0.05)  # polls local counters only
    logger.info(
        "stage %d: drained in %.2f s (%d calls in progress, %d microbatches held)",
        stage, time.monotonic() - start, serving.in_flight, len(serving.cache),
    )


class _Checkpointer:
    """Saves the stage's state every `every` steps, atomically, off the event loop."""

    def __init__(self, store: CheckpointStore | None, stage: int, snapshots, epoch, every: int):
        self.store = store
        self.stage = stage
        self.snapshots = snapshots
        self.epoch = epoch
        self.every = max(1, every)
        self.saved = -1

    async def run(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)  # polls a local counter
            if self.epoch() >= self.saved + self.every:
                await self.save_now()

    async def save_now(self) -> None:
        if self.store is None or self.epoch() == self.saved:
            return
        try:
            snapshot = await self.snapshots.get()
            await asyncio.to_thread(self.store.save, self.stage, snapshot)
        except Exception as e:  # noqa: BLE001 - a failed save is retried at the next step
            logger.warning("stage %d: could not save a checkpoint: %s", self.stage, e)
            return
        self.saved = snapshot.step
        metrics.CHECKPOINTS_SAVED.inc()
        events.emit("checkpoint", stage=self.stage, step=snapshot.step, digest=snapshot.digest)


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


MOVE_COOLDOWN_PERIODS = 3.0
"""A peer that moved does not move again for this many rebalancing periods: its new stage's
figures (its own probe against mates' serving averages, a mover still in transit elsewhere) need
that long to settle, and without the pause two stages can trade the same peer back and forth."""


async def _rebalance(ctx: PeerContext, stage: int, move: asyncio.Event, target: list[int]) -> None:
    rng = random.Random()
    while True:
        await asyncio.sleep(move_delay(rng, ctx.config.rebalance_period))
        if ctx.moved_at is not None and time.monotonic() - ctx.moved_at < MOVE_COOLDOWN_PERIODS * ctx.config.rebalance_period:
            continue
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
