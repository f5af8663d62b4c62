"""WAN benchmark (issue 9, P8): the same swarm on loopback and across emulated 100 Mbit/s, 50 ms
RTT links, with and without activation compression.

    python benchmarks/wan.py [--run coordinator/runs/demo.toml] [--compressions none,int8]
                             [--seconds 30] [--warmup-seconds 8] [--slice-seconds 4]
                             [--peers-per-stage 1] [--staleness 0] [--max-in-flight N]
                             [--workdir DIR] [--smoke]
                             [--out benchmarks/results/wan.json]

For each compression (the manifest's `[network] compression`), two copies of one swarm —
coordinator, one peer per stage (`--peers-per-stage`), trainer; real processes — are started:
(a) on 127.0.0.1 in this namespace, (b) with every process on its own emulated host
(`swarmnet.testing.wan`): its own network namespace behind a link shaped to 100 Mbit/s each way
with `tc tbf`, 25 ms one way added by the user-space delay forwarder, so that every hop (trainer
<-> stage, DHT, all-reduce between stage-mates when there are several) crosses two links and
50 ms of RTT.

A/B interleaving: the machine is shared, and its load changes by the minute, so the two swarms
take turns: every `--slice-seconds` the running one is frozen whole (SIGSTOP of every process
group: coordinator, peers, trainer, their p2pds) and the other one thawed, until each has run
`--warmup-seconds` + `--seconds`. Throughput of a swarm = samples of the trainer's steps that
ended while it ran, after its first `--warmup-seconds` of running / that running time. A step cut
by a freeze is credited to the slice it ends in, so the parts cancel out over the slices. Bias:
packets in flight when a swarm is frozen still arrive (the kernel and the forwarder are not
frozen), which favours the WAN swarm by at most the network part of the calls in flight at each
freeze. ratio = WAN / loopback for the same compression (goal: >= 0.8 with int8).

Also reported per swarm: the mean duration of the trainer's calls by kind, of the same requests as
served by the peers (the difference is what the network adds) and of the peers' compute, from the
processes' /metrics, over clean parts of the slices only (from the first step that ended after a
thaw to the freeze: no call in them spans a freeze); for the WAN swarm the forwarder's mean rate,
packets, CPU use and worst lateness. Per compression: how many cores of the machine were busy and
its load average (everything on it). Before the swarms, the emulation is checked between two hosts
(TCP echo RTT, bulk TCP throughput each way) and the forwarder's ceiling is measured on unshaped
links with no delay.

`--smoke` (CI): a tiny model, four hosts, the emulation check, one short WAN swarm, no compression.
Needs root, iproute2 (`ip netns`, `tc`) and /dev/net/tun: without them it says why and exits 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmnet import config as swarm_config
from swarmnet.config import (
    RunManifest,
    load_manifest,
)
from swarmnet.errors import ConfigError
from swarmnet.testing import chaos
from swarmnet.testing import wan as wan_kit
from swarmnet.testing.processes import ManagedProcess, ProcessFailed
from swarmnet.testing.swarm import STARTUP_TIMEOUT, LocalSwarm, tiny_manifest

UNAVAILABLE_EXIT = 3
"""Exit status when the machine cannot emulate a WAN (the smoke test skips on it)."""
STEP_TIMEOUT = 120.0
PEER_PROFILE = "rebalance_period = 0\n"
METRIC = re.compile(r'^(swarmnet_(?:trainer_stage_call|request|stage_compute)_seconds)_(sum|count)\{([^}]*)\} (\S+)$')
FETCHER = r"""
import json, sys, urllib.request
for url in sys.stdin:
    try:
        body = urllib.request.urlopen(url.strip(), timeout=10).read().decode()
    except OSError:
        body = ""
    print(json.dumps(body), flush=True)
"""


def with_compression(manifest: RunManifest, compression: str) -> RunManifest:
    """The manifest with `[network] compression` set; ConfigError if this swarmnet has no such setting."""
    network = getattr(swarm_config, "NetworkConfig", None)
    if network is None:
        if compression == "none":
            return manifest
        raise ConfigError("this swarmnet has no [network] table in its manifest (NetworkConfig)")
    return dataclasses.replace(manifest, network=network(compression=compression))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of this machine so far, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


class Fetcher:
    """Reads /metrics pages from inside one namespace through one long-lived helper process, so
    that a scrape costs a pipe round trip, not a Python start-up on the shared CPUs."""

    def __init__(self, wrap: Callable[[list[str]], list[str]] | None):
        argv = [sys.executable, "-c", FETCHER]
        self.popen = subprocess.Popen(wrap(argv) if wrap else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, start_new_session=True)

    def metrics(self, address: str, prefix: str) -> dict[str, float]:
        """{"<metric>/<prefix><kind>/<sum|count>": value} of the call-time histograms at `address`."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(f"http://{address}/metrics\n")
        self.popen.stdin.flush()
        if not select.select([self.popen.stdout], [], [], 30)[0]:
            return {}
        values: dict[str, float] = {}
        for line in json.loads(self.popen.stdout.readline() or '""').splitlines():
            match = METRIC.match(line)
            if match:
                kind = re.search(r'kind="([^"]*)"', match[3])
                key = f"{match[1]}/{prefix}{kind[1] if kind else ''}/{match[2]}"
                values[key] = values.get(key, 0.0) + float(match[4])
        return values

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.communicate(timeout=10)


@dataclasses.dataclass(eq=False)
class Contender:
    """One swarm under measurement, and what was measured of it."""

    manifest: RunManifest
    swarm: LocalSwarm
    wan: wan_kit.EmulatedWan | None
    peers: list[ManagedProcess] = dataclasses.field(default_factory=list)
    trainer: ManagedProcess | None = None
    watched: list[tuple[str, Fetcher, str]] = dataclasses.field(default_factory=list)
    """(metrics address, fetcher in its namespace, label prefix) of the trainer and each peer."""
    running: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    """When it ran (not frozen), on this process's monotonic clock."""
    calls: dict[str, float] = dataclasses.field(default_factory=dict)
    """Call-time sums and counts summed over the clean parts of the slices."""

    @property
    def network(self) -> str:
        return "wan" if self.wan else "loopback"

    def placed(self, i: int) -> dict[str, Any]:
        """Where process i runs (0 the coordinator, then the peers, the trainer last)."""
        if self.wan is None:
            return {"host": "127.0.0.1", "wrap": None}
        return {"host": self.wan.hosts[i].addr, "wrap": self.wan.hosts[i].command}

    def processes(self) -> list[ManagedProcess]:
        return [p for p in self.swarm.processes if p.alive]

    def freeze(self) -> None:
        for p in self.processes():  # all at once, then wait for each
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGSTOP)
        for p in self.processes():
            chaos.freeze(p)

    def thaw(self) -> None:
        for p in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
        for p in self.processes():
            chaos.thaw(p)

    def scrape(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for address, fetcher, prefix in self.watched:
            values.update(fetcher.metrics(address, prefix))
        return values


def start_swarms(
    contenders: list[Contender], peers_per_stage: int, stack: contextlib.ExitStack, max_in_flight: int | None = None
) -> None:
    """Coordinators, then peers, then trainers of all contenders; returns once every trainer has
    finished a step. Every process and helper is stopped when `stack` closes, thawed first."""
    for c in contenders:
        stack.enter_context(c.swarm)
        stack.callback(c.thaw)  # runs before the swarm is closed: a frozen process ignores SIGTERM
        where = c.placed(0)
        c.swarm.coordinator = c.swarm.spawn(
            "coordinator", "coordinator", "--run", str(c.swarm.run_path), "--identity",
            str(c.swarm.workdir / "coordinator.key"), "--host", where["host"], "--http-port", "0", wrap=where["wrap"],
        )
    stages = [s for _ in range(peers_per_stage) for s in range(contenders[0].manifest.training.num_stages)]
    for c in contenders:
        c.swarm.coordinator.wait_event("ready", STARTUP_TIMEOUT)
        profile = c.swarm.workdir / "peer.toml"
        profile.write_text(PEER_PROFILE)
        c.peers = [c.swarm.start_peer(s, "--profile", str(profile), wait=False, **c.placed(1 + i)) for i, s in enumerate(stages)]
    for c in contenders:
        for peer in c.peers:
            peer.wait_event("ready", STARTUP_TIMEOUT)
        where = c.placed(1 + len(stages))
        profile = []
        if max_in_flight is not None:
            (c.swarm.workdir / "trainer.toml").write_text(f"max_in_flight = {max_in_flight}\n")
            profile = ["--profile", str(c.swarm.workdir / "trainer.toml")]
        c.trainer = c.swarm.spawn("trainer", "train", "--initial-peers", *c.swarm.initial_peers, "--host", where["host"],
                                  *profile, wrap=where["wrap"])
    for c in contenders:
        c.trainer.wait_event("step", STARTUP_TIMEOUT + STEP_TIMEOUT)
        fetchers: dict[int, Fetcher] = {}
        for i, (process, prefix) in enumerate([(c.trainer, ""), *((p, f"stage{s} ") for p, s in zip(c.peers, stages))]):
            slot = len(stages) + 1 if i == 0 else i
            if c.wan is not None or not fetchers:
                fetchers[slot] = Fetcher(c.placed(slot)["wrap"])
                stack.callback(fetchers[slot].close)
            c.watched.append((process.ready["metrics"], fetchers.get(slot) or next(iter(fetchers.values())), prefix))


def take_turns(contenders: list[Contender], args: argparse.Namespace) -> None:
    """Runs each contender for warm-up + measured seconds, one slice at a time, the others frozen
    (a lone contender is never frozen: its warm-up, then its measured part). Scrapes the clean part
    of each measured slice."""
    need = args.warmup_seconds + args.seconds
    alone = len(contenders) == 1
    for c in contenders[1:]:
        c.freeze()
    ran = {c: 0.0 for c in contenders}
    turn = 0
    while any(ran[c] < need - 1e-3 for c in contenders):
        c = contenders[turn % len(contenders)]
        turn += 1
        if ran[c] >= need - 1e-3:
            continue
        if not alone:
            c.thaw()
        began = time.monotonic()
        mark = len(c.trainer.events)
        if alone:  # two turns: the warm-up, then the measured part
            length = args.warmup_seconds - ran[c] if ran[c] < args.warmup_seconds else need - ran[c]
        else:
            length = min(args.slice_seconds, need - ran[c])
        before = None
        if ran[c] >= args.warmup_seconds:  # clean part: from the first step that ends after the thaw
            with contextlib.suppress(ProcessFailed):
                c.trainer.wait_event_from(mark, "step", max(0.0, began + length - time.monotonic()))
                before = c.scrape()
        time.sleep(max(0.0, began + length - time.monotonic()))
        if before is not None:
            after = c.scrape()
            for key, value in after.items():
                c.calls[key] = c.calls.get(key, 0.0) + value - before.get(key, 0.0)
        if not alone:
            c.freeze()
        c.running.append((began, time.monotonic()))
        ran[c] += time.monotonic() - began


def mean_ms(calls: dict[str, float], metric: str) -> dict[str, float]:
    kinds = sorted({key.split("/")[1] for key in calls if key.startswith(metric + "/")})
    counts = {k: calls.get(f"{metric}/{k}/count", 0.0) for k in kinds}
    return {k: round(calls.get(f"{metric}/{k}/sum", 0.0) / counts[k] * 1e3, 1) for k in kinds if counts[k] > 0}


def report(c: Contender, warmup: float) -> dict[str, Any]:
    """Throughput over the running time after the warm-up, and the call timings."""
    measured, skipped = [], warmup
    for began, ended in c.running:
        cut = min(skipped, ended - began)
        skipped -= cut
        if began + cut < ended:
            measured.append((began + cut, ended))
    steps = [(c.trainer.started_at + e["received_after_s"], e) for e in c.trainer.events if e.get("event") == "step"]
    inside = [e for t, e in steps if any(a <= t <= b for a, b in measured)]
    seconds = sum(b - a for a, b in measured)
    return {
        "network": c.network,
        "compression": getattr(getattr(c.manifest, "network", None), "compression", "none"),
        "run_id": c.manifest.run_id,
        "samples_per_s": sum(e["samples"] for e in inside) / seconds if seconds > 0 else None,
        "measured_s": round(seconds, 2),
        "slices": len(measured),
        "steps_credited": len(inside),
        "dropped_microbatches": sum(e["dropped"] for e in inside),
        "last_loss": steps[-1][1]["loss"] if steps else None,
        "trainer_call_ms": mean_ms(c.calls, "swarmnet_trainer_stage_call_seconds"),
        "peer_request_ms": mean_ms(c.calls, "swarmnet_request_seconds"),
        "peer_compute_ms": mean_ms(c.calls, "swarmnet_stage_compute_seconds"),
        "peer_launch_to_serving_s": [p.ready["received_after_s"] for p in c.peers],
    }


def measure(manifests: list[tuple[RunManifest, wan_kit.EmulatedWan | None]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Starts the contenders, lets them take turns, reports each (and the machine's load)."""
    with contextlib.ExitStack() as stack:
        contenders = []
        for manifest, wan in manifests:
            where = Path(args.workdir) / f"{'wan' if wan else 'loopback'}-{manifest.run_id}" if args.workdir else None
            contenders.append(Contender(manifest=manifest, swarm=LocalSwarm(manifest, workdir=where), wan=wan))
        start_swarms(contenders, args.peers_per_stage, stack, args.max_in_flight)
        wan = next((c.wan for c in contenders if c.wan), None)
        cpu, forwarder = machine_cpu(), wan.stats() if wan else None
        take_turns(contenders, args)
        cpu_after, forwarder_after = machine_cpu(), wan.stats() if wan else None
        load = os.getloadavg()[0]
    busy = (cpu_after[0] - cpu[0]) / (cpu_after[1] - cpu[1]) * (os.cpu_count() or 1)
    rows = []
    for c in contenders:
        row = report(c, args.warmup_seconds)
        row.update(machine_busy_cores=round(busy, 2), load_average_1m=round(load, 1))
        if c.wan is not None:
            ran = sum(b - a for a, b in c.running)
            row["forwarder"] = {
                "mbit_s_mean": round((forwarder_after["bytes"] - forwarder["bytes"]) * 8 / 1e6 / ran, 2),
                "packets": forwarder_after["packets"] - forwarder["packets"],
                "cpu_s_per_s": round((forwarder_after["cpu_s"] - forwarder["cpu_s"]) / ran, 3),
                "max_late_ms_so_far": forwarder_after["max_late_ms"],
            }
        if args.workdir:  # every event of every process, for a closer look
            with open(c.swarm.workdir / "events.jsonl", "w") as f:
                for p in c.swarm.processes:
                    f.writelines(json.dumps({"process": p.name, **event}) + "\n" for event in p.events)
        rows.append(row)
    return rows


def forwarder_ceiling(seconds: float) -> dict[str, Any]:
    """Bulk TCP through the forwarder on unshaped links with no delay: what it can carry at most."""
    with wan_kit.EmulatedWan(2, wan_kit.LinkSpec(rate_mbit=None, delay_ms=0.0)) as wan:
        measured = wan.measure(0, 1, seconds=seconds, pings=5)
    stats = wan.forwarder_stats or {}
    return {"mbit_s": measured["mbit_s"], "forwarder_cpu_s": stats.get("cpu_s"), "forwarder_seconds": stats.get("seconds"),
            "mean_packet_bytes": round(stats["bytes"] / stats["packets"]) if stats.get("packets") else None}


def git_state() -> str | None:
    """The checkout measured: short commit, `+dirty` with uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="coordinator/runs/demo.toml", help="run manifest TOML")
    parser.add_argument("--compressions", default="none,int8", help="comma-separated [network] compression values")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured running time of each swarm")
    parser.add_argument("--warmup-seconds", type=float, default=8.0, help="running time of each swarm not measured")
    parser.add_argument("--slice-seconds", type=float, default=4.0, help="turn length (keep well under call_timeout)")
    parser.add_argument("--peers-per-stage", type=int, default=1)
    parser.add_argument("--staleness", type=int, default=0, choices=(0, 1),
                        help="the manifest's training.max_staleness (1: delayed parameter updates)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="the trainers' max_in_flight (default: the trainer profile's default)")
    parser.add_argument("--workdir", default=None, help="keep the processes' logs here (default: temp dirs, removed)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one short WAN swarm: does it work at all")
    parser.add_argument("--out", default="benchmarks/results/wan.json")
    args = parser.parse_args()
    if args.smoke:
        args.compressions, args.seconds, args.warmup_seconds = "none", 6.0, 1.0
    if args.seconds <= 0 or args.warmup_seconds < 0 or args.slice_seconds <= 0 or args.peers_per_stage < 1:
        parser.error("need positive seconds and slice-seconds, warmup-seconds >= 0, peers-per-stage >= 1")
    return args


def main() -> None:
    args = parse_args()
    reason = wan_kit.unavailable()
    if reason is not None:
        print(f"cannot emulate a WAN here: {reason}", file=sys.stderr)
        sys.exit(UNAVAILABLE_EXIT)
    base = tiny_manifest("wan-smoke") if args.smoke else load_manifest(args.run)
    if args.staleness:
        base = dataclasses.replace(base, training=dataclasses.replace(base.training, max_staleness=args.staleness))
    link = wan_kit.LinkSpec()
    started = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "wan",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "commit": git_state(),
        "smoke": args.smoke,
        "run": "smoke" if args.smoke else args.run,
        "link": dataclasses.asdict(link),
        **{k: getattr(args, k) for k in ("seconds", "warmup_seconds", "slice_seconds", "peers_per_stage", "staleness", "max_in_flight")},
    }
    if not args.smoke:
        result["forwarder_ceiling"] = forwarder_ceiling(3.0)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with wan_kit.EmulatedWan(2 + base.training.num_stages * args.peers_per_stage, link) as wan:
        result["emulation_check"] = {
            "host0_to_host1": wan.measure(0, 1, seconds=1.0 if args.smoke else 3.0),
            "host1_to_host0": wan.measure(1, 0, seconds=1.0 if args.smoke else 3.0),
        }
        for compression in args.compressions.split(","):
            try:
                manifest = with_compression(base, compression)
            except ConfigError as e:
                skipped[compression] = str(e)
                continue
            pair = [(manifest, wan)] if args.smoke else [(manifest, None), (manifest, wan)]
            rows += measure(pair, args)
            print(json.dumps(rows[-len(pair):]), flush=True)
    by = {(r["network"], r["compression"]): r["samples_per_s"] for r in rows}
    result.update({
        "forwarder_total": wan.forwarder_stats,
        "configs": rows,
        "skipped": skipped,
        "wan_over_loopback": {c: by[n, c] / by["loopback", c] for n, c in by if n == "wan" and by.get(("loopback", c))
                              and by[n, c] is not None},
        "goal": "wan_over_loopback['int8'] >= 0.8",
        "total_wall_s": round(time.monotonic() - started, 1),
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
