"""Composition root of the peer role: join the DHT, read the manifest, pick a stage, serve it.

Lifecycle: DHT up → verified manifest → stage chosen → all-reduce data plane up → serve stages
(`session.serve_stage`: sync, announce, serve, average, maybe move to another stage) until `stop`
→ data plane, DHT and p2pd shut down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

from swarmnet.averaging.allreduce import AllReduceServer
from swarmnet.config import PeerConfig, RunManifest
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import fetch_manifest, keep_manifest, peer_ids_of
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.stages import read_experts, read_swarm
from swarmnet.errors import ConfigError
from swarmnet.models.moe import expert_uids, uid_of, unit_of
from swarmnet.peer.checkpoint import CheckpointStore
from swarmnet.peer.detect import describe_device
from swarmnet.peer.session import PeerContext, serve_stage
from swarmnet.pipeline.stage_choice import choose_expert, choose_stage, explain_stage_choice
from swarmnet.protocols.access import AccessPolicy
from swarmnet.protocols.direct import DirectEndpoint
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)


async def run_peer(
    *,
    config: PeerConfig,
    initial_peers: Sequence[str],
    stage: int | None,
    run_id: str | None,
    expert: str | None = None,
    identity: Identity,
    stop: asyncio.Event,
    join_token: str | None = None,
) -> None:
    """Serves stages until `stop` is set. `stage=None` means auto (the bottleneck stage). With
    `expert` (a uid, or `auto` for the least served expert) it serves that expert instead.
    `join_token` admits us to a private run whose allowlist does not name us."""
    launched = time.monotonic()
    dht = await SwarmDHT.create(identity=identity, initial_peers=initial_peers, host=config.host, port=config.port)
    async with dht:
        manifest = await fetch_manifest(
            dht, run_id=run_id, preferred_signers=peer_ids_of(initial_peers), timeout=config.manifest_timeout
        )
        num_stages = manifest.training.num_stages
        print(f"run {manifest.run_id} ({manifest.name}): {num_stages} stages; device {describe_device(config.device)}", flush=True)
        policy = AccessPolicy.for_run(manifest, join_token, identity.peer_id)
        policy.check_self()  # a refused peer stops here, with what to do about it
        dht.use_access(policy)
        if expert is not None:
            stage, why = await _claim_expert(dht, manifest, expert)
        elif stage is None:
            held = {}
            if config.checkpoint_dir:
                store = CheckpointStore(Path(config.checkpoint_dir), manifest.run_id)
                held = {s: store.latest_step(s) for s in store.stages()}
            snapshot = await read_swarm(dht, manifest)
            stage = choose_stage(snapshot, random.Random(), held=held)
            why = explain_stage_choice(snapshot, stage, held=held)
        elif not 0 <= stage < num_stages:
            raise ConfigError(f"--stage {stage} is outside 0..{num_stages - 1} for run {manifest.run_id}")
        else:
            why = f"as asked (--stage {stage})"
        print(f"chose {uid_of(manifest, stage) or f'stage {stage}'}: {why}", flush=True)
        metrics_addr = metrics.serve_metrics(
            config.metrics_host or config.host, config.metrics_port, await dht.visible_maddrs()
        )
        if metrics_addr:
            print(f"peer metrics: http://{metrics_addr}/metrics", flush=True)
        # Every peer keeps the signed manifest stored on live DHT nodes, so that new peers can
        # bootstrap from any of us after the coordinator is gone.
        keeper = asyncio.create_task(keep_manifest(dht, manifest.run_id), name="keep-manifest")
        try:
            async with await AllReduceServer.create(host=config.host, port=config.averaging_port) as allreduce:
                allreduce.identity = identity  # all-reduce hellos are signed and checked
                if config.direct_data_plane:
                    allreduce.direct = DirectEndpoint(identity, access=policy)
                else:
                    dht.direct = None
                ctx = PeerContext(
                    dht=dht, manifest=manifest, config=config, allreduce=allreduce, metrics_addr=metrics_addr, launched=launched
                )
                while stage is not None and not stop.is_set():
                    what = uid_of(manifest, stage) or f"stage {stage} of {num_stages}"
                    logger.info("run %s (%s): serving %s", manifest.run_id, manifest.name, what)
                    stage = await serve_stage(ctx, stage, stop)
        finally:
            keeper.cancel()
    events.emit("stopped", role="peer", peer_id=identity.peer_id)


async def _claim_expert(dht: SwarmDHT, manifest: RunManifest, expert: str) -> tuple[int, str]:
    """The unit of the expert to serve and why: `expert` itself, or for `auto` the one with the
    fewest replicas (then the least throughput), found by reading every MoE layer's prefix."""
    uids = expert_uids(manifest)
    if not uids:
        raise ConfigError(f"run {manifest.run_id} has no Mixture-of-Experts layers: join a --stage instead")
    if expert != "auto":
        return unit_of(manifest, expert), f"as asked (--expert {expert})"
    replicas = {}
    for layer in sorted(manifest.model.moe.layers):
        for uid, found in (await read_experts(dht, manifest, layer)).items():
            replicas[uid] = [info for info, _ in found]
    uid = choose_expert(uids, replicas, random.Random())
    counts = {u: len(replicas.get(u, [])) for u in uids}
    return unit_of(manifest, uid), f"it had the fewest replicas ({counts[uid]}; all: {counts})"
