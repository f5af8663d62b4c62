"""DHT benchmark (issue 9, P9): a swarm of `SwarmDHT` nodes on one host, each with its own p2pd,
storing and reading swarmnet's signed records. Goal: 128 peers, every store and get succeeds,
p50 get <= 20 ms.

    python benchmarks/dht.py [--peers 128] [--workers 8] [--gets 10] [--stage-gets 2]
                             [--stage-keys 4] [--start-parallel 1] [--idle-seconds 10]
                             [--smoke] [--out benchmarks/results/dht.json]

The nodes live in `--workers` worker processes (this script with `--worker`), each one asyncio
loop holding its share of the nodes; every node has its own p2pd on 127.0.0.1 and an ephemeral
identity. A worker runs in its own session, so its p2pds share its process group, which is
SIGKILLed at the end whatever happened. The controller (this process) drives each worker over its
stdin/stdout, one JSON line per command and per reply.

Start-up: node 0 starts alone; then every worker starts its other nodes (`--start-parallel` at a
time), all bootstrapping from node 0's multiaddrs. A start that fails (p2pd not up within
hivemind's 15 s, or node 0 not answering the bootstrap ping in time: an overloaded host) is retried
up to 3 times and reported. The swarm is ready when every routing table holds min(peers - 1, 5)
nodes (enough to place a record's 5 replicas), polled every 0.5 s with a deadline.

Records (real swarmnet types, signed by their node): node i stores a `StageServerRecord` under the
stage key `stage_key(run, i % stage_keys)` (`peers / stage_keys` nodes share each stage key, one
subkey each: 32 at 128 peers and 4 keys) and a `ProgressRecord` under its own key
`progress_key(run, 1000 + i)`; the record's step/epoch is the store round, so a stale copy counts
as a failure. Four phases, every operation timed inside its worker:

1. store, one at a time (round 1): every node puts its two records; one operation in flight in
   the whole swarm;
2. get, one at a time: every node gets `--gets` unique keys of random other nodes and
   `--stage-gets` random stage keys;
3. store, all at once (round 2, as heartbeats refresh records): every node puts its two records in
   sequence, all nodes concurrently;
4. get, all at once: new random targets, every node's gets in sequence, all nodes concurrently.

A get succeeds when it returns exactly the records stored: the same signers, records equal to the
latest round's, expirations within that store's window (if a store failed, its previous round is
accepted too); a stage key must return all its subkeys. `SwarmDHT.get` reads with `latest=True`.
Also reported: start-up times, routing table sizes, RSS and open sockets of every worker and p2pd,
CPU seconds (python and p2pd, from /proc) per phase and while the swarm idles for
`--idle-seconds` after start-up and at the end, and each phase's worst event-loop lag in a worker.
`--smoke`: 8 peers, 2 workers, 2 stage keys, 4 + 1 gets per node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from hivemind.utils import get_dht_time

from swarmnet.dht import keys
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import ProgressRecord, StageServerRecord
from swarmnet.errors import ConfigError
from swarmnet.telemetry import events
from swarmnet.testing import chaos
from swarmnet.testing.processes import cpu_seconds

TTL = 900.0
REPLY = "@dht-bench "
READY_TABLE = 5
"""Ready: every routing table holds min(peers - 1, READY_TABLE) nodes (hivemind's num_replicas)."""
READY_TIMEOUT = 120.0
START_TIMEOUT = 900.0
START_ATTEMPTS = 3
OP_TIMEOUT_BOUND = 11.0
"""A worker's command may take this long per operation (SwarmDHT's own bound is 10 s)."""
LAG_PERIOD = 0.05
KINDS = ("unique", "stage")


def expected_record(kind: str, index: int, round_: int, stage_keys: int, maddrs: list[str]) -> Any:
    """What node `index` stores in round `round_`: a pure function, so a reader can check it."""
    if kind == "stage":
        return StageServerRecord(
            stage=index % stage_keys, throughput=100.0 + index, queue_depth=index % 3, device="cpu",
            memory_bytes=(1 << 20) * (index + 1), step=round_, metrics_addr=None, maddrs=maddrs,
            averaging_addr=f"127.0.0.1:{20000 + index}",
        )
    return ProgressRecord(epoch=round_, samples=index, joining=False, left=False, digest=f"{index:064x}")


def record_key(run_id: str, kind: str, index: int, stage_keys: int) -> str:
    if kind == "stage":
        return keys.stage_key(run_id, index % stage_keys)
    return keys.progress_key(run_id, 1000 + index)


# ------------------------------------------------------------------------------------- worker side


class Worker:
    """One process's share of the swarm, on one event loop; answers the controller's commands."""

    def __init__(self, directory: str):
        self.directory = directory
        self.nodes: dict[int, SwarmDHT] = {}
        self.identities: list[Identity] = []
        self.max_lag = 0.0
        """The most the event loop overslept a `LAG_PERIOD` sleep since the last store/get began."""

    async def watch_lag(self) -> None:
        """How starved this worker's event loop is (every RPC to its nodes waits on it)."""
        while True:
            began = time.perf_counter()
            await asyncio.sleep(LAG_PERIOD)
            self.max_lag = max(self.max_lag, time.perf_counter() - began - LAG_PERIOD)

    async def start(self, indices: list[int], bootstrap: list[str], parallel: int) -> dict:
        limit = asyncio.Semaphore(parallel)

        async def one(index: int) -> dict:
            failures: list[str] = []
            async with limit:
                while True:
                    identity = Identity.ephemeral(self.directory)
                    self.identities.append(identity)
                    began = time.perf_counter()
                    try:
                        dht = await SwarmDHT.create(identity=identity, initial_peers=bootstrap, host="127.0.0.1")
                        break
                    except (ConfigError, RuntimeError) as e:  # p2pd not up in 15 s; bootstrap ping unanswered
                        failures.append(f"{type(e).__name__}: {e}"[:160])
                        if len(failures) >= START_ATTEMPTS:
                            raise
                created = time.perf_counter() - began
                self.nodes[index] = dht
                return {"index": index, "peer_id": dht.peer_id, "maddrs": await dht.visible_maddrs(),
                        "sockets": dht.p2pd_sockets(), "create_s": created, "failed_attempts": failures}

        return {"nodes": list(await asyncio.gather(*(one(i) for i in indices)))}

    async def tables(self) -> dict:
        return {"sizes": {i: len(d.node.protocol.routing_table.peer_id_to_uid) for i, d in self.nodes.items()}}

    async def store(self, run_id: str, ops: list[dict], concurrent: bool, stage_keys: int) -> dict:
        async def one(op: dict) -> dict:
            dht = self.nodes[op["node"]]
            record = expected_record(op["kind"], op["node"], op["round"], stage_keys, await dht.visible_maddrs())
            key = record_key(run_id, op["kind"], op["node"], stage_keys)
            lo, began, error = get_dht_time(), time.perf_counter(), None
            try:
                ok = await dht.put(key, record, TTL)
            except Exception as e:  # noqa: BLE001 - a failed operation is a measurement here
                ok, error = False, f"{type(e).__name__}: {e}"
            latency = time.perf_counter() - began
            return {**op, "ok": ok, "latency_s": latency, "window": [lo + TTL, get_dht_time() + TTL], "error": error}

        return await self._run(ops, one, concurrent)

    async def get(self, ops: list[dict], concurrent: bool, peers: dict, latest: dict, stage_keys: int) -> dict:
        async def one(op: dict) -> dict:
            began, error = time.perf_counter(), None
            try:
                found = await self.nodes[op["node"]].get(op["key"])
            except Exception as e:  # noqa: BLE001 - a failed operation is a measurement here
                found, error = [], f"{type(e).__name__}: {e}"
            latency = time.perf_counter() - began
            error = error or check(found, op, peers, latest, stage_keys)
            return {"node": op["node"], "kind": op["kind"], "ok": error is None, "latency_s": latency,
                    "returned": len(found), "expected": len(op["targets"]), "error": error}

        return await self._run(ops, one, concurrent)

    async def _run(self, ops: list[dict], one, concurrent: bool) -> dict:
        """One op at a time, or every node's ops in sequence with all nodes concurrently."""
        self.max_lag = 0.0
        if concurrent:
            by_node: dict[int, list[dict]] = {}
            for op in ops:
                by_node.setdefault(op["node"], []).append(op)

            async def sequence(node_ops: list[dict]) -> list[dict]:
                return [await one(op) for op in node_ops]

            results = [r for rs in await asyncio.gather(*map(sequence, by_node.values())) for r in rs]
        else:
            results = [await one(op) for op in ops]
        return {"results": results, "loop_lag_max_s": self.max_lag}

    async def stop(self) -> dict:
        results = await asyncio.gather(*(d.shutdown() for d in self.nodes.values()), return_exceptions=True)
        for identity in self.identities:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()
        return {"stopped": len(results), "errors": [repr(r) for r in results if isinstance(r, BaseException)]}


def check(found: list, op: dict, peers: dict, latest: dict, stage_keys: int) -> str | None:
    """None when `found` holds exactly the latest records of `op["targets"]`; else what differs.
    `latest[kind][index]`: the acceptable (round, earliest expiration, latest expiration)."""
    got = {r.peer_id: r for r in found}
    want = {peers[str(t)]["peer_id"]: t for t in op["targets"]}
    if set(got) != set(want):
        return f"returned {len(got)} records, {len(set(got) & set(want))} of the {len(want)} expected"
    for peer_id, index in want.items():
        signed, maddrs = got[peer_id], peers[str(index)]["maddrs"]
        if signed.key != op["key"]:
            return "a record was signed for another key"
        if not any(
            signed.record == expected_record(op["kind"], index, round_, stage_keys, maddrs)
            and lo - 1e-3 <= signed.expiration <= hi + 1e-3
            for round_, lo, hi in latest[op["kind"]][str(index)]
        ):
            return "a record is not the latest one stored (stale or altered)"
    return None


async def worker_main(directory: str) -> None:
    worker = Worker(directory)
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(worker.watch_lag())
        await serve(worker)
        watcher.cancel()


async def serve(worker: Worker) -> None:
    """Answers the controller's commands, one JSON line each, until `stop` or the end of input."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            await worker.stop()
            return
        command = json.loads(line)
        op = command.pop("op")
        try:
            reply = await getattr(worker, op)(**command)
        except Exception:  # noqa: BLE001 - reported to the controller, which fails the run
            reply = {"error": traceback.format_exc()}
        sys.stdout.write(REPLY + json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "stop":
            return


# --------------------------------------------------------------------------------- controller side


class WorkerFailed(RuntimeError):
    """A worker exited, answered with an error, or did not answer in time."""


class WorkerProcess:
    """A worker in its own session (its p2pds in its process group), driven over stdin/stdout."""

    def __init__(self, number: int, directory: Path):
        self.name = f"worker-{number}"
        self.log_path = directory / f"{self.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        env = {k: v for k, v in os.environ.items() if k != events.ENV}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.popen = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, start_new_session=True,
        )
        self.replies: queue.Queue[dict | None] = queue.Queue()
        self.sockets: list[str] = []
        """p2pd's unix sockets, removed at the end (a SIGKILLed p2pd leaves them behind)."""
        threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True).start()

    def _read(self) -> None:
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY) :]))
        self.replies.put(None)

    def send(self, op: str, **fields: Any) -> None:
        self.popen.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self.popen.stdin.flush()

    def receive(self, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=max(0.1, timeout))
        except queue.Empty:
            raise WorkerFailed(f"{self.name}: no reply within {timeout:.0f} s\n{self.tail()}") from None
        if reply is None:
            raise WorkerFailed(f"{self.name} exited with {self.popen.wait()}\n{self.tail()}")
        if "error" in reply:
            raise WorkerFailed(f"{self.name}: {reply['error']}")
        return reply

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> list[int]:
        return chaos.group_pids(self.popen.pid)

    def kill(self) -> None:
        chaos.kill(self.popen)
        for path in self.sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._log.close()


class Swarm:
    """The controller's side: the workers, which node lives where, and what each node stored."""

    def __init__(self, args: argparse.Namespace, directory: Path):
        self.args = args
        self.directory = directory
        self.run_id = f"bench-{secrets.token_hex(4)}"
        self.rng = random.Random(args.seed)
        self.owner = {i: i % args.workers for i in range(args.peers)}
        """Node index -> the worker holding it."""
        self.workers: list[WorkerProcess] = []
        self.peers: dict[str, dict] = {}
        """Node index (a string, as JSON keys are) -> its peer id and multiaddrs."""
        self.latest: dict[str, dict[str, list]] = {kind: {} for kind in KINDS}
        """Kind -> node index -> the acceptable (round, expiration window) of its record."""
        self.phases: dict[str, dict] = {}

    def call_all(self, op: str, timeout: float, **fields: Any) -> list[dict]:
        for worker in self.workers:
            worker.send(op, **fields)
        deadline = time.monotonic() + timeout
        return [w.receive(deadline - time.monotonic()) for w in self.workers]

    def start(self) -> dict:
        figures: dict[str, Any] = {}
        began = time.perf_counter()
        for n in range(self.args.workers):
            self.workers.append(WorkerProcess(n, self.directory))
        self.call_all("tables", START_TIMEOUT)  # the workers answer once their imports are done
        figures["workers_spawn_s"] = round(time.perf_counter() - began, 2)
        cpu = {"spawned": usage(self.workers)["cpu_s"]}
        began = time.perf_counter()
        self.workers[0].send("start", indices=[0], bootstrap=[], parallel=1)
        (first,) = self.workers[0].receive(START_TIMEOUT)["nodes"]
        figures["first_node_s"] = round(time.perf_counter() - began, 2)
        for n, worker in enumerate(self.workers):
            indices = [i for i in range(1, self.args.peers) if self.owner[i] == n]
            worker.send("start", indices=indices, bootstrap=first["maddrs"], parallel=self.args.start_parallel)
        started = [first] + [node for w in self.workers for node in w.receive(START_TIMEOUT)["nodes"]]
        figures["all_nodes_created_s"] = round(time.perf_counter() - began, 2)
        for node in started:
            self.workers[self.owner[node["index"]]].sockets += node["sockets"]
            self.peers[str(node["index"])] = {"peer_id": node["peer_id"], "maddrs": node["maddrs"]}
        creates = sorted(node["create_s"] for node in started)
        figures["node_create_s"] = {"median": round(statistics.median(creates), 2), "max": round(creates[-1], 2)}
        figures["failed_start_attempts"] = [f for node in started for f in node["failed_attempts"]]
        cpu["created"] = usage(self.workers)["cpu_s"]

        want = min(self.args.peers - 1, READY_TABLE)
        deadline = time.monotonic() + READY_TIMEOUT
        while (tables := table_stats(self.call_all("tables", 30)))["min"] < want and time.monotonic() < deadline:
            time.sleep(0.5)
        figures["routing_ready_s"] = round(time.perf_counter() - began, 2) if tables["min"] >= want else None
        figures["routing_table_at_ready"] = tables
        figures["usage_at_ready"] = usage(self.workers)
        figures["cpu_s"] = {
            "worker_imports": cpu["spawned"],
            "node_startup": spent(cpu["spawned"], cpu["created"]),
            "until_ready": spent(cpu["created"], figures["usage_at_ready"]["cpu_s"]),
        }
        return figures

    def store(self, name: str, round_: int, concurrent: bool) -> None:
        ops: dict[int, list[dict]] = {n: [] for n in range(self.args.workers)}
        for i in range(self.args.peers):
            for kind in KINDS:
                ops[self.owner[i]].append({"node": i, "kind": kind, "round": round_})
        results = self._phase(name, "store", concurrent, ops, run_id=self.run_id, stage_keys=self.args.stage_keys)
        for r in results:  # a failed store may still have reached some replicas: either round will do
            attempt, before = [r["round"], *r["window"]], self.latest[r["kind"]].get(str(r["node"]), [])
            self.latest[r["kind"]][str(r["node"])] = [attempt] if r["ok"] else [attempt, *before[:1]]

    def get(self, name: str, concurrent: bool) -> None:
        peers, stage_keys = self.args.peers, self.args.stage_keys
        ops: dict[int, list[dict]] = {n: [] for n in range(self.args.workers)}
        for i in range(peers):
            for j in self.rng.sample([j for j in range(peers) if j != i], min(self.args.gets, peers - 1)):
                key = record_key(self.run_id, "unique", j, stage_keys)
                ops[self.owner[i]].append({"node": i, "kind": "unique", "key": key, "targets": [j]})
            for _ in range(self.args.stage_gets):
                stage = self.rng.randrange(stage_keys)
                targets = [j for j in range(peers) if j % stage_keys == stage]
                key = record_key(self.run_id, "stage", stage, stage_keys)
                ops[self.owner[i]].append({"node": i, "kind": "stage", "key": key, "targets": targets})
        self._phase(name, "get", concurrent, ops, peers=self.peers, latest=self.latest, stage_keys=stage_keys)

    def _phase(self, name: str, op: str, concurrent: bool, ops: dict[int, list[dict]], **fields: Any) -> list[dict]:
        cpu_before, began = usage(self.workers)["cpu_s"], time.perf_counter()
        if concurrent:  # every worker at once
            for n, w in enumerate(self.workers):
                w.send(op, ops=ops[n], concurrent=True, **fields)
            limit = 30 + OP_TIMEOUT_BOUND * max(len(o) for o in ops.values())
            replies = [w.receive(limit) for w in self.workers]
        else:  # one worker after the other, each one op at a time
            replies = []
            for n, w in enumerate(self.workers):
                w.send(op, ops=ops[n], concurrent=False, **fields)
                replies.append(w.receive(30 + OP_TIMEOUT_BOUND * len(ops[n])))
        wall = time.perf_counter() - began
        results = [r for reply in replies for r in reply["results"]]
        report: dict[str, Any] = {"regime": "all at once" if concurrent else "one at a time"}
        for kind in KINDS:
            report[f"{kind}_key"] = summary([r for r in results if r["kind"] == kind], wall)
        if op == "get":
            stage = [r for r in results if r["kind"] == "stage"]
            report["stage_key_records_returned"] = {
                "expected": stage[0]["expected"] if stage else 0,
                "min": min((r["returned"] for r in stage), default=0),
                "max": max((r["returned"] for r in stage), default=0),
            }
        report["worker_loop_lag_max_s"] = round(max(reply["loop_lag_max_s"] for reply in replies), 3)
        report["cpu_s"] = spent(cpu_before, usage(self.workers)["cpu_s"])
        self.phases[name] = report
        print(f"{name}: {json.dumps(report)}", file=sys.stderr, flush=True)
        return results

    def stop(self) -> float:
        """Shuts every node down cleanly; returns how long it took."""
        began = time.perf_counter()
        self.call_all("stop", 120)
        for w in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.popen.wait(30)
        return round(time.perf_counter() - began, 2)

    def kill(self) -> None:
        for w in self.workers:
            w.kill()


def usage(workers: list[WorkerProcess]) -> dict:
    """RSS (MiB) and open sockets of the workers and of their p2pds, and their CPU seconds so far,
    from /proc."""
    rss = {"python": 0, "p2pd": 0}
    count = {"python": 0, "p2pd": 0}
    cpu = {"python": 0.0, "p2pd": 0.0}
    sockets = 0
    for pid in [pid for w in workers for pid in w.pids()]:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kind = "p2pd" if comm == "p2pd" else "python"
        rss[kind] += next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
        count[kind] += 1
        cpu[kind] += cpu_seconds([pid])
        if kind == "p2pd":
            sockets += open_sockets(pid)
    mib = {k: round(v / 1024, 1) for k, v in rss.items()}
    return {"rss_mib": {**mib, "total": round(sum(mib.values()), 1)}, "processes": count,
            "rss_mib_per_p2pd": round(mib["p2pd"] / max(1, count["p2pd"]), 1),
            "rss_mib_per_worker": round(mib["python"] / max(1, count["python"]), 1),
            "sockets_per_p2pd": round(sockets / max(1, count["p2pd"]), 1), "cpu_s": rounded(cpu)}


def open_sockets(pid: int) -> int:
    """Sockets `pid` holds open (TCP connections to other p2pds, unix sockets to its worker)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def rounded(cpu: dict[str, float]) -> dict[str, float]:
    return {"python": round(cpu["python"], 2), "p2pd": round(cpu["p2pd"], 2), "total": round(sum(cpu.values()), 2)}


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two `usage()["cpu_s"]` readings, by kind of process."""
    return rounded({k: after[k] - before[k] for k in ("python", "p2pd")})


def idle_cores(workers: list[WorkerProcess], seconds: float) -> dict[str, float]:
    """Cores the swarm keeps busy while nobody uses it, over a `seconds` window (a measurement,
    not a wait for anything)."""
    before = usage(workers)["cpu_s"]
    time.sleep(seconds)
    return {k: round(v / seconds, 3) for k, v in spent(before, usage(workers)["cpu_s"]).items()}


def summary(results: list[dict], wall_s: float) -> dict:
    latencies = sorted(r["latency_s"] * 1000 for r in results)
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            reason = (r["error"] or "put returned False")[:120]
            errors[reason] = errors.get(reason, 0) + 1

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    ok = sum(r["ok"] for r in results)
    return {"ops": len(results), "ok": ok, "success_rate": round(ok / max(1, len(results)), 4),
            "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": round(latencies[-1], 2),
            "mean_ms": round(statistics.fmean(latencies), 2), "wall_s": round(wall_s, 2), "errors": errors}


def success(phases: list[dict]) -> float:
    parts = [p[f"{kind}_key"] for p in phases for kind in KINDS]
    return round(sum(f["ok"] for f in parts) / sum(f["ops"] for f in parts), 4)


def table_stats(replies: list[dict]) -> dict:
    sizes = sorted(s for r in replies for s in r["sizes"].values())
    return {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1], "nodes": len(sizes)}


def run(args: argparse.Namespace, directory: Path) -> dict:
    swarm = Swarm(args, directory)
    try:
        figures = swarm.start()
        figures["idle_cpu_cores_after_ready"] = idle_cores(swarm.workers, args.idle_seconds)
        swarm.store("1_store_one_at_a_time", 1, concurrent=False)
        swarm.get("2_get_one_at_a_time", concurrent=False)
        swarm.store("3_store_all_at_once", 2, concurrent=True)
        swarm.get("4_get_all_at_once", concurrent=True)
        figures["phases"] = swarm.phases
        figures["idle_cpu_cores_at_end"] = idle_cores(swarm.workers, args.idle_seconds)
        figures["routing_table_at_end"] = table_stats(swarm.call_all("tables", 30))
        figures["usage_at_end"] = usage(swarm.workers)
        figures["cpu_s"]["whole_run"] = figures["usage_at_end"]["cpu_s"]
        figures["shutdown_s"] = swarm.stop()
        return figures
    except BaseException:
        for w in swarm.workers:
            print(f"--- {w.name} stderr tail ---\n{w.tail()}", file=sys.stderr)
        raise
    finally:
        swarm.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--gets", type=int, default=10, help="gets of other nodes' unique keys, per node and phase")
    parser.add_argument("--stage-gets", type=int, default=2, help="gets of shared stage keys, per node and phase")
    parser.add_argument("--stage-keys", type=int, default=4, help="stage keys the StageServerRecords share")
    parser.add_argument("--start-parallel", type=int, default=1, help="nodes a worker starts at a time")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="windows measuring the idle swarm's CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="8 peers, 2 workers, 2 stage keys, 4 + 1 gets")
    parser.add_argument("--out", default="benchmarks/results/dht.json")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main(args.worker))
        return
    if args.smoke:
        args.peers, args.workers, args.stage_keys, args.gets, args.stage_gets = 8, 2, 2, 4, 1
        args.idle_seconds = 1.0
    if args.peers < 2 or not 1 <= args.workers <= args.peers or not 1 <= args.stage_keys <= args.peers:
        parser.error("need --peers >= 2, 1 <= --workers <= --peers, 1 <= --stage-keys <= --peers")
    if args.gets < 1 or args.stage_gets < 1 or args.start_parallel < 1 or args.idle_seconds <= 0:
        parser.error("--gets, --stage-gets and --start-parallel must be at least 1, --idle-seconds positive")

    load = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarmnet-bench-dht-") as directory:
        figures = run(args, Path(directory))
    gets = [figures["phases"][p] for p in ("2_get_one_at_a_time", "4_get_all_at_once")]
    stores = [figures["phases"][p] for p in ("1_store_one_at_a_time", "3_store_all_at_once")]
    result = {
        "benchmark": "dht",
        "smoke": args.smoke,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "peers": args.peers,
        "workers": args.workers,
        "stage_keys": args.stage_keys,
        "subkeys_per_stage_key": args.peers // args.stage_keys,
        "gets_per_node_per_phase": {"unique_key": args.gets, "stage_key": args.stage_gets},
        "goal": {"peers": 128, "success_rate": 1.0, "p50_get_ms": 20.0},
        "store_success_rate": success(stores),
        "get_success_rate": success(gets),
        "p50_get_ms_one_at_a_time": gets[0]["unique_key"]["p50_ms"],
        "p50_get_ms_all_at_once": gets[1]["unique_key"]["p50_ms"],
        **figures,
        "total_wall_s": round(time.perf_counter() - started, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
