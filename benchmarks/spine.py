"""Spine benchmark: a real local swarm against single-process training of the same manifest.

    python benchmarks/spine.py [--steps 60] [--run coordinator/runs/demo.toml] [--out benchmarks/results/spine.json]

Measured in one run: samples/s of `swarmnet train --local` (the baseline) and of a 2-stage swarm
(coordinator + one peer per stage + trainer, real processes over libp2p on 127.0.0.1), their
ratio, the final-loss difference (parity), and each peer's time from launch to serving.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from swarmnet.config import RunManifest, load_manifest
from swarmnet.testing.processes import swarmnet_command
from swarmnet.testing.swarm import LocalSwarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--run", default=None)
    parser.add_argument("--out", default="benchmarks/results/spine.json")
    args = parser.parse_args()
    manifest = load_manifest(args.run) if args.run else RunManifest(name="demo")

    with LocalSwarm(manifest) as swarm:
        local_json = swarm.workdir / "local.json"
        subprocess.run(
            swarmnet_command("train", "--local", "--run", str(swarm.run_path), "--max-steps", str(args.steps),
                             "--summary-json", str(local_json)),
            check=True, capture_output=True, env=swarm.env, timeout=900,
        )
        local = json.loads(local_json.read_text())
        swarm.start_coordinator()
        peers = swarm.start_peers(list(range(manifest.training.num_stages)))
        trainer = swarm.start_trainer("--max-steps", str(args.steps))
        remote = trainer.wait_event("summary", 900)
        launch_to_serving = [p.ready["received_after_s"] for p in peers]

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
        "initial_loss": remote["initial_loss"],
        "dropped_microbatches": remote["dropped"],
        "peer_launch_to_serving_s": launch_to_serving,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
