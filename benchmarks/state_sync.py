"""State-sync benchmark: a joining peer downloading a stage's state from its stage-mates, against
moving the same bytes over a plain TCP socket, same run, same processes.

    python benchmarks/state_sync.py [--size-mb 100] [--sources 3] [--repeats 3] [--piece-mb 4]
                                    [--parallel 4] [--loop uvloop|asyncio]
                                    [--out benchmarks/results/state_sync.json]

Every source is a separate process (multiprocessing spawn) with its own `SwarmDHT` (a real p2pd on
127.0.0.1) and a `StateServicer` serving the same snapshot: `--size-mb` MB (1 MB = 10^6 bytes) of
seeded random float32, laid out like parameters plus AdamW state (`exp_avg`, `exp_avg_sq`, `step`),
so every source holds bit-identical state with the same digest. A downloader process (its own
client-mode `SwarmDHT`) times, in each repetition and in a rotating order:

- `swarmnet_all_sources` (reported as `swarmnet_<N>_sources`): `download_state` from every source,
  the digest check it ends with included;
- `swarmnet_1_source`: `download_state` from the first source alone;
- `direct_all_sources` / `direct_1_source`: the same over the direct data plane, as peers download
  (each source also runs a data port, an `AllReduceServer` with a `DirectEndpoint`, and the
  sources carry its address); the `swarmnet_*` rows are the libp2p path through p2pd (the NAT
  fallback);
- `raw_tcp`: the same number of bytes from the first source process over a plain loopback socket
  (`sendall` / `recv_into` a fresh buffer), no framing, no encryption, no verification.

`download_state` runs with the production defaults (4 MiB pieces, 4 in flight) unless told
otherwise, and a 300 s overall timeout. Reported: per-method median over `--repeats` repetitions
after one warm-up repetition (the very first download also connects to every source: it is the cold
number a joining peer sees, kept in `per_repeat_s`), MiB/s, the ratios against raw TCP, the CPU
seconds every involved process (Python and p2pd alike) spent per method, and, for context, how long
the sha256 digest check of the downloaded bytes takes on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

RUN_ID = "0123456789abcdef"
STAGE = 1
STEP = 1000
SEED = 20261123
LAYERS = 16
COLUMNS = 1024
METHODS = ("direct_all_sources", "direct_1_source", "swarmnet_all_sources", "swarmnet_1_source", "raw_tcp")
DOWNLOAD_TIMEOUT = 300.0


def _loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _entries(size_bytes: int):
    """A parameters + AdamW layout of float32 tensors, about `size_bytes` in all."""
    from swarmnet.averaging.state import OPT_PREFIX, TensorEntry

    rows = max(LAYERS, size_bytes // (3 * 4 * COLUMNS))  # parameter, exp_avg, exp_avg_sq
    per_layer = [rows // LAYERS + (i < rows % LAYERS) for i in range(LAYERS)]
    names = [f"layers.{i}.weight" for i in range(LAYERS)]
    entries = [TensorEntry(name, "float32", [r, COLUMNS]) for name, r in zip(names, per_layer)]
    for name, r in zip(names, per_layer):
        entries += [
            TensorEntry(f"{OPT_PREFIX}{name}.exp_avg", "float32", [r, COLUMNS]),
            TensorEntry(f"{OPT_PREFIX}{name}.exp_avg_sq", "float32", [r, COLUMNS]),
            TensorEntry(f"{OPT_PREFIX}{name}.step", "float32", []),
        ]
    return entries


def _make_snapshot(size_bytes: int, seed: int):
    """Seeded random float32 in the `_entries` layout: the same seed gives the same digest."""
    import numpy as np

    from swarmnet.averaging.state import StateSnapshot, compute_digest

    entries = _entries(size_bytes)
    numel = sum(e.nbytes for e in entries) // 4
    data = np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)
    raw = memoryview(data.view(np.uint8))
    return StateSnapshot(step=STEP, entries=entries, data=raw, digest=compute_digest(STEP, entries, raw))


def _serve_raw_tcp(listener: socket.socket, data: memoryview) -> None:
    """Sends the whole snapshot to every connection, one at a time, until the listener closes."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(data)
            except OSError:
                continue


def _source(identity_path: str, size_bytes: int, loop: str, pipe) -> None:
    """One stage-mate: p2pd + `StateServicer`, plus a raw TCP sender of the same bytes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through the pipe

    from swarmnet.averaging.allreduce import AllReduceServer
    from swarmnet.dht.identity import Identity
    from swarmnet.dht.node import SwarmDHT
    from swarmnet.protocols.direct import DirectEndpoint
    from swarmnet.protocols.state import StateServicer

    async def main() -> None:
        snapshot = _make_snapshot(size_bytes, SEED)

        async def provider():
            return snapshot

        listener = socket.create_server(("127.0.0.1", 0))
        sender = threading.Thread(target=_serve_raw_tcp, args=(listener, snapshot.data), daemon=True)
        sender.start()
        dht = data_port = None
        try:
            identity = Identity.load_or_create(identity_path)
            dht = await SwarmDHT.create(identity=identity)
            servicer = StateServicer(RUN_ID, STAGE, provider)
            await servicer.register(dht.p2p)
            data_port = await AllReduceServer.create()
            data_port.direct = DirectEndpoint(identity)
            servicer.register_direct(data_port.direct)
            pipe.send({
                "data_addr": f"127.0.0.1:{data_port.port}",
                "peer_id": dht.peer_id,
                "maddrs": await dht.visible_maddrs(),
                "digest": snapshot.digest,
                "total_bytes": snapshot.total_bytes,
                "tcp_port": listener.getsockname()[1],
                "p2pd_pid": dht.p2p._child.pid,
                "p2pd_sockets": dht.p2pd_sockets(),
            })
            await asyncio.to_thread(pipe.recv)  # "stop"
        finally:
            listener.close()
            sender.join(timeout=10)
            if data_port is not None:
                await data_port.close()
            if dht is not None:
                await dht.shutdown()

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(main())


def _cpu_ticks(pids: list[int]) -> int:
    """utime + stime of every process in `pids` (each whole thread group), in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def _raw_receive(port: int, total: int) -> bytearray:
    buffer = bytearray(total)
    view, received = memoryview(buffer), 0
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while received < total:
            n = conn.recv_into(view[received:])
            if n == 0:
                raise ConnectionError(f"raw TCP sender closed after {received} of {total} bytes")
            received += n
    return buffer


def _downloader(identity_path: str, args: dict, loop: str, pipe) -> None:
    """The joining peer: a client-mode host that downloads the state repeatedly, timing each method."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from swarmnet.averaging.state import compute_digest
    from swarmnet.averaging.sync import download_state
    from swarmnet.dht.identity import Identity
    from swarmnet.dht.node import SwarmDHT

    sources = [(s["peer_id"], s["maddrs"]) for s in args["sources"]]
    direct_sources = [(s["peer_id"], s["maddrs"], s["data_addr"]) for s in args["sources"]]
    digest, total, port = args["digest"], args["total_bytes"], args["sources"][0]["tcp_port"]
    repeats, tick = args["repeats"], os.sysconf("SC_CLK_TCK")
    entries = _entries(args["size_bytes"])

    async def main() -> dict:
        dht = await SwarmDHT.create(identity=Identity.load_or_create(identity_path), client_mode=True)
        try:
            pipe.send({"p2pd_pid": dht.p2p._child.pid, "p2pd_sockets": dht.p2pd_sockets()})
            pids = [os.getpid(), dht.p2p._child.pid, *args["source_pids"]]

            async def swarmnet(chosen) -> tuple[bytes | memoryview, dict[str, int]]:
                result = await download_state(
                    dht.p2p, chosen, run_id=RUN_ID, stage=STAGE, piece_bytes=args["piece_bytes"],
                    parallel=args["parallel"], timeout=DOWNLOAD_TIMEOUT, direct=dht.direct,
                )
                assert result.snapshot.digest == digest and result.total_bytes == total
                return result.snapshot.data, result.bytes_by_source

            times = {method: [] for method in METHODS}
            cpu = {method: [] for method in METHODS}
            served: dict[str, list[dict[str, int]]] = {method: [] for method in METHODS[:4]}
            verify, order = [], []
            for rep in range(repeats + 1):
                rotation = METHODS[rep % len(METHODS):] + METHODS[: rep % len(METHODS)]
                order.append(list(rotation))
                for method in rotation:
                    before, start = _cpu_ticks(pids), time.perf_counter()
                    if method == "raw_tcp":
                        data = _raw_receive(port, total)
                    else:
                        pool = direct_sources if method.startswith("direct") else sources
                        chosen = pool if method.endswith("all_sources") else pool[:1]
                        data, by_source = await swarmnet(chosen)
                        served[method].append(by_source)
                    times[method].append(time.perf_counter() - start)
                    cpu[method].append((_cpu_ticks(pids) - before) / tick)
                    if method == "raw_tcp":  # the check download_state ends with, timed on its own
                        start = time.perf_counter()
                        assert compute_digest(STEP, entries, data) == digest
                        verify.append(time.perf_counter() - start)
                    del data
            return {"times": times, "cpu": cpu, "verify": verify, "order": order, "served": served}
        finally:
            await dht.shutdown()

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        report = runner.run(main())
    pipe.send(report)


def _receive(pipe, process, timeout: float):
    """The next message from a child process; fails instead of waiting forever if it died."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.5):
        if not process.is_alive():
            raise SystemExit(f"process {process.name} died (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"process {process.name} sent nothing for {timeout} s")
    return pipe.recv()


def _kill_p2pd(pid: int, sockets: list[str]) -> None:
    """Kills a p2pd left behind by a child that had to be killed (only if it is still that p2pd)."""
    with contextlib.suppress(OSError):
        if b"p2pd" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    for path in sockets:
        with contextlib.suppress(OSError):
            os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--piece-mb", type=float, default=4.0, help="MiB per piece (download_state default 4)")
    parser.add_argument("--parallel", type=int, default=4, help="pieces in flight (download_state default 4)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--out", default="benchmarks/results/state_sync.json")
    args = parser.parse_args()
    if args.sources < 1 or args.repeats < 1:
        parser.error("--sources and --repeats must be at least 1")

    from swarmnet.dht.identity import Identity

    load = os.getloadavg()
    size_bytes = int(args.size_mb * 1_000_000)
    ctx = mp.get_context("spawn")
    identities: list[Identity] = []
    processes, pipes = [], []
    p2pds: dict[str, tuple[int, list[str]]] = {}
    started = time.monotonic()
    try:
        for index in range(args.sources):
            identities.append(Identity.ephemeral())
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_source, name=f"source{index}",
                args=(str(identities[-1].path), size_bytes, args.loop, child), daemon=True,
            )
            process.start()
            processes.append(process)
            pipes.append(parent)
        sources = []
        for pipe, process in zip(pipes, processes):
            sources.append(_receive(pipe, process, 180))
            p2pds[process.name] = (sources[-1]["p2pd_pid"], sources[-1]["p2pd_sockets"])
        digests = {s["digest"] for s in sources}
        assert len(digests) == 1, f"sources serve different states: {digests}"
        setup_s = time.monotonic() - started

        identities.append(Identity.ephemeral())
        parent, child = ctx.Pipe()
        downloader = ctx.Process(
            target=_downloader, name="downloader",
            args=(
                str(identities[-1].path),
                {
                    "sources": sources, "digest": sources[0]["digest"], "total_bytes": sources[0]["total_bytes"],
                    "repeats": args.repeats, "size_bytes": size_bytes, "piece_bytes": int(args.piece_mb * (1 << 20)),
                    "parallel": args.parallel, "source_pids": [p.pid for p in processes]
                    + [s["p2pd_pid"] for s in sources],
                },
                args.loop, child,
            ),
            daemon=True,
        )
        downloader.start()
        processes.append(downloader)
        pipes.append(parent)
        own = _receive(parent, downloader, 180)
        p2pds[downloader.name] = (own["p2pd_pid"], own["p2pd_sockets"])
        report = _receive(parent, downloader, 60 * 30)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send("stop")
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
            if process.exitcode != 0 and process.name in p2pds:
                _kill_p2pd(*p2pds[process.name])
        for identity in identities:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()

    total = sources[0]["total_bytes"]
    mib = total / (1 << 20)
    medians = {m: statistics.median(report["times"][m][1:]) for m in METHODS}
    cpu = {m: statistics.median(report["cpu"][m][1:]) for m in METHODS}
    raw = medians["raw_tcp"]
    result = {
        "benchmark": "state_sync",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": [round(x, 2) for x in load],
        "size_mb": args.size_mb,
        "total_bytes": total,
        "total_mib": round(mib, 2),
        "sources": args.sources,
        "repeats": args.repeats,
        "warm_up": "one repetition of every method, excluded from the medians",
        "piece_bytes": int(args.piece_mb * (1 << 20)),
        "parallel": args.parallel,
        "loop": args.loop,
        "sources_setup_s": round(setup_s, 2),
        f"direct_{args.sources}_sources_median_s": round(medians["direct_all_sources"], 4),
        "direct_1_source_median_s": round(medians["direct_1_source"], 4),
        f"direct_{args.sources}_sources_mib_per_s": round(mib / medians["direct_all_sources"], 1),
        "direct_1_source_mib_per_s": round(mib / medians["direct_1_source"], 1),
        f"direct_{args.sources}_sources_over_raw_tcp": round(medians["direct_all_sources"] / raw, 2),
        "direct_1_source_over_raw_tcp": round(medians["direct_1_source"] / raw, 2),
        f"swarmnet_{args.sources}_sources_median_s": round(medians["swarmnet_all_sources"], 4),
        "swarmnet_1_source_median_s": round(medians["swarmnet_1_source"], 4),
        "raw_tcp_median_s": round(raw, 4),
        f"swarmnet_{args.sources}_sources_mib_per_s": round(mib / medians["swarmnet_all_sources"], 1),
        "swarmnet_1_source_mib_per_s": round(mib / medians["swarmnet_1_source"], 1),
        "raw_tcp_mib_per_s": round(mib / raw, 1),
        f"swarmnet_{args.sources}_sources_over_raw_tcp": round(medians["swarmnet_all_sources"] / raw, 2),
        "swarmnet_1_source_over_raw_tcp": round(medians["swarmnet_1_source"] / raw, 2),
        "digest_check_median_s (inside every swarmnet download, not in raw_tcp)": round(
            statistics.median(report["verify"][1:]), 4
        ),
        "cold_first_download_s (connects to every source)": round(report["times"]["swarmnet_all_sources"][0], 4),
        "cpu_s_all_processes_median (python + p2pd, sources and downloader)": {
            m: round(cpu[m], 2) for m in METHODS
        },
        "per_repeat_s (first is warm-up)": {m: [round(t, 4) for t in report["times"][m]] for m in METHODS},
        "order_per_repeat": report["order"],
        f"bytes_by_source_{args.sources}_sources (last repeat)": report["served"]["swarmnet_all_sources"][-1],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
