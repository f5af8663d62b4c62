"""`swarmnet train`: drive training through the swarm, or `--local` as the single-process reference."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from swarmnet.cli.runtime import add_join_token_option, read_join_token, run_role
from swarmnet.config import RunManifest, TrainerConfig, load_manifest, load_profile
from swarmnet.errors import ConfigError
from swarmnet.telemetry import events


def add_parser(commands) -> None:
    p = commands.add_parser("train", help="train a run through the swarm (or --local)")
    p.add_argument(
        "--initial-peers", nargs="+", default=None,
        help="multiaddrs of any live peer, or a coordinator's http://host:8470 (default: $SWARMNET_INITIAL_PEERS, then the profile)",
    )
    p.add_argument("--run-id", default=None, help="follow this run (default: the coordinator's)")
    p.add_argument("--local", action="store_true", help="train the manifest in this process, no network")
    p.add_argument("--run", default=None, help="run manifest TOML (with --local; default: embedded demo run)")
    p.add_argument("--profile", default=None, help="trainer profile TOML (see peers/trainer.toml)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--summary-json", default=None, help="write the final summary here as JSON")
    p.add_argument("--host", default=None, help="interface for the trainer's libp2p host, overrides the profile")
    p.add_argument("--metrics-port", type=int, default=None, help="port of /metrics (0: any free port), overrides the profile")
    p.add_argument("--metrics-host", default=None, help="interface of /metrics (default: --host)")
    p.add_argument(
        "--audit-fraction", type=float, default=None,
        help="share of forward calls checked against a second replica of their stage (overrides the profile)",
    )
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if the swarm is further along")
    p.add_argument(
        "--identity", default=None,
        help="persistent key file, e.g. to be on a private run's allowlist (default: a fresh identity)",
    )
    add_join_token_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    async def role(stop):
        config = load_profile(
            TrainerConfig, args.profile, max_steps=args.max_steps, max_seconds=args.max_seconds, host=args.host,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            resume=False if args.no_resume else None, audit_fraction=args.audit_fraction,
        )
        if args.local:
            from swarmnet.trainer.role import run_local_training

            manifest = load_manifest(args.run) if args.run else RunManifest(name="demo")
            _announce(manifest, "local")
            summary = await run_local_training(manifest=manifest, config=config, stop=stop, on_step=_print_step)
        else:
            from swarmnet.dht.bootstrap import choose_initial_peers, resolve_initial_peers
            from swarmnet.dht.identity import Identity
            from swarmnet.trainer.role import run_swarm_training

            try:
                entries, _ = choose_initial_peers(args.initial_peers, config.initial_peers)
            except ConfigError as e:
                raise ConfigError(f"{e}; or train --local") from None
            initial_peers = await resolve_initial_peers(entries)
            join_token = read_join_token(args.join_token_file)

            identity = Identity.load_or_create(args.identity) if args.identity else Identity.ephemeral()
            try:
                summary = await run_swarm_training(
                    config=config,
                    initial_peers=initial_peers,
                    run_id=args.run_id,
                    identity=identity,
                    stop=stop,
                    on_start=_announce,
                    on_step=_print_step,
                    join_token=join_token,
                )
            finally:
                if not args.identity:
                    identity.path.unlink(missing_ok=True)
        fields = {k: _finite(v) for k, v in dataclasses.asdict(summary).items()}
        events.emit("summary", **fields)
        print(
            f"trained {summary.steps} steps: loss {summary.initial_loss:.4f} -> {summary.final_loss:.4f}, "
            f"{summary.samples_per_s:.1f} samples/s, {summary.dropped} microbatches dropped",
            flush=True,
        )
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(fields, f, indent=2)

    return run_role("trainer", args.log_level, role)


def _announce(manifest: RunManifest, trainer_id: str, metrics_addr: str | None = None) -> None:
    events.emit("ready", role="trainer", run_id=manifest.run_id, peer_id=trainer_id, metrics=metrics_addr)
    print(f"training run {manifest.run_id} ({manifest.name}), {manifest.training.num_stages} stages", flush=True)
    if metrics_addr:
        print(f"trainer metrics: http://{metrics_addr}/metrics", flush=True)


def _print_step(report) -> None:
    events.emit("step", **{k: _finite(v) for k, v in dataclasses.asdict(report).items()})
    print(
        f"step {report.step:5d}  loss {report.loss:.4f}  {report.samples_per_s:7.1f} samples/s"
        + (f"  dropped {report.dropped}" if report.dropped else ""),
        flush=True,
    )


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
