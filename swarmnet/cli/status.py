"""`swarmnet status`: read the DHT and print the swarm table (the status page's view, in a terminal)."""

from __future__ import annotations

import argparse
import contextlib
import json

from swarmnet.cli.runtime import run_role


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="print who serves each stage (and expert) of a run")
    p.add_argument(
        "--initial-peers", nargs="+", default=None,
        help="multiaddrs of any live peer, or a coordinator's http://host:8470 (default: $SWARMNET_INITIAL_PEERS)",
    )
    p.add_argument("--run-id", default=None, help="run to show (default: the coordinator's)")
    p.add_argument("--json", action="store_true", help="print the swarm view as JSON (as the coordinator's /api/swarm)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        from swarmnet.coordinator.render import render_text
        from swarmnet.coordinator.view import read_view
        from swarmnet.dht.bootstrap import choose_initial_peers, resolve_initial_peers
        from swarmnet.dht.identity import Identity
        from swarmnet.dht.manifests import fetch_manifest, peer_ids_of
        from swarmnet.dht.node import SwarmDHT

        entries, _ = choose_initial_peers(args.initial_peers)
        initial_peers = await resolve_initial_peers(entries, attempts=1)
        identity = Identity.ephemeral()
        try:
            async with await SwarmDHT.create(identity=identity, initial_peers=initial_peers, client_mode=True) as dht:
                manifest = await fetch_manifest(dht, run_id=args.run_id, preferred_signers=peer_ids_of(initial_peers))
                view = await read_view(dht, manifest)
                print(json.dumps(view.to_json(), indent=2) if args.json else render_text(view), flush=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()

    return run_role("status", args.log_level, role)
