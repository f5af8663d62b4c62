"""`swarmnet join`: serve a pipeline stage, or an expert, of the run found through the DHT."""

from __future__ import annotations

import argparse
import contextlib

from swarmnet.cli.runtime import add_join_token_option, read_join_token, run_role
from swarmnet.config import PeerConfig, load_profile


def add_parser(commands) -> None:
    p = commands.add_parser("join", help="join a run as a stage or expert server")
    p.add_argument(
        "--initial-peers", nargs="+", default=None,
        help="multiaddrs of any live peer, or a coordinator's http://host:8470 (default: $SWARMNET_INITIAL_PEERS, then the profile)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--stage", type=_stage, default=None, help="stage index, or 'auto' (default) for the bottleneck")
    what.add_argument(
        "--expert", default=None, help="serve an expert of the run's MoE layers: its uid (expert.<layer>.<index>) or 'auto'"
    )
    p.add_argument("--run-id", default=None, help="follow this run (default: the coordinator's)")
    p.add_argument("--profile", default=None, help="peer profile TOML (see peers/)")
    p.add_argument("--identity", default=None, help="persistent key file (default: a fresh identity)")
    p.add_argument("--device", default=None, help="torch device, overrides the profile")
    p.add_argument("--host", default=None, help="interface to listen on, overrides the profile")
    p.add_argument("--port", type=int, default=None, help="TCP port, overrides the profile")
    p.add_argument("--metrics-port", type=int, default=None, help="port of /metrics (0: any free port), overrides the profile")
    p.add_argument("--metrics-host", default=None, help="interface of /metrics (default: --host)")
    p.add_argument("--checkpoint-dir", default=None, help="save and resume the stage's state here, overrides the profile")
    add_join_token_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        from swarmnet.dht.bootstrap import choose_initial_peers, resolve_initial_peers
        from swarmnet.dht.identity import Identity
        from swarmnet.peer.peer import run_peer

        config = load_profile(
            PeerConfig, args.profile, device=args.device, host=args.host, port=args.port, checkpoint_dir=args.checkpoint_dir,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        )
        entries, source = choose_initial_peers(args.initial_peers, config.initial_peers)
        initial_peers = await resolve_initial_peers(entries)
        print(f"initial peers from {source}: {' '.join(entries)}", flush=True)
        join_token = read_join_token(args.join_token_file)
        identity = Identity.load_or_create(args.identity) if args.identity else Identity.ephemeral()
        try:
            await run_peer(
                config=config,
                initial_peers=initial_peers,
                stage=args.stage,
                expert=args.expert,
                run_id=args.run_id,
                identity=identity,
                stop=stop,
                join_token=join_token,
            )
        finally:
            if not args.identity:
                with contextlib.suppress(FileNotFoundError):
                    identity.path.unlink()

    return run_role("peer", args.log_level, role)


def _stage(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a stage index or 'auto'") from None
