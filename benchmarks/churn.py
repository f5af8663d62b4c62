"""Churn benchmark: training goodput while stage peers are SIGKILLed and replaced, against the same
swarm's steady state.

    python benchmarks/churn.py [--stages 2] [--peers-per-stage 2] [--run coordinator/runs/demo.toml]
                               [--steady-seconds 60] [--churn-seconds 80] [--kill-every 20]
                               [--warmup-seconds 10] [--rebalance] [--workdir DIR] [--smoke]
                               [--out benchmarks/results/churn.json]

One swarm (coordinator, `--peers-per-stage` peers for each of `--stages` stages, one trainer; real
processes over libp2p on 127.0.0.1) trains for `--steady-seconds` without faults (phase 1), then for
`--churn-seconds` with churn (phase 2): every `--kill-every` s, starting at the beginning of phase 2,
one peer is SIGKILLed (its whole process group: the peer and its p2pd, `chaos.kill`), round-robin
over the peers, and a replacement for the same stage is launched at once without waiting for it to
serve, so its start-up (state download included) overlaps training the way a preempted volunteer
coming back would. The peers run with `rebalance_period = 0` (no stage moves: the ratio measures
churn, not rebalancing) unless `--rebalance` is given.

Goodput of a phase = samples the trainer completed in the phase's window / the window's length. A
step's samples count in the window its completion falls in. Windows are on the trainer's own clock,
the `elapsed` of its `step` events (seconds since its step loop began); the instants this script
acts at (the kills) are mapped onto that clock with the offset min over step events of (arrival
here - elapsed), i.e. when the trainer's loop began as seen from here, to within the delivery of
one stdout line. Phase 1's window is [`--warmup-seconds`, first kill), phase 2's is
[first kill, first kill + `--churn-seconds`); the trainer runs a little longer than both phases so
the second window is always covered. goodput_ratio = churn / steady (SWARM reports about 0.96 with
rebalancing under preemption; our goal is >= 0.9).

Also reported: dropped microbatches, the slowest microbatch and the median step time of each phase;
for each kill its victim, its replacement's start-up time (its `ready` event's `startup_s`, counted
from when the peer's code began, and its launch-to-serving time as seen here, the interpreter and
its imports included; null if it was killed before it served) and CPU seconds (it and its p2pd)
until the next kill, and the goodput of that interval; how many cores of this machine were busy in
each phase (everything on it, not only the swarm: on a saturated machine a replacement's start-up
competes with training, which a real volunteer's would not) and the CPU seconds per second one
peer used in phase 1; how many optimizer steps each stage took in each phase and the longest time
one went without stepping; the run's initial and final loss. With `--workdir` the logs
stay there, with `events.jsonl`: every event of every process, `t` on the trainer's clock.

`--smoke` is a seconds-long run of a tiny model (one peer per stage plus one extra stage-0 peer,
the only one killed) that checks the benchmark works end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from swarmnet.config import (
    RunManifest,
    load_manifest,
)
from swarmnet.testing import chaos
from swarmnet.testing.processes import ManagedProcess, cpu_seconds
from swarmnet.testing.swarm import LocalSwarm, tiny_manifest

TRAINER_MARGIN_S = 1.0
"""The trainer runs this much past both phases: the churn window starts at the first kill, a few ms
after the end of phase 1 on the trainer's clock, and must be covered to its end."""
FIRST_STEP_TIMEOUT = 300.0
SUMMARY_TIMEOUT = 300.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default=None, help="run manifest TOML (default: the embedded demo run)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the manifest's)")
    parser.add_argument("--peers-per-stage", type=int, default=2)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--churn-seconds", type=float, default=80.0)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--rebalance", action="store_true", help="let peers move between stages")
    parser.add_argument("--workdir", default=None, help="keep the logs here (default: a temp dir, removed)")
    parser.add_argument("--smoke", action="store_true", help="a tiny, seconds-long run: does it work at all")
    parser.add_argument("--out", default="benchmarks/results/churn.json")
    args = parser.parse_args()
    if args.smoke:
        args.peers_per_stage, args.steady_seconds, args.churn_seconds = 1, 4.0, 5.0
        args.kill_every, args.warmup_seconds = 5.0, 1.0
    if args.warmup_seconds >= args.steady_seconds or args.kill_every <= 0 or args.churn_seconds <= 0:
        parser.error("need warmup-seconds < steady-seconds and positive kill-every and churn-seconds")
    return args


def window(steps: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The step events whose completion (trainer clock) lies in [start, end)."""
    return [s for s in steps if start <= s["elapsed"] < end]


def goodput(steps: list[dict[str, Any]], start: float, end: float) -> float:
    return sum(s["samples"] for s in window(steps, start, end)) / (end - start)


def group_cpu_s(process: ManagedProcess) -> float:
    """CPU seconds (user + system) used so far by the live members of the process's group (a peer
    and its p2pd)."""
    return round(cpu_seconds(chaos.group_pids(process.pid)), 2)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of this machine so far, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


def stage_step_times(processes: list[ManagedProcess], loop_began: float, stages: int) -> list[list[float]]:
    """For each stage, when (trainer clock) it reached each of its epochs by an optimizer step (a
    `stepped` event with members >= 1; members 0 is a peer downloading the state), first report wins."""
    reached: dict[int, dict[int, float]] = {}
    for p in processes:
        for e in p.events:
            if e.get("event") == "stepped" and e.get("members", 0) >= 1:
                t = p.started_at + e["received_after_s"] - loop_began
                epochs = reached.setdefault(e["stage"], {})
                epochs[e["epoch"]] = min(t, epochs.get(e["epoch"], t))
    return [sorted(reached.get(stage, {}).values()) for stage in range(stages)]


def busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    """How many cores were busy on average between two `machine_cpu()` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total * (os.cpu_count() or 1), 2) if total > 0 else 0.0


def main() -> None:
    args = parse_args()
    if args.smoke:
        manifest = tiny_manifest("churn-smoke")
    else:
        manifest = load_manifest(args.run) if args.run else RunManifest(name="demo")
    if args.stages is not None:
        training = dataclasses.replace(manifest.training, num_stages=args.stages)
        manifest = dataclasses.replace(manifest, training=training)
    num_stages = manifest.training.num_stages
    # Started in this order, so that round-robin kills alternate between the stages.
    stages = [s for _ in range(args.peers_per_stage) for s in range(num_stages)]
    victims = list(range(len(stages)))
    if args.smoke:
        stages.append(0)
        victims = [len(stages) - 1]
    kill_offsets = [k * args.kill_every for k in range(int(-(-args.churn_seconds // args.kill_every)))]

    with LocalSwarm(manifest, workdir=args.workdir) as swarm:
        profile = swarm.workdir / "peer.toml"
        profile.write_text("progress_period = 0.1\n" + ("" if args.rebalance else "rebalance_period = 0\n"))
        swarm.start_coordinator()
        peers: list[ManagedProcess] = swarm.start_peers(stages, "--profile", str(profile))
        trainer = swarm.start_trainer(
            "--max-seconds", str(args.steady_seconds + args.churn_seconds + TRAINER_MARGIN_S)
        )
        first = trainer.wait_event("step", FIRST_STEP_TIMEOUT)
        # Our monotonic clock at the trainer's elapsed 0 (refined below from every step event).
        loop_began = trainer.started_at + first["received_after_s"] - first["elapsed"]

        def at(offset: float) -> None:  # the benchmark's schedule, on the trainer's clock
            time.sleep(max(0.0, loop_began + offset - time.monotonic()))

        at(args.warmup_seconds)
        machine, peer_cpu = [machine_cpu()], [sum(map(group_cpu_s, peers))]
        kills: list[dict[str, Any]] = []
        for k, offset in enumerate(kill_offsets):
            at(args.steady_seconds + offset)
            if kills:
                kills[-1]["replacement_cpu_s"] = group_cpu_s(kills[-1]["process"])
            else:
                machine.append(machine_cpu())
                peer_cpu.append(sum(map(group_cpu_s, peers)))
            slot = victims[k % len(victims)]
            victim, stage = peers[slot], stages[slot]
            killed_at = time.monotonic()
            chaos.kill(victim)
            # Not waited for: it joins (downloads the stage's state) while training goes on; the swarm
            # holds its handle and reaps it on close.
            peers[slot] = swarm.start_peer(stage, "--profile", str(profile), wait=False)
            kills.append({
                "stage": stage, "victim": victim.name, "victim_served": victim.ready is not None,
                "replacement": peers[slot].name, "killed_at": killed_at, "process": peers[slot],
            })
        at(args.steady_seconds + args.churn_seconds)
        kills[-1]["replacement_cpu_s"] = group_cpu_s(kills[-1]["process"])
        machine.append(machine_cpu())
        summary = trainer.wait_event("summary", SUMMARY_TIMEOUT)
        for p in swarm.processes:  # all leave at once; `close()` then waits for each and reaps it
            if p.alive:  # not reaped yet: its pid is still its own
                p.signal(signal.SIGTERM)

    steps = [e for e in trainer.events if e.get("event") == "step"]
    loop_began = min(trainer.started_at + e["received_after_s"] - e["elapsed"] for e in steps)
    for kill in kills:
        kill["at_s"] = round(kill.pop("killed_at") - loop_began, 3)
    if args.workdir:  # every event of every process, `t` on the trainer's clock, for a closer look
        with open(Path(args.workdir) / "events.jsonl", "w") as f:
            for p in swarm.processes:
                for event in p.events:
                    t = round(p.started_at + event["received_after_s"] - loop_began, 3)
                    f.write(json.dumps({"process": p.name, "t": t, **event}) + "\n")
    churn_start = kills[0]["at_s"]
    churn_end = churn_start + args.churn_seconds
    phases = {"steady": (args.warmup_seconds, churn_start), "churn": (churn_start, churn_end)}
    rates = {name: goodput(steps, *bounds) for name, bounds in phases.items()}

    per_kill = []
    for k, kill in enumerate(kills):
        process: ManagedProcess = kill.pop("process")
        ready = process.ready
        end = kills[k + 1]["at_s"] if k + 1 < len(kills) else churn_end
        after = window(steps, kill["at_s"], end)
        per_kill.append({
            **kill,
            "replacement_startup_s": ready["startup_s"] if ready else None,
            "replacement_launch_to_serving_s": ready["received_after_s"] if ready else None,
            "replacement_origin": ready.get("origin") if ready else None,
            "samples_per_s_until_next_kill": goodput(steps, kill["at_s"], end),
            "longest_step_s": max((s["step_seconds"] for s in after), default=None),
            "dropped_microbatches": sum(s["dropped"] for s in after),
        })

    def phase_stat(name: str, key: str, reduce) -> Any:
        values = [s[key] for s in window(steps, *phases[name])]
        return reduce(values) if values else None

    stage_steps = stage_step_times(swarm.processes, loop_began, num_stages)

    def stage_stats(name: str) -> dict[str, Any]:
        """Optimizer steps each stage took in the phase (one per trainer step when all is well) and
        the longest time one went without stepping (its gradients pile up meanwhile)."""
        start, end = phases[name]
        trainer_steps = len(window(steps, start, end))
        counts, gaps = [], []
        for times in stage_steps:
            inside = [t for t in times if start <= t < end]
            counts.append(len(inside))
            gaps.append(max((b - a for a, b in zip([start, *inside], [*inside, end])), default=end - start))
        return {f"{name}_trainer_steps": trainer_steps, f"{name}_stage_steps": counts,
                f"{name}_max_stage_step_gap_s": round(max(gaps), 3)}

    # CPU seconds per second one peer of phase 1 used, on average: what a replacement would need once serving
    steady_peer_cpu = (peer_cpu[1] - peer_cpu[0]) / len(peers) / (churn_start - args.warmup_seconds)
    result = {
        "benchmark": "churn",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}",
        "run_id": manifest.run_id,
        "smoke": args.smoke,
        "stages": num_stages,
        "peers_per_stage": args.peers_per_stage,
        "extra_stage0_victim": args.smoke,
        "rebalance": args.rebalance,
        "kill_every_s": args.kill_every,
        "warmup_seconds": args.warmup_seconds,
        "steady_seconds": args.steady_seconds,
        "churn_seconds": args.churn_seconds,
        "kills": len(kills),
        "steady_window_s": [round(v, 3) for v in phases["steady"]],
        "churn_window_s": [round(v, 3) for v in phases["churn"]],
        "steady_samples_per_s": rates["steady"],
        "churn_samples_per_s": rates["churn"],
        "goodput_ratio": rates["churn"] / rates["steady"] if rates["steady"] > 0 else None,
        "steady_dropped_microbatches": phase_stat("steady", "dropped", sum),
        "churn_dropped_microbatches": phase_stat("churn", "dropped", sum),
        "steady_slowest_microbatch_s": phase_stat("steady", "slowest_microbatch_s", max),
        "churn_slowest_microbatch_s": phase_stat("churn", "slowest_microbatch_s", max),
        "steady_median_step_s": phase_stat("steady", "step_seconds", statistics.median),
        "churn_median_step_s": phase_stat("churn", "step_seconds", statistics.median),
        "steady_machine_busy_cores": busy_cores(machine[0], machine[1]),
        "churn_machine_busy_cores": busy_cores(machine[1], machine[2]),
        "machine_cores": os.cpu_count(),
        "steady_peer_cpu_s_per_s": round(steady_peer_cpu, 3),
        **stage_stats("steady"),
        **stage_stats("churn"),
        "restarted_peer_startup_s": [k["replacement_startup_s"] for k in per_kill],
        "restarted_peer_launch_to_serving_s": [k["replacement_launch_to_serving_s"] for k in per_kill],
        "per_kill": per_kill,
        "trainer_steps": len(steps),
        "initial_loss": summary["initial_loss"],
        "final_loss": summary["final_loss"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
