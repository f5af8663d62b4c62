"""`swarmnet coordinator`: bootstrap node and manifest publisher of one run."""

from __future__ import annotations

import argparse

from swarmnet.cli.runtime import add_join_token_option, read_join_token, run_role
from swarmnet.config import RunManifest, load_manifest

DEFAULT_IDENTITY = ".swarmnet/coordinator.key"
DEFAULT_HTTP_PORT = 8470


def add_parser(commands) -> None:
    p = commands.add_parser("coordinator", help="run the bootstrap DHT node and publish a run manifest")
    p.add_argument("--run", help="run manifest TOML (default: the embedded demo run)")
    p.add_argument("--identity", default=DEFAULT_IDENTITY, help="key file, generated on first run")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    p.add_argument(
        "--initial-peers", nargs="*", default=[], help="join an existing DHT (e.g. any live peer, to re-attach after a restart)"
    )
    p.add_argument("--archive", default=None, metavar="DIR", help="archive every stage's state here and serve it to joining peers")
    p.add_argument("--archive-period", type=float, default=30.0, help="seconds between archive updates")
    p.add_argument("--observe-period", type=float, default=5.0, help="seconds between swarm observations")
    p.add_argument("--http-host", default=None, help="interface of the status page, /metrics and /sd (default: --host)")
    p.add_argument(
        "--http-port", type=int, default=DEFAULT_HTTP_PORT,
        help=f"port of the status page, /metrics and Prometheus service discovery /sd (0: any free port; default {DEFAULT_HTTP_PORT})",
    )
    p.add_argument("--no-http", action="store_true", help="serve no status page, metrics or service discovery")
    p.add_argument(
        "--allow", action="append", default=[], metavar="PEER_ID",
        help="make the run private and admit this peer id (repeatable; adds to the manifest's [access] allowlist)",
    )
    add_join_token_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        from swarmnet.coordinator.coordinator import run_coordinator
        from swarmnet.dht.identity import Identity
        from swarmnet.protocols.access import with_access

        manifest = load_manifest(args.run) if args.run else RunManifest(name="demo")
        identity = Identity.load_or_create(args.identity)
        join_token = read_join_token(args.join_token_file)
        manifest = with_access(manifest, allow=args.allow, token=join_token, coordinator=identity.peer_id)
        await run_coordinator(
            manifest=manifest,
            identity=identity,
            join_token=join_token,
            host=args.host,
            port=args.port,
            initial_peers=args.initial_peers,
            stop=stop,
            observe_period=args.observe_period,
            archive_dir=args.archive,
            archive_period=args.archive_period,
            http_host=args.http_host,
            http_port=None if args.no_http else args.http_port,
        )

    return run_role("coordinator", args.log_level, role)
