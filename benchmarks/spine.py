"""Spine benchmark: a real local swarm against single-process training of the same manifest.

    python benchmarks/spine.py [--steps 60] [--run coordinator/runs/demo.toml] [--staleness 0]
                               [--max-in-flight N] [--out benchmarks/results/spine.json]

Measured in one run: samples/s of `swarmnet train --local` (the baseline) and of a 2-stage swarm
(coordinator + one peer per stage + trainer, real processes over libp2p on 127.0.0.1), their
ratio, the final-loss difference (parity), the mean loss of the last 10 steps of each, and each
peer's time from launch to serving. `--staleness 1` sets the manifest's `training.max_staleness`
(delayed parameter updates): the local run is the synchronous reference either way, so the loss
difference is what the delayed updates cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import time
from pathlib import Path

from swarmnet.config import RunManifest, load_manifest
from swarmnet.telemetry import events
from swarmnet.testing.processes import swarmnet_command
from swarmnet.testing.swarm import LocalSwarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--run", default=None)
    parser.add_argument("--staleness", type=int, default=0, choices=(0, 1))
    parser.add_argument("--max-in-flight", type=int, default=None, help="the swarm trainer's max_in_flight")
    parser.add_argument("--out", default="benchmarks/results/spine.json")
    args = parser.parse_args()
    manifest = load_manifest(args.run) if args.run else RunManifest(name="demo")
    if args.staleness:
        manifest = dataclasses.replace(
            manifest, training=dataclasses.replace(manifest.training, max_staleness=args.staleness)
        )

    with LocalSwarm(manifest) as swarm:
        local_json = swarm.workdir / "local.json"
        local_run = subprocess.run(
            swarmnet_command("train", "--local", "--run", str(swarm.run_path), "--max-steps", str(args.steps),
                             "--summary-json", str(local_json)),
            check=True, capture_output=True, text=True, env=swarm.env, timeout=900,
        )
        local = json.loads(local_json.read_text())
        swarm.start_coordinator()
        peers = swarm.start_peers(list(range(manifest.training.num_stages)))
        profile = []
        if args.max_in_flight is not None:
            (swarm.workdir / "trainer.toml").write_text(f"max_in_flight = {args.max_in_flight}\n")
            profile = ["--profile", str(swarm.workdir / "trainer.toml")]
        trainer = swarm.start_trainer("--max-steps", str(args.steps), *profile)
        remote = trainer.wait_event("summary", 900)
        swarm_losses = [e["loss"] for e in trainer.events if e.get("event") == "step"]
        launch_to_serving = [p.ready["received_after_s"] for p in peers]
    local_losses = [e["loss"] for e in map(events.parse, local_run.stdout.splitlines()) if e and e.get("event") == "step"]
    local_tail, swarm_tail = _tail_mean(local_losses), _tail_mean(swarm_losses)

    result = {
        "benchmark": "spine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}",
        "run_id": manifest.run_id,
        "steps": args.steps,
        "local_samples_per_s": local["samples_per_s"],
        "swarm_samples_per_s": remote["samples_per_s"],
        "swarm_over_local": remote["samples_per_s"] / local["samples_per_s"],
        "local_final_loss": local["final_loss"],
        "swarm_final_loss": remote["final_loss"],
        "final_loss_relative_difference": abs(remote["final_loss"] - local["final_loss"]) / local["final_loss"],
        "staleness": args.staleness,
        "max_in_flight": args.max_in_flight,
        "local_last10_mean_loss": local_tail,
        "swarm_last10_mean_loss": swarm_tail,
        "last10_mean_loss_relative_difference": (swarm_tail - local_tail) / local_tail if local_tail else None,
        "initial_loss": remote["initial_loss"],
        "dropped_microbatches": remote["dropped"],
        "peer_launch_to_serving_s": launch_to_serving,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _tail_mean(losses: list[float], n: int = 10) -> float | None:
    tail = [x for x in losses[-n:] if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(tail) / len(tail) if tail else None


if __name__ == "__main__":
    main()
