"""Scale benchmark: stage choice and rebalancing at 1k-10k peers, a policy-level simulation
(`swarmnet.pipeline.simulate`) of a heterogeneous swarm under churn.

    python benchmarks/scale.py [--seed 0] [--hours 6] [--smoke] [--out benchmarks/results/scale.json]

For each configuration, one seeded churn trace (peers with exponential lifetimes of mean 1 h,
Poisson arrivals keeping the count near N, throughputs from `simulate.DEVICE_MIX`) is played twice:
joins only (each joining peer takes the stage `choose_stage` gives it) and joins plus rebalancing
(every peer runs `plan_move` every `move_delay(rng, 30 s)`, margin 0.1 unless a row says otherwise:
the peer defaults). Reported per run:

- ratio_to_upper_bound: the swarm's throughput (its bottleneck stage, integrated exactly over
  simulated time) over the upper bound total / stages of the same peers: no assignment does better,
  so this ratio is conservative;
- ratio_to_lpt and samples_ratio_to_upper_bound: at sample times (every 5 simulated minutes), the sum
  of the swarm's bottlenecks over the sum of the LPT assignment's (largest peer first onto the
  least-loaded stage, then local moves and swaps: a strong lower bound of the optimum) and over the
  sum of upper bounds; lpt_to_upper_bound shows how tight the upper bound is;
- worst_sample_to_upper_bound, moves, moves_per_peer_hour, stages_emptied_by_moves (always 0:
  `plan_move` never empties a stage), empty_stage_seconds (after leaves), wall_s.

The first three rows are the 100-peer (smoke size), 1k and 10k swarms over 8 stages; the others vary
the stages and the margin. About 20 decisions of each run are also taken by the real `plan_move` /
`choose_stage` on a full snapshot and must agree (`verify_every`). The full run takes 1-2 minutes on
2 cores (a 10k run with rebalancing simulates about 7 million checks). `--smoke`: 100 peers,
8 stages, 30 simulated minutes, every 10th decision cross-checked; well under 5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

from swarmnet.pipeline.simulate import (
    DEVICE_MIX,
    ScaleConfig,
    alive_at,
    churn_trace,
    lpt_bottleneck,
    run,
    sample_times,
    upper_bound,
)

SWARM_PAPER = {"with_rebalancing": 0.958, "without_rebalancing": 0.827}
"""Throughput relative to the optimum that the SWARM paper reports for its own setup."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hours", type=float, default=6.0, help="simulated hours per run")
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration: does it work at all")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    return parser.parse_args()


def configurations(args: argparse.Namespace) -> list[tuple[str, ScaleConfig]]:
    if args.smoke:
        return [("100 peers, 8 stages (smoke)", ScaleConfig(peers=100, hours=0.5, seed=args.seed))]
    rows = [
        ("100 peers, 8 stages", {"peers": 100}),
        ("1k peers, 8 stages", {"peers": 1000}),
        ("10k peers, 8 stages", {"peers": 10_000}),
        ("1k peers, 32 stages", {"peers": 1000, "stages": 32}),
        ("1k peers, 8 stages, margin 0", {"peers": 1000, "margin": 0.0}),
        ("10k peers, 8 stages, margin 0", {"peers": 10_000, "margin": 0.0}),
        ("1k peers, 32 stages, margin 0", {"peers": 1000, "stages": 32, "margin": 0.0}),
    ]
    return [(name, ScaleConfig(hours=args.hours, seed=args.seed, **fields)) for name, fields in rows]


def verify_every(config: ScaleConfig, *, rebalance: bool, smoke: bool) -> int:
    """How often a run cross-checks a decision with the real policy on a full snapshot (O(N) each):
    about 20 times per run of the full benchmark (a run takes about 7 N joins, and 720 N checks with
    rebalancing over 6 h), every 10th decision in the smoke run."""
    if smoke:
        return 10
    return 36 * config.peers if rebalance else max(config.peers // 3, 1)


def measure(name: str, config: ScaleConfig, *, smoke: bool) -> dict:
    """Both runs (joins only, joins and moves) on one trace, against the bounds."""
    started = time.perf_counter()
    trace = churn_trace(config)
    peer_sets = alive_at(trace, sample_times(config))
    upper = [upper_bound(p, config.stages) for p in peer_sets]
    lpt = [lpt_bottleneck(p, config.stages) for p in peer_sets]
    joins = sum(1 for _, _, throughput in trace if throughput)
    result = {
        "name": name,
        "config": dataclasses.asdict(config),
        "joins": joins,
        "leaves": len(trace) - joins,
        "mean_peers_at_samples": round(sum(map(len, peer_sets)) / len(peer_sets), 1),
        "samples": len(peer_sets),
        "lpt_to_upper_bound": round(sum(lpt) / sum(upper), 6),
        "trace_and_bounds_wall_s": round(time.perf_counter() - started, 3),
    }
    for key, rebalance in (("without_rebalancing", False), ("with_rebalancing", True)):
        checked = dataclasses.replace(
            config, verify_every=verify_every(config, rebalance=rebalance, smoke=smoke)
        )
        r = run(checked, trace, rebalance=rebalance)
        result[key] = {
            "ratio_to_upper_bound": round(r.ratio_to_upper_bound, 5),
            "ratio_to_lpt": round(sum(r.samples) / sum(lpt), 5),
            "samples_ratio_to_upper_bound": round(sum(r.samples) / sum(upper), 5),
            "worst_sample_to_upper_bound": round(min(s / u for s, u in zip(r.samples, upper)), 5),
            "moves": r.moves,
            "moves_per_peer_hour": round(r.moves_per_peer_hour, 4),
            "stages_emptied_by_moves": r.stages_emptied_by_moves,
            "empty_stage_seconds": round(r.empty_stage_seconds, 1),
            "verified_decisions": r.verified_decisions,
            "wall_s": round(r.wall_s, 3),
        }
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows = []
    for name, config in configurations(args):
        row = measure(name, config, smoke=args.smoke)
        rows.append(row)
        without, with_moves = row["without_rebalancing"], row["with_rebalancing"]
        print(
            f"{name}: without {without['ratio_to_upper_bound']:.4f}, with {with_moves['ratio_to_upper_bound']:.4f}"
            f" of total/stages; {with_moves['moves_per_peer_hour']:.3f} moves per peer-hour;"
            f" LPT/upper {row['lpt_to_upper_bound']:.5f}; {row['wall_s']:.1f} s",
            flush=True,
        )
    result = {
        "benchmark": "scale",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "smoke": args.smoke,
        "seed": args.seed,
        "device_mix": [dataclasses.asdict(d) for d in DEVICE_MIX],
        "swarm_paper": SWARM_PAPER,
        "configs": rows,
        "total_wall_s": round(time.perf_counter() - started, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['total_wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
