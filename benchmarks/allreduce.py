"""All-reduce benchmark: swarmnet's data plane against torch.distributed gloo, same run, same peers.

    python benchmarks/allreduce.py [--size-mb 100] [--peers 4] [--repeats 5] [--loop uvloop|asyncio]
                                   [--out benchmarks/results/allreduce.json]

Each peer is a separate process (multiprocessing spawn) on 127.0.0.1 that holds both an
`AllReduceServer` and a gloo process group. Every repetition runs each method once on the same
float32 tensor after a gloo barrier; a repetition's time is the slowest peer's. Reported: per-method
median over the repetitions (after one warm-up), and the ratio swarmnet / gloo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METHODS = ("swarmnet", "swarmnet_out", "gloo")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _peer(rank: int, world: int, gloo_port: int, numel: int, repeats: int, loop: str, pipe) -> None:
    import torch
    import torch.distributed as dist

    from swarmnet.averaging.allreduce import AllReduceServer, Member, all_reduce

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        server = runner.run(AllReduceServer.create())
        pipe.send((server.host, server.port))
        members = [Member(peer_id=f"peer{i}", host=h, port=p) for i, (h, p) in enumerate(pipe.recv())]
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=world
        )
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        reused = torch.zeros(numel)  # for `out=`: pages already mapped, as gloo's in-place buffer
        times: dict[str, list[float]] = {method: [] for method in METHODS}
        cpu: dict[str, list[float]] = {method: [] for method in METHODS}
        max_difference = 0.0
        for rep in range(repeats + 1):
            results = {}
            for method in METHODS:
                if method == "gloo":
                    results[method] = tensor.clone()
                dist.barrier()
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                if method == "gloo":
                    dist.all_reduce(results[method])
                else:
                    results[method], weight = runner.run(
                        all_reduce(
                            server,
                            round_id=f"{method}-{rep}",
                            members=members,
                            my_index=rank,
                            tensor=tensor,
                            weight=1.0,
                            timeout=120.0,
                            out=reused if method == "swarmnet_out" else None,
                        )
                    )
                    assert weight == world
                times[method].append(time.perf_counter() - start)
                cpu[method].append(_cpu_seconds() - start_cpu)
            assert torch.equal(results["swarmnet"], results["swarmnet_out"])
            max_difference = max(max_difference, (results["swarmnet"] - results["gloo"]).abs().max().item())
            del results
        dist.barrier()
        dist.destroy_process_group()
        runner.run(server.close())
    pipe.send({"times": times, "cpu": cpu, "max_abs_difference_vs_gloo": max_difference})


def _receive(pipe, process, timeout: float):
    """The next message from a peer process; fails instead of waiting forever if it died."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.5):
        if not process.is_alive():
            raise SystemExit(f"peer process {process.name} died (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"peer process {process.name} sent nothing for {timeout} s")
    return pipe.recv()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--out", default="benchmarks/results/allreduce.json")
    args = parser.parse_args()
    numel = int(args.size_mb * 1_000_000) // 4
    load = os.getloadavg()[0]

    ctx = mp.get_context("spawn")
    gloo_port = _free_port()
    pipes, processes = [], []
    try:
        for rank in range(args.peers):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_peer,
                args=(rank, args.peers, gloo_port, numel, args.repeats, args.loop, child),
                daemon=True,
            )
            process.start()
            pipes.append(parent)
            processes.append(process)
        addresses = [_receive(pipe, process, 120) for pipe, process in zip(pipes, processes)]
        for pipe in pipes:
            pipe.send(addresses)
        reports = [_receive(pipe, process, 900) for pipe, process in zip(pipes, processes)]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    medians, per_repeat, cpu = {}, {}, {}
    for method in METHODS:
        slowest = [max(r["times"][method][rep] for r in reports) for rep in range(args.repeats + 1)]
        per_repeat[method] = [round(t, 4) for t in slowest]
        medians[method] = statistics.median(slowest[1:])
        cpu[method] = statistics.median(
            sum(r["cpu"][method][rep] for r in reports) for rep in range(1, args.repeats + 1)
        )
    result = {
        "benchmark": "allreduce",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": load,
        "size_mb": args.size_mb,
        "numel": numel,
        "peers": args.peers,
        "repeats": args.repeats,
        "loop": args.loop,
        "swarmnet_median_s": round(medians["swarmnet"], 4),
        "swarmnet_out_median_s": round(medians["swarmnet_out"], 4),
        "gloo_median_s": round(medians["gloo"], 4),
        "swarmnet_over_gloo": round(medians["swarmnet"] / medians["gloo"], 3),
        "swarmnet_out_over_gloo": round(medians["swarmnet_out"] / medians["gloo"], 3),
        "cpu_s_all_peers_median": {method: round(cpu[method], 4) for method in METHODS},
        "per_repeat_s (first is warm-up)": per_repeat,
        "max_abs_difference_vs_gloo": max(r["max_abs_difference_vs_gloo"] for r in reports),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
