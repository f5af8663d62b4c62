"""`swarmnet status`: read the DHT and print the swarm table."""

from __future__ import annotations

import argparse
import contextlib

from swarmnet.cli.runtime import run_role


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="print who serves each stage (and expert) of a run")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any live peer")
    p.add_argument("--run-id", default=None, help="run to show (default: the coordinator's)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        from swarmnet.dht import keys
        from swarmnet.dht.identity import Identity
        from swarmnet.dht.manifests import fetch_manifest, peer_ids_of
        from swarmnet.dht.node import SwarmDHT
        from swarmnet.dht.stages import read_experts, read_stage
        from swarmnet.models.moe import expert_uid

        identity = Identity.ephemeral()
        try:
            async with await SwarmDHT.create(identity=identity, initial_peers=args.initial_peers, client_mode=True) as dht:
                manifest = await fetch_manifest(dht, run_id=args.run_id, preferred_signers=peer_ids_of(args.initial_peers))
                print(f"run {manifest.run_id} ({manifest.name}): {manifest.training.num_stages} stages")
                print(f"{'stage':>5}  {'peer':<14} {'samples/s':>10} {'queue':>5} {'step':>6}  device")
                for stage in range(manifest.training.num_stages):
                    found = await read_stage(dht, manifest, stage)
                    if not found:
                        print(f"{stage:>5}  {'(no peers)':<14}")
                    for info, record in found:
                        print(
                            f"{stage:>5}  …{info.peer_id[-12:]:<13} {info.throughput:>10.1f} "
                            f"{info.queue_depth:>5} {info.step:>6}  {record.device}"
                        )
                moe = manifest.model.moe
                for layer in sorted(moe.layers) if moe else []:
                    print(f"MoE layer {layer}: {moe.num_experts} experts, top-{moe.top_k}")
                    found = await read_experts(dht, manifest, layer)
                    for index in range(moe.num_experts):
                        uid = expert_uid(layer, index)
                        if not found.get(uid):
                            print(f"  {uid:<14} (no peers)")
                        for info, record in found.get(uid, []):
                            print(
                                f"  {uid:<14} …{info.peer_id[-12:]:<13} {info.throughput:>10.1f} tokens/s "
                                f"{info.queue_depth:>5} {info.step:>6}  {record.device}"
                            )
                for signed in await dht.get(keys.trainer_key(manifest.run_id)):
                    t = signed.record
                    print(f"trainer …{signed.peer_id[-12:]}: step {t.step} loss {t.loss:.4f} {t.samples_per_s:.1f} samples/s")
        finally:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()

    return run_role("status", args.log_level, role)
