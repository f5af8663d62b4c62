"""Composition roots of the trainer role: over the swarm, or locally as the reference."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence

from swarmnet.config import RunManifest, TrainerConfig
from swarmnet.data.corpus import load_corpus
from swarmnet.data.loader import MicrobatchStream
from swarmnet.dht import keys
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import fetch_manifest, peer_ids_of
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import TrainerRecord
from swarmnet.protocols.access import AccessPolicy
from swarmnet.telemetry import metrics
from swarmnet.trainer.directory import StageDirectory
from swarmnet.trainer.local import LocalTrainer
from swarmnet.trainer.steps import StepReport, TrainingSummary
from swarmnet.trainer.swarm import SwarmTrainer

logger = logging.getLogger(__name__)

TRAINER_RECORD_TTL = 30.0


def make_data(manifest: RunManifest) -> MicrobatchStream:
    return MicrobatchStream(load_corpus(manifest.data), manifest.training, manifest.data.holdout_fraction)


async def run_swarm_training(
    *,
    config: TrainerConfig,
    initial_peers: Sequence[str],
    run_id: str | None,
    identity: Identity,
    stop: asyncio.Event,
    on_start: Callable[[RunManifest, str, str | None], None],
    on_step: Callable[[StepReport], None],
    join_token: str | None = None,
) -> TrainingSummary:
    dht = await SwarmDHT.create(
        identity=identity, initial_peers=initial_peers, host=config.host, client_mode=True
    )
    async with dht:
        manifest = await fetch_manifest(dht, run_id=run_id, preferred_signers=peer_ids_of(initial_peers), timeout=config.manifest_timeout
        )
        policy = AccessPolicy.for_run(manifest, join_token, identity.peer_id)
        policy.check_self()  # a trainer outside a private run stops here, with what to do about it
        dht.use_access(policy)
        metrics_addr = metrics.serve_metrics(
            config.metrics_host or config.host, config.metrics_port, await dht.visible_maddrs()
        )
        on_start(manifest, dht.peer_id, metrics_addr)
        data = await asyncio.to_thread(make_data, manifest)
        if not config.direct_data_plane:
            dht.direct = None
        directory = StageDirectory(dht, manifest, compression=manifest.network.compression)
        trainer = SwarmTrainer(manifest, config, directory, data)
        latest = TrainerRecord(step=0, loss=math.nan, samples_per_s=0.0, metrics_addr=metrics_addr)

        async def publish() -> None:
            try:
                await dht.put(keys.trainer_key(manifest.run_id), latest, TRAINER_RECORD_TTL)
            except Exception as e:  # progress records are best effort; training goes on
                logger.debug("could not publish the trainer record: %s", e)

        stepped = asyncio.Event()

        async def heartbeat() -> None:
            """Publishes the record after every step and keeps it alive between steps (a step may
            take longer than its TTL), off the step loop: a DHT store costs a few round trips, which
            across a WAN would add a tenth of a second to every step."""
            while True:
                stepped.clear()
                await publish()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TRAINER_RECORD_TTL / 3):
                        await stepped.wait()

        async def report(step: StepReport) -> None:
            nonlocal latest
            on_step(step)
            latest = TrainerRecord(
                # A step whose microbatches were all dropped has no loss: keep the last one.
                step=step.step, loss=step.loss if step.samples else latest.loss, samples_per_s=step.samples_per_s,
                metrics_addr=metrics_addr,
            )
            stepped.set()

        beating = asyncio.create_task(heartbeat(), name="trainer-record")
        try:
            summary = await trainer.train(stop=stop, on_step=report)
            await publish()  # the last step, before the heartbeat goes
            return summary
        finally:
            beating.cancel()
            await directory.close()


async def run_local_training(
    *,
    manifest: RunManifest,
    config: TrainerConfig,
    stop: asyncio.Event,
    on_step: Callable[[StepReport], None],
) -> TrainingSummary:
    data = await asyncio.to_thread(make_data, manifest)

    async def report(step: StepReport) -> None:
        on_step(step)

    return await LocalTrainer(manifest, config, data).train(stop=stop, on_step=report)
