"""`swarmnet status`: read the DHT and print the swarm table (the status page's view, in a terminal)."""

from __future__ import annotations

import argparse
import contextlib
import json

from swarmnet.cli.runtime import add_join_token_option, read_join_token, run_role


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="print who serves each stage (and expert) of a run")
    p.add_argument(
        "--initial-peers", nargs="+", default=None,
        help="multiaddrs of any live peer, or a coordinator's http://host:8470 (default: $SWARMNET_INITIAL_PEERS)",
    )
    p.add_argument("--run-id", default=None, help="run to show (default: the coordinator's)")
    p.add_argument("--json", action="store_true", help="print the swarm view as JSON (as the coordinator's /api/swarm)")
    add_join_token_option(p)  # a private run's token: to tell its members' records from outsiders'
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        from swarmnet.coordinator.render import render_text
        from swarmnet.coordinator.view import read_view
        from swarmnet.dht.bootstrap import choose_initial_peers, resolve_initial_peers
        from swarmnet.dht.identity import Identity
        from swarmnet.dht.manifests import fetch_manifest, peer_ids_of
        from swarmnet.dht.node import SwarmDHT
        from swarmnet.protocols.access import AccessPolicy

        entries, _ = choose_initial_peers(args.initial_peers)
        initial_peers = await resolve_initial_peers(entries, attempts=1)
        identity = Identity.ephemeral()
        try:
            async with await SwarmDHT.create(identity=identity, initial_peers=initial_peers, client_mode=True) as dht:
                manifest = await fetch_manifest(dht, run_id=args.run_id, preferred_signers=peer_ids_of(initial_peers))
                policy = AccessPolicy.for_run(manifest, read_join_token(args.join_token_file), dht.peer_id)
                dht.use_access(policy)
                if manifest.access.token_sha256 and not policy.can_verify:
                    print("private run: without its join token only allowlisted peers are shown", flush=True)
                view = await read_view(dht, manifest)
                print(json.dumps(view.to_json(), indent=2) if args.json else render_text(view), flush=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()

    return run_role("status", args.log_level, role)
