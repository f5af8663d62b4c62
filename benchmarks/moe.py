"""MoE expert benchmark: one call to a remote expert (its forward, then its backward, over the stage
protocol) against the same expert computed in this process, same run, same tensors.

    python benchmarks/moe.py [--d-model 128] [--d-expert 512] [--tokens 512] [--repeats 100]
                             [--warmup 5] [--concurrency 4] [--expert-batch-tokens N] [--threads 1]
                             [--idle-seconds 2] [--loop uvloop|asyncio] [--timeout 300] [--smoke]
                             [--out benchmarks/results/moe.json]

The run is the default model and training config (d_model 128, microbatches of 8 x 64 tokens) with
`--d-model` as its width and one MoE layer in block 0 holding one expert, `expert.0.0` (d_model ->
d_expert -> d_model with a GELU), top_k 1. The largest batch an expert accepts is one microbatch
(`microbatch_size * seq_len` tokens), so the microbatch is sized to hold `--tokens`.
`--expert-batch-tokens` defaults to 10^12: no optimizer step is ever taken, on either side, and both
measure forward + backward + gradient accumulation only (pass 0 for the manifest's default, the
expected share of one batch: then both sides step every few calls, at different calls).

A `LocalSwarm` (temp workdir, removed afterwards) runs a coordinator and one expert peer, a real
`swarmnet join --expert expert.0.0` process, with the default peer profile: one compute thread.
This process joins the swarm with a client-mode `SwarmDHT` and calls the expert through a
`StageStub`. With `torch.set_num_threads(--threads)` (default: the peer's `compute_threads`), it
also builds the same expert (`build_expert`, the same seeded init) in a `StageComputer`: exactly
what the expert peer computes for a call. Inputs are seeded random float32, (tokens, d_model), and
a random gradient of the output. In every repetition, in a rotating order:

- `local`: `computer.forward(x)`, then `computer.backward(x, grad)` (recomputes the forward with
  grad, back-propagates, accumulates the parameter gradients);
- `remote`: `stub.forward(run_id, call_id, unit, x)`, then `stub.backward(run_id, call_id, unit,
  grad)`, a fresh call id per call: the peer caches the input, its backward recomputes the forward
  and returns the gradient of the input. Around this call the peer's own `/metrics` are read, to
  split its latency into the peer's compute (as its compute histogram times it: queueing on its
  compute thread included) and the rest (validation, framing, one libp2p stream per half through
  this process's p2pd and the peer's);
- `remote_concurrent`: `--concurrency` such calls started at once, timed until the last backward
  answers (the start and the drain of the round included).

The first `--warmup` repetitions are left out of the statistics; in the very first one the remote
output and input gradient are checked against the local ones (same weights: no step yet).

Reported: median and p90 latency (ms) of forward + backward, local and remote, and of each half;
overhead_ms = remote - local medians; ratio = remote / local; tokens/s: local, remote one call at a
time, and remote with `--concurrency` calls in flight (the peer computes on one thread, so local
tokens/s is its ceiling); the peer's compute time per remote call; bytes moved per call; the CPU
time per call of every process a call involves (this one, its p2pd, the peer and its p2pd; read
from /proc in clock ticks, summed over the measured repetitions, their background work included:
what the peer does after it answered, such as publishing its progress to the DHT, lands in the
window of whichever method comes next), and that background alone: the cores they use over
`--idle-seconds` with no call in flight, measured between the warm-up and the measured
repetitions; the machine (platform, CPU, cores, load average); the configuration; every
repetition's times.

Time is bounded: the coordinator and the peer each get `LocalSwarm`'s start-up timeout, every call
`CALL_TIMEOUT`, and the whole measurement `--timeout` seconds; the full run takes about 25 s on a
2-core machine, start-up included. `--smoke` (d_model 64, d_expert 128, 128 tokens, 8 repetitions,
concurrency 2) takes about 10 s and checks that the benchmark works end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path

import torch

from swarmnet.config import ModelConfig, MoEConfig, PeerConfig, RunManifest, TrainingConfig
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.models.moe import build_expert, expert_batch_tokens, max_expert_tokens, unit_of
from swarmnet.peer.compute import StageComputer
from swarmnet.protocols.stage import StageStub
from swarmnet.testing.chaos import group_pids
from swarmnet.testing.processes import cpu_seconds as process_cpu_seconds
from swarmnet.testing.swarm import LocalSwarm

UID = "expert.0.0"
SEED = 20261123
SEQ_LEN = 64
NO_STEP = 10**12
"""Default `expert_batch_tokens`: more tokens than any run of this benchmark sends."""
CALL_TIMEOUT = 30.0
METHODS = ("local", "remote", "remote_concurrent")
COMPUTE_SUM = "swarmnet_stage_compute_seconds_sum"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-expert", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8 * SEQ_LEN, help="tokens per call (default 512)")
    parser.add_argument("--repeats", type=int, default=100, help="measured repetitions (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="repetitions left out of the statistics")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight in remote_concurrent")
    parser.add_argument(
        "--expert-batch-tokens", type=int, default=NO_STEP,
        help="tokens per optimizer step (default 10^12: never; 0: the manifest's default)",
    )
    parser.add_argument(
        "--threads", type=int, default=PeerConfig().compute_threads,
        help="torch threads here (default: the peer's compute_threads)",
    )
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="background CPU measured this long")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole measurement")
    parser.add_argument("--smoke", action="store_true", help="a small, quick run: does it work at all")
    parser.add_argument("--out", default="benchmarks/results/moe.json")
    args = parser.parse_args()
    if args.smoke:
        args.d_model, args.d_expert, args.tokens = 64, 128, 128
        args.repeats, args.warmup, args.concurrency, args.idle_seconds = 8, 2, 2, 1.0
    if min(args.d_model, args.d_expert, args.tokens, args.concurrency, args.threads) < 1:
        parser.error("--d-model, --d-expert, --tokens, --concurrency and --threads must be positive")
    if args.repeats < 2 or args.warmup < 1 or args.expert_batch_tokens < 0 or args.idle_seconds <= 0:
        parser.error("need --repeats >= 2, --warmup >= 1, --expert-batch-tokens >= 0 and --idle-seconds > 0")
    return args


def make_manifest(args: argparse.Namespace) -> RunManifest:
    """The default model with one MoE layer of one expert, and microbatches that hold `--tokens`."""
    seq_len = min(SEQ_LEN, args.tokens)
    microbatch = math.ceil(args.tokens / seq_len)
    moe = MoEConfig(
        layers=(0,), num_experts=1, top_k=1, d_expert=args.d_expert,
        expert_batch_tokens=args.expert_batch_tokens,
    )
    # gcd(4, d_model): the default head count where it divides d_model (attention is not benchmarked).
    heads = math.gcd(4, args.d_model)
    model = dataclasses.replace(ModelConfig(), d_model=args.d_model, n_heads=heads, moe=moe)
    # Four microbatches per batch, as in the default (8 x 64 tokens, batches of 32 sequences).
    training = TrainingConfig(microbatch_size=microbatch, seq_len=seq_len, target_batch_size=4 * microbatch)
    return RunManifest(name="moe-benchmark", model=model, training=training)


def loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def cpu_seconds(processes: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds used so far by each role's processes (all their threads)."""
    return {role: process_cpu_seconds(pids) for role, pids in processes.items()}


def cpu_since(processes: dict[str, list[int]], before: dict[str, float]) -> dict[str, float]:
    return {role: seconds - before[role] for role, seconds in cpu_seconds(processes).items()}


def compute_seconds(metrics_addr: str) -> float:
    """The expert peer's total compute seconds so far (forward + backward), from its `/metrics`."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    sums = [line for line in text.splitlines() if line.startswith(COMPUTE_SUM + "{")]  # one per kind
    return sum(float(line.rsplit(" ", 1)[1]) for line in sums)


async def measure(
    manifest: RunManifest, ready: dict, expert_pid: int, initial_peers: list[str], args: argparse.Namespace
) -> dict:
    """Every repetition of every method: times in seconds, per repetition (warm-up included), and
    the CPU seconds each method used in all the processes a call involves (warm-up left out)."""
    run_id, unit = manifest.run_id, ready["stage"]
    computer = StageComputer(
        build_expert(manifest, UID), manifest.optimizer, target_batch_size=expert_batch_tokens(manifest)
    )
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.tokens, args.d_model, generator=generator)
    grad = torch.randn(args.tokens, args.d_model, generator=generator)
    call_ids = itertools.count()
    remote_step = 0
    """The expert peer's optimizer step, as its last answer reported it."""

    def local_call() -> tuple[float, float, torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        output = computer.forward(x)
        middle = time.perf_counter()
        grad_input = computer.backward(x, grad).grad_input
        return middle - start, time.perf_counter() - middle, output, grad_input

    async def remote_call(stub: StageStub) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        nonlocal remote_step
        call_id = f"call-{next(call_ids)}"
        start = time.perf_counter()
        result = await asyncio.wait_for(stub.forward(run_id, call_id, unit, x), CALL_TIMEOUT)
        middle = time.perf_counter()
        grad_input = await asyncio.wait_for(stub.backward(run_id, call_id, unit, grad), CALL_TIMEOUT)
        remote_step = result.step
        return middle - start, time.perf_counter() - middle, result.output, grad_input

    times: dict[str, list[float]] = {
        "local_forward": [], "local_backward": [], "remote_forward": [], "remote_backward": [],
        "remote_peer_compute": [], "remote_concurrent_round": [],
    }
    cpu: dict[str, dict[str, float]] = {method: {} for method in METHODS}
    """Method → role → CPU seconds used during its measured repetitions."""
    answers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    """The last output and input gradient of `local` and `remote`."""

    async def run(method: str, stub: StageStub, processes: dict[str, list[int]], measured: bool) -> None:
        """One repetition of `method`: records its times and (if `measured`) its CPU seconds. The
        peer's `/metrics` are read outside the CPU window (the read costs the peer CPU too)."""
        if method == "remote":
            compute_before = compute_seconds(ready["metrics"])
        cpu_before = cpu_seconds(processes)
        if method == "remote_concurrent":
            start = time.perf_counter()
            await asyncio.gather(*(remote_call(stub) for _ in range(args.concurrency)))
            times["remote_concurrent_round"].append(time.perf_counter() - start)
        else:
            if method == "local":
                forward, backward, output, grad_input = local_call()
            else:
                forward, backward, output, grad_input = await remote_call(stub)
            answers[method] = (output, grad_input)
            times[f"{method}_forward"].append(forward)
            times[f"{method}_backward"].append(backward)
        if measured:
            for role, seconds in cpu_since(processes, cpu_before).items():
                cpu[method][role] = cpu[method].get(role, 0.0) + seconds
        if method == "remote":
            times["remote_peer_compute"].append(compute_seconds(ready["metrics"]) - compute_before)

    difference: dict[str, float] = {}
    identity = Identity.ephemeral()
    try:
        dht = await SwarmDHT.create(identity=identity, initial_peers=initial_peers, client_mode=True)
        async with dht:
            stub = StageStub(dht.p2p, ready["peer_id"], ready["maddrs"])
            processes = {
                "benchmark": [os.getpid()],
                "benchmark_p2pd": [dht.p2p._child.pid],
                "expert_peer": [expert_pid],
                # The peer's process group: the peer itself and its p2pd.
                "expert_p2pd": [pid for pid in group_pids(expert_pid) if pid != expert_pid],
            }
            async with asyncio.timeout(args.timeout):
                for rep in range(args.warmup + args.repeats):
                    if rep == args.warmup:  # warm and connected: the swarm's background work alone
                        before = cpu_seconds(processes)
                        await asyncio.sleep(args.idle_seconds)
                        used = cpu_since(processes, before)
                        idle = {role: seconds / args.idle_seconds for role, seconds in used.items()}
                    for method in METHODS[rep % len(METHODS):] + METHODS[: rep % len(METHODS)]:
                        await run(method, stub, processes, measured=rep >= args.warmup)
                    if rep == 0:  # the first call of each, same weights: equal up to float rounding
                        local_out, local_grad = answers["local"]
                        remote_out, remote_grad = answers["remote"]
                        difference = {
                            "output": float((remote_out - local_out).abs().max()),
                            "grad_input": float((remote_grad - local_grad).abs().max()),
                        }
                        if max(difference.values()) > 1e-5:
                            raise SystemExit(f"the remote expert answers unlike the local one: {difference}")
    finally:
        identity.path.unlink(missing_ok=True)
    return {
        "times": times, "cpu": cpu, "idle": idle, "difference": difference,
        "steps": {"local": computer.step, "remote": remote_step},
    }


def stats_ms(seconds: list[float]) -> dict[str, float]:
    values = [s * 1000 for s in seconds]
    return {
        "median": round(statistics.median(values), 3),
        "p90": round(statistics.quantiles(values, n=10, method="inclusive")[-1], 3),
        "min": round(min(values), 3),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    manifest = make_manifest(args)
    assert max_expert_tokens(manifest) >= args.tokens
    load = os.getloadavg()
    started = time.monotonic()
    with LocalSwarm(manifest) as swarm:
        swarm.start_coordinator()
        expert = swarm.start_expert(UID)
        ready = expert.ready
        assert ready["expert"] == UID and ready["stage"] == unit_of(manifest, UID), ready
        setup_s = time.monotonic() - started
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            report = runner.run(measure(manifest, ready, expert.pid, swarm.initial_peers, args))

    skip = args.warmup
    times = {name: values[skip:] for name, values in report["times"].items()}
    local = [f + b for f, b in zip(times["local_forward"], times["local_backward"], strict=True)]
    remote = [f + b for f, b in zip(times["remote_forward"], times["remote_backward"], strict=True)]
    local_ms, remote_ms = stats_ms(local), stats_ms(remote)
    peer_compute_ms = stats_ms(times["remote_peer_compute"])
    round_s = statistics.median(times["remote_concurrent_round"])
    local_tps = args.tokens / statistics.median(local)
    concurrent_tps = args.concurrency * args.tokens / round_s
    tensor_bytes = args.tokens * args.d_model * 4
    calls = {method: args.repeats for method in METHODS}
    calls["remote_concurrent"] *= args.concurrency
    result = {
        "benchmark": "moe",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_at_start": [round(v, 2) for v in load],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "smoke": args.smoke,
        "config": {
            "expert": UID,
            "unit": ready["stage"],
            "d_model": args.d_model,
            "d_expert": args.d_expert,
            "tokens_per_call": args.tokens,
            "expert_batch_tokens": expert_batch_tokens(manifest),
            "optimizer": manifest.optimizer.name,
            "torch_threads_here": args.threads,
            "peer_compute_threads": PeerConfig().compute_threads,
            "repeats": args.repeats,
            "warmup_repeats": args.warmup,
            "concurrency": args.concurrency,
            "loop": args.loop,
        },
        "setup_s (coordinator + expert peer serving)": round(setup_s, 2),
        "bytes_per_call (x, output, grad, grad_input)": 4 * tensor_bytes,
        "local_fwd_bwd_ms": local_ms,
        "remote_fwd_bwd_ms": remote_ms,
        "overhead_ms (remote - local, medians)": round(remote_ms["median"] - local_ms["median"], 3),
        "ratio (remote / local, medians)": round(remote_ms["median"] / local_ms["median"], 3),
        "local_forward_ms": stats_ms(times["local_forward"]),
        "local_backward_ms": stats_ms(times["local_backward"]),
        "remote_forward_ms": stats_ms(times["remote_forward"]),
        "remote_backward_ms": stats_ms(times["remote_backward"]),
        "remote_peer_compute_ms (the peer's own timing of both halves)": peer_compute_ms,
        "remote_rest_ms (remote - peer compute, medians)": round(
            remote_ms["median"] - peer_compute_ms["median"], 3
        ),
        "remote_concurrent_round_ms": stats_ms(times["remote_concurrent_round"]),
        "tokens_per_s": {
            "local": round(local_tps),
            "remote_sequential": round(args.tokens / statistics.median(remote)),
            f"remote_{args.concurrency}_concurrent": round(concurrent_tps),
        },
        "remote_concurrent_over_local (tokens/s)": round(concurrent_tps / local_tps, 3),
        "cpu_ms_per_call (every involved process, background work included)": {
            method: {
                "total": round(1000 * sum(roles.values()) / calls[method], 2),
                **{role: round(1000 * seconds / calls[method], 2) for role, seconds in roles.items()},
            }
            for method, roles in report["cpu"].items()
        },
        f"idle_cpu_cores (the same processes, {args.idle_seconds:g} s with no call)": {
            role: round(cores, 3) for role, cores in report["idle"].items()
        },
        "max_abs_difference_first_call (remote vs local)": report["difference"],
        "optimizer_steps (local, remote)": [report["steps"]["local"], report["steps"]["remote"]],
        "per_repeat_ms (first warmup_repeats are warm-up)": {
            name: [round(v * 1000, 2) for v in values] for name, values in report["times"].items()
        },
        "order": "rotating: repetition r runs local, remote, remote_concurrent starting at the (r mod 3)-th",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
