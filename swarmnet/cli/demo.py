"""`swarmnet demo`: a whole local swarm as real processes, a live progress line, a clean exit.

Starts a coordinator, one peer per stage (or more) and a trainer on 127.0.0.1, trains the embedded
demo run for a bounded time, then stops every process and prints a one-line summary. With `--moe`
the run has a Mixture-of-Experts layer, and expert peers (`join --expert auto`) serve its experts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from swarmnet.config import ModelConfig, MoEConfig, RunManifest, load_manifest
from swarmnet.errors import SwarmnetError
from swarmnet.telemetry.logs import setup_logging


def add_parser(commands) -> None:
    p = commands.add_parser("demo", help="train a small model on a local swarm of real processes")
    p.add_argument("--run", default=None, help="run manifest TOML (default: the embedded demo run)")
    p.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--peers-per-stage", type=int, default=1, help="stage servers per stage")
    p.add_argument(
        "--moe", action="store_true",
        help="the embedded Mixture-of-Experts run: block 1's MLP becomes a gate and 4 experts served by expert peers",
    )
    p.add_argument("--expert-peers", type=int, default=None, help="expert peers with --moe (default: one per expert)")
    p.add_argument("--summary-json", default=None, help="write the summary here as JSON")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    setup_logging("demo", args.log_level)
    from swarmnet.testing.processes import ProcessFailed
    from swarmnet.testing.swarm import LocalSwarm

    if args.run:
        manifest = load_manifest(args.run)
    elif args.moe:
        manifest = RunManifest(name="demo-moe", model=ModelConfig(moe=MoEConfig(layers=(1,), num_experts=4, top_k=2)))
    else:
        manifest = RunManifest(name="demo")
    from swarmnet.models.moe import expert_uids  # torch and hivemind load only when a role runs

    stages = manifest.training.num_stages
    num_experts = len(expert_uids(manifest))
    expert_peers = 0 if not num_experts else (args.expert_peers if args.expert_peers is not None else num_experts)
    print(
        f"swarmnet demo: run {manifest.run_id}, {stages} stages x {args.peers_per_stage} peers"
        + (f", {num_experts} experts on {expert_peers} peers" if num_experts else "")
        + f", {args.seconds:.0f} s"
    )
    swarm = LocalSwarm(manifest)
    summary = None
    try:
        swarm.start_coordinator()
        print(f"  coordinator  {swarm.initial_peers[0]}")
        print(f"  status page  http://{swarm.coordinator.ready['http']}/  (Prometheus service discovery: /sd)")
        peers = swarm.start_peers([s for s in range(stages) for _ in range(args.peers_per_stage)])
        for peer in peers:
            ready = peer.ready
            print(
                f"  peer stage {ready['stage']}  serving {ready['received_after_s']:.1f} s after launch"
                f"  metrics http://{ready['metrics']}/metrics"
            )
        for _ in range(expert_peers):  # one after another: each claims the least served expert
            ready = swarm.start_expert("auto").ready
            print(
                f"  peer {ready['expert']}  serving {ready['received_after_s']:.1f} s after launch"
                f"  metrics http://{ready['metrics']}/metrics"
            )
        trainer_args = ["--max-seconds", str(args.seconds)]
        if args.max_steps is not None:
            trainer_args += ["--max-steps", str(args.max_steps)]
        trainer = swarm.start_trainer(*trainer_args)
        summary = _follow(trainer, timeout=args.seconds + 120)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", file=sys.stderr)
    except (ProcessFailed, SwarmnetError) as e:
        print(f"\nswarmnet demo failed: {e}", file=sys.stderr)
        return 2
    finally:
        swarm.close()
    if summary is None:
        return 130
    result = {
        "initial_loss": summary["initial_loss"],
        "final_loss": summary["final_loss"],
        "steps": summary["steps"],
        "samples_per_s": summary["samples_per_s"],
        "peers": stages * args.peers_per_stage + expert_peers,
    }
    print(
        f"swarmnet demo: {result['steps']} steps, loss {_fmt(result['initial_loss'])} -> {_fmt(result['final_loss'])}, "
        f"{result['samples_per_s']:.1f} samples/s over {result['peers']} peers; all processes stopped"
    )
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _follow(trainer, *, timeout: float) -> dict:
    """Renders the trainer's step events as a live line until its summary arrives."""
    interactive = sys.stdout.isatty()
    shown = 0
    last_print = 0.0
    deadline = time.monotonic() + timeout
    cursor = 0
    while True:
        index, event = trainer.wait_event_from(
            cursor, lambda e: e.get("event") in ("step", "summary"), max(deadline - time.monotonic(), 0.1)
        )
        cursor = index + 1
        if event.get("event") == "summary":
            if interactive:
                print()
            return event
        shown += 1
        line = f"  step {event['step']:4d}  loss {_fmt(event['loss'])}  {event['samples_per_s']:6.1f} samples/s  {event['elapsed']:5.1f} s"
        if interactive:
            print("\r" + line, end="", flush=True)
        elif time.monotonic() - last_print > 2.0 or shown == 1:
            print(line, flush=True)
            last_print = time.monotonic()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
