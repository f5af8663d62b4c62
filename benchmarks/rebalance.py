"""Rebalancing benchmark (performance issue, P7): every peer starts on stage 0; how fast does the
swarm reach the throughput of the optimal assignment of the same peers?

    python benchmarks/rebalance.py [--run coordinator/runs/demo.toml] [--stages 2] [--peers 4]
                                   [--period 10] [--periods 6] [--warmup-seconds 10]
                                   [--baseline-seconds 20] [--no-baseline-after] [--workdir DIR]
                                   [--smoke] [--out benchmarks/results/rebalance.json]

Swarms of real processes over libp2p on 127.0.0.1 (coordinator, `--peers` stage peers, one
trainer), one after the other, in the same run of this script:

- Phase A (baseline): the peers are assigned by hand as evenly as the stages allow (4 peers, 2
  stages: 2 + 2; the peers of this machine are identical, so that is the optimal assignment),
  rebalancing off (`rebalance_period = 0`). Baseline = samples the trainer completed per second in
  [`--warmup-seconds`, + `--baseline-seconds`) of its own clock. It runs twice, before and after
  phase B (unless `--no-baseline-after`), and the baseline is the mean of both: the machine's
  load drifts between swarms, and the ratio of the two runs shows by how much.
- Phase B (rebalancing): a fresh swarm. The trainer starts first (`--no-resume`: its loop runs at
  once and drops the microbatches no stage can take), then all peers join with `--stage 0` at the
  same moment and `rebalance_period = --period` (margin: the peer default). Stage 1 and up start
  empty, so nothing trains until a peer moves. Time 0 ("start") is the moment the last of them
  serves stage 0, when every peer's rebalancer runs; period k is [(k-1)·period, k·period) after it.

Windows are on the trainer's clock (the `elapsed` of its `step` events; a step's samples count in
the window its completion falls in); peer events are mapped onto it through the offset between this
script's clock and the trainer's, as in `benchmarks/churn.py`. Reported for phase B: samples/s and
the ratio to the baseline in each period, the best one-period window that ends within the first 3
periods, the rate over the periods after the third (the settled swarm) and period 3 against it (the
same comparison without the drift of the machine's load between two swarms), the first time a
one-period window reaches 0.9 × baseline, the time until every stage is served, every move (when
the peer announced it was leaving, when it served its new stage, the throughput it measured there)
and the assignment at the end; for each phase, the machine's 1-minute load average at the start
and the end of its window (this machine's other work shows there). With `--workdir` the logs stay there (`baseline/`, `rebalance/`,
`baseline_after/`), each with `events.jsonl`: every event of the phase, `t` on the trainer's clock.

`--smoke`: a seconds-long run of a tiny model with 2 peers that checks the benchmark works end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

from swarmnet.config import (
    PeerConfig,
    RunManifest,
    load_manifest,
)
from swarmnet.testing.processes import ManagedProcess
from swarmnet.testing.swarm import LocalSwarm, tiny_manifest

GOAL_RATIO = 0.9
GOAL_PERIODS = 3
FIRST_STEP_TIMEOUT = 300.0
SLIDE_S = 0.25
"""Resolution of the sliding one-period windows."""
DRAINED = re.compile(r"stage (\d+): drained in ([0-9.]+) s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run manifest TOML (default: the embedded demo run)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the manifest's)")
    parser.add_argument("--peers", type=int, default=4, help="stage peers in each phase")
    parser.add_argument("--period", type=float, default=10.0, help="the peers' rebalance_period in phase B")
    parser.add_argument("--periods", type=int, default=6, help="how many periods phase B lasts after the start")
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="phase A: skipped before the window")
    parser.add_argument("--baseline-seconds", type=float, default=20.0, help="phase A: the measured window")
    parser.add_argument(
        "--baseline-after", action=argparse.BooleanOptionalAction, default=True, help="run phase A again after phase B"
    )
    parser.add_argument("--workdir", default=None, help="keep the logs here (default: temp dirs, removed)")
    parser.add_argument("--smoke", action="store_true", help="a tiny, seconds-long run: does it work at all")
    parser.add_argument("--out", default="benchmarks/results/rebalance.json")
    args = parser.parse_args()
    if args.smoke:
        args.peers, args.period, args.periods, args.warmup_seconds, args.baseline_seconds = 2, 2.0, 3, 1.0, 3.0
        args.baseline_after = False
    if args.period <= 0 or args.periods < 1 or args.baseline_seconds <= 0 or args.warmup_seconds < 0:
        parser.error("need a positive period, baseline window and number of periods")
    return args


# --- clocks and windows -----------------------------------------------------------------------------


def steps_of(trainer: ManagedProcess) -> list[dict[str, Any]]:
    return [e for e in list(trainer.events) if e.get("event") == "step"]


def loop_began(trainer: ManagedProcess) -> float:
    """This script's monotonic time at the trainer's elapsed 0 (its step loop began), to within the
    delivery of one stdout line: the least (arrival here - elapsed) over its step events."""
    return min(trainer.started_at + s["received_after_s"] - s["elapsed"] for s in steps_of(trainer))


def event_time(process: ManagedProcess, event: dict[str, Any]) -> float:
    """When `event` of `process` arrived here, on this script's monotonic clock."""
    return process.started_at + event["received_after_s"]


def rate(steps: list[dict[str, Any]], start: float, end: float) -> float:
    """Samples per second of the steps that completed in [start, end) (trainer clock)."""
    return sum(s["samples"] for s in steps if start <= s["elapsed"] < end) / (end - start)


def ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 4) if baseline > 0 else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of this machine so far, all cores together, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total * (os.cpu_count() or 1), 2) if total > 0 else 0.0


def workdir(args: argparse.Namespace, phase: str) -> Path | None:
    return Path(args.workdir) / phase if args.workdir else None


def save_events(swarm: LocalSwarm, began: float) -> None:
    """With `--workdir`: every event of every process of the swarm in `events.jsonl` next to their
    logs, `t` on the trainer's clock."""
    if swarm.workdir.exists():
        with open(swarm.workdir / "events.jsonl", "w") as f:
            for p in swarm.processes:
                for e in p.events:
                    f.write(json.dumps({"process": p.name, "t": round(event_time(p, e) - began, 3), **e}) + "\n")


def profile(swarm: LocalSwarm, rebalance_period: float) -> str:
    path = swarm.workdir / "peer.toml"
    path.write_text(f"progress_period = 0.1\nrebalance_period = {rebalance_period}\n")
    return str(path)


# --- phase A: the optimal assignment, fixed -----------------------------------------------------------


def run_baseline(manifest: RunManifest, args: argparse.Namespace, name: str) -> dict[str, Any]:
    num_stages = manifest.training.num_stages
    assignment = [p % num_stages for p in range(args.peers)]
    end = args.warmup_seconds + args.baseline_seconds
    with LocalSwarm(manifest, workdir=workdir(args, name)) as swarm:
        swarm.start_coordinator()
        peers = swarm.start_peers(assignment, "--profile", profile(swarm, 0))
        trainer = swarm.start_trainer("--no-resume", "--max-seconds", str(end + 1.0))
        trainer.wait_event("step", FIRST_STEP_TIMEOUT)
        began = loop_began(trainer)
        time.sleep(max(0.0, began + args.warmup_seconds - time.monotonic()))
        cpu, load = [machine_cpu()], [os.getloadavg()[0]]
        trainer.wait_event("summary", FIRST_STEP_TIMEOUT + end)
        cpu.append(machine_cpu())
        load.append(os.getloadavg()[0])
    save_events(swarm, loop_began(trainer))
    steps = steps_of(trainer)
    window = [s for s in steps if args.warmup_seconds <= s["elapsed"] < end]
    return {
        "assignment": [assignment.count(s) for s in range(num_stages)],
        "window_s": [args.warmup_seconds, end],
        "samples_per_s": round(rate(steps, args.warmup_seconds, end), 3),
        "dropped_microbatches": sum(s["dropped"] for s in window),
        "peer_throughput_by_stage": {
            str(s): [round(p.ready["throughput"], 1) for p, a in zip(peers, assignment) if a == s] for s in range(num_stages)
        },
        "machine_busy_cores": busy_cores(*cpu),
        "load_average_1min": load,
    }


# --- phase B: everyone on stage 0, rebalancing on -------------------------------------------------------


def peer_timeline(peer: ManagedProcess, began: float) -> list[dict[str, Any]]:
    """The stages a peer served, in order, times on the trainer's clock: `serving` (its `ready`
    event there), `throughput` (its probe there), `origin` (of its state), and once it left
    `drained`, `left` (when it announced it was leaving: the `drained` event minus the drain time its
    log reports, or the `drained` event itself if the log has no such line) and `moving_to`."""
    drains = [float(m.group(2)) for m in DRAINED.finditer(peer.log_path.read_text(errors="replace"))]
    spans: list[dict[str, Any]] = []
    for e in list(peer.events):
        t = round(event_time(peer, e) - began, 3)
        if e.get("event") == "ready":
            spans.append({"stage": e["stage"], "serving": t, "throughput": round(e["throughput"], 1), "origin": e["origin"]})
        elif e.get("event") == "drained" and spans:
            spans[-1]["drained"] = t
            spans[-1]["left"] = round(t - drains.pop(0), 3) if drains else t
        elif e.get("event") == "moving" and spans:
            spans[-1]["moving_to"] = e["to"]
    return spans


def served_counts(timelines: dict[str, list[dict[str, Any]]], t: float, num_stages: int) -> list[int]:
    """Peers serving each stage at trainer time `t` (a peer that announced leaving no longer counts)."""
    counts = [0] * num_stages
    for spans in timelines.values():
        for span in spans:
            if span["serving"] <= t < span.get("left", math.inf):
                counts[span["stage"]] += 1
    return counts


def run_rebalancing(manifest: RunManifest, args: argparse.Namespace) -> dict[str, Any]:
    with LocalSwarm(manifest, workdir=workdir(args, "rebalance")) as swarm:
        swarm.start_coordinator()
        # Started before the peers: its clock covers the whole rebalancing, and its start-up
        # (imports, the data set) does not compete with theirs. It stops with the swarm.
        trainer = swarm.start_trainer("--no-resume", "--max-seconds", "3600")
        trainer.wait_event("step", FIRST_STEP_TIMEOUT)
        peers = swarm.start_peers([0] * args.peers, "--profile", profile(swarm, args.period))
        start_here = max(event_time(p, p.ready) for p in peers)
        began = loop_began(trainer)
        start = start_here - began  # trainer clock
        end = start + args.periods * args.period
        cpu, load = [machine_cpu()], [os.getloadavg()[0]]
        trainer.wait_event(lambda e: e.get("event") == "step" and e["elapsed"] >= end, FIRST_STEP_TIMEOUT + end)
        cpu.append(machine_cpu())
        load.append(os.getloadavg()[0])
        began = loop_began(trainer)  # refined with every step since
        start = start_here - began
        timelines = {p.name: peer_timeline(p, began) for p in peers}  # logs read before the swarm closes
    save_events(swarm, began)
    return {
        "start_on_trainer_clock_s": round(start, 3),
        "first_peer_serving_s": round(min(event_time(p, p.ready) for p in peers) - start_here, 3),
        "steps": steps_of(trainer),
        "timelines": timelines,
        "start": start,
        "machine_busy_cores": busy_cores(*cpu),
        "load_average_1min": load,
    }


def summarize(phase_b: dict[str, Any], baseline: float, args: argparse.Namespace, num_stages: int) -> dict[str, Any]:
    """Phase B's figures, times since the start (the last peer serving stage 0)."""
    steps, start, period, timelines = phase_b["steps"], phase_b["start"], args.period, phase_b["timelines"]
    per_period = []
    for k in range(args.periods):
        a, b = start + k * period, start + (k + 1) * period
        inside = [s for s in steps if a <= s["elapsed"] < b]
        value = rate(steps, a, b)
        per_period.append({
            "period": k + 1, "samples_per_s": round(value, 3), "ratio": ratio(value, baseline),
            "dropped_microbatches": sum(s["dropped"] for s in inside),
            "assignment_at_end": served_counts(timelines, b, num_stages),
        })
    # One-period windows sliding by SLIDE_S: the best ending within the goal's periods, and the first
    # one to reach the goal (any time in the phase).
    ends = [start + period + i * SLIDE_S for i in range(int((args.periods - 1) * period / SLIDE_S) + 1)]
    windows = [(e - start, rate(steps, e - period, e)) for e in ends]
    within = [w for w in windows if w[0] <= GOAL_PERIODS * period + 1e-9]
    best_end, best = max(within, key=lambda w: w[1])
    reached = next((e for e, v in windows if baseline > 0 and v >= GOAL_RATIO * baseline), None)

    moves = []
    for name, spans in timelines.items():
        for before, after in zip(spans, spans[1:]):
            moves.append({
                "peer": name, "from": before["stage"], "to": after["stage"],
                "left_s": round(before.get("left", before["serving"]) - start, 3),
                "serving_s": round(after["serving"] - start, 3),
                "in_transit_s": round(after["serving"] - before.get("left", before["serving"]), 3),
                "throughput_there": after["throughput"], "origin": after["origin"],
            })
    moves.sort(key=lambda m: m["left_s"])
    in_transit = [(m["left_s"], 1) for m in moves] + [(m["serving_s"], -1) for m in moves]
    peak, now = 0, 0
    for _, change in sorted(in_transit):  # an arrival sorts before a departure at the same instant
        now += change
        peak = max(peak, now)
    later = rate(steps, start + GOAL_PERIODS * period, start + args.periods * period) if args.periods > GOAL_PERIODS else None
    arrivals = sorted(s["serving"] for spans in timelines.values() for s in spans)
    all_served = next(
        (t - start for t in arrivals if t >= start and min(served_counts(timelines, t, num_stages)) > 0), None
    )
    first_samples = next((s["elapsed"] - start for s in steps if s["samples"] > 0 and s["elapsed"] >= start), None)
    final = {name: spans[-1]["stage"] for name, spans in timelines.items()}
    balanced_on_0 = -(-args.peers // num_stages)
    return {
        "start_on_trainer_clock_s": phase_b["start_on_trainer_clock_s"],
        "first_peer_serving_s": phase_b["first_peer_serving_s"],
        "per_period": per_period,
        f"period_{GOAL_PERIODS}_ratio": per_period[GOAL_PERIODS - 1]["ratio"] if args.periods >= GOAL_PERIODS else None,
        "best_window_within_3_periods": {
            "ends_s": round(best_end, 3), "samples_per_s": round(best, 3), "ratio": ratio(best, baseline),
        },
        "later_periods_samples_per_s": round(later, 3) if later is not None else None,
        "later_periods_ratio": ratio(later, baseline) if later is not None else None,
        # The same comparison within phase B: no drift of the machine's load between two swarms.
        f"period_{GOAL_PERIODS}_to_later_periods": (
            ratio(per_period[GOAL_PERIODS - 1]["samples_per_s"], later) if later else None
        ),
        "first_window_at_goal_ends_s": round(reached, 3) if reached is not None else None,
        "first_window_at_goal_periods": round(reached / period, 2) if reached is not None else None,
        "all_stages_served_s": round(all_served, 3) if all_served is not None else None,
        "first_samples_s": round(first_samples, 3) if first_samples is not None else None,
        "moves": moves,
        "min_moves_needed": args.peers - balanced_on_0,
        "excess_moves": len(moves) - (args.peers - balanced_on_0),
        "most_peers_in_transit": peak,
        "last_move_serving_s": max((m["serving_s"] for m in moves), default=None),
        "final_assignment": [list(final.values()).count(s) for s in range(num_stages)],
        "final_stage_by_peer": final,
        "initial_throughputs": [spans[0]["throughput"] for spans in timelines.values()],
        "machine_busy_cores": phase_b["machine_busy_cores"],
        "load_average_1min": phase_b["load_average_1min"],
    }


def main() -> None:
    args = parse_args()
    manifest = tiny_manifest("rebalance-smoke") if args.smoke else load_manifest(args.run) if args.run else RunManifest(name="demo")
    if args.stages is not None:
        manifest = dataclasses.replace(manifest, training=dataclasses.replace(manifest.training, num_stages=args.stages))
    num_stages = manifest.training.num_stages
    if args.peers < num_stages:
        raise SystemExit(f"need at least one peer per stage ({num_stages})")
    began = time.monotonic()
    baselines = {"before": run_baseline(manifest, args, "baseline")}
    phase_b = run_rebalancing(manifest, args)
    if args.baseline_after:
        baselines["after"] = run_baseline(manifest, args, "baseline_after")
    rates = [b["samples_per_s"] for b in baselines.values()]
    baseline = sum(rates) / len(rates)
    rebalancing = summarize(phase_b, baseline, args, num_stages)
    result = {
        "benchmark": "rebalance",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "smoke": args.smoke,
        "run_id": manifest.run_id,
        "config": {
            "manifest": manifest.name, "stages": num_stages, "peers": args.peers, "rebalance_period_s": args.period,
            "rebalance_margin": PeerConfig().rebalance_margin, "periods": args.periods, "warmup_seconds": args.warmup_seconds,
            "baseline_seconds": args.baseline_seconds, "goal": f">= {GOAL_RATIO} x baseline within {GOAL_PERIODS} periods",
        },
        "baseline": baselines,
        "baseline_samples_per_s": round(baseline, 3),
        "baseline_after_to_before": ratio(rates[-1], rates[0]) if len(rates) > 1 else None,
        "rebalancing": rebalancing,
        "total_wall_s": round(time.monotonic() - began, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
