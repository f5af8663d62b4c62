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
import platform
import socket
import statistics
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=world)
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        times: dict[str, list[float]] = {"swarmnet": [], "gloo": []}
        max_difference = 0.0
        for rep in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            ours, weight = runner.run(
                all_reduce(server, round_id=f"bench-{rep}", members=members, my_index=rank,
                           tensor=tensor, weight=1.0, timeout=120.0)
            )
            times["swarmnet"].append(time.perf_counter() - start)
            assert weight == world
            theirs = tensor.clone()
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(theirs)
            times["gloo"].append(time.perf_counter() - start)
            max_difference = max(max_difference, (ours - theirs).abs().max().item())
            del ours, theirs
        dist.barrier()
        dist.destroy_process_group()
        runner.run(server.close())
    pipe.send({"times": times, "max_abs_difference_vs_gloo": max_difference})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--out", default="benchmarks/results/allreduce.json")
    args = parser.parse_args()
    numel = int(args.size_mb * 1_000_000) // 4

    ctx = mp.get_context("spawn")
    gloo_port = _free_port()
    pipes, processes = [], []
    try:
        for rank in range(args.peers):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_peer, args=(rank, args.peers, gloo_port, numel, args.repeats, args.loop, child), daemon=True
            )
            process.start()
            pipes.append(parent)
            processes.append(process)
        addresses = [pipe.recv() for pipe in pipes]
        for pipe in pipes:
            pipe.send(addresses)
        reports = [pipe.recv() for pipe in pipes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    medians = {}
    per_repeat = {}
    for method in ("swarmnet", "gloo"):
        slowest = [max(r["times"][method][rep] for r in reports) for rep in range(args.repeats + 1)]
        per_repeat[method] = [round(t, 4) for t in slowest]
        medians[method] = statistics.median(slowest[1:])
    result = {
        "benchmark": "allreduce",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {mp.cpu_count()} cores",
        "size_mb": args.size_mb,
        "numel": numel,
        "peers": args.peers,
        "repeats": args.repeats,
        "loop": args.loop,
        "swarmnet_median_s": round(medians["swarmnet"], 4),
        "gloo_median_s": round(medians["gloo"], 4),
        "swarmnet_over_gloo": round(medians["swarmnet"] / medians["gloo"], 3),
        "per_repeat_s (first is warm-up)": per_repeat,
        "max_abs_difference_vs_gloo": max(r["max_abs_difference_vs_gloo"] for r in reports),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
