"""Compression benchmark: what each wire encoding of `swarmnet.protocols.compression` costs in CPU
time and saves in bytes, and what it does to the loss of a real training run, in one process.

    python benchmarks/compression.py [--size-mib 64] [--repeats 5] [--steps 150] [--threads N]
                                     [--smoke] [--out benchmarks/results/compression.json]

Part a, throughput. One seeded float32 tensor of `--size-mib` (standard normal values). Per
repetition, in a rotating order: `clone` (`torch.clone`, a plain memory copy into a fresh tensor:
the baseline), then for "none", "fp16" and "int8" `encode` and `decode` timed separately, each in
wall time and in CPU time of this process (`time.process_time`, all its threads: on a machine
shared with other work, the wall time also counts the waits for a core, the CPU time does not).
One warm-up repetition, then the median of `--repeats` of encode + decode (and of each half).
Reported as MB/s of the float32 tensor (MB = 10^6 bytes) per wall second and per CPU second,
the times relative to `clone`'s, the wire bytes over the float32 bytes, and the round trip's
largest absolute error and relative RMS error. "none" encodes a contiguous CPU tensor as a view of
its memory and decodes as a view of the bytes: no copy at all, so its rate only shows the call
overhead (a real receiver copies the bytes off the stream anyway).

Part b, loss. The demo run (`coordinator/runs/demo.toml`, loaded with `swarmnet.config.load_manifest`
as `swarmnet train --local --run` does; its data through `swarmnet.trainer.role.make_data`) is
trained for `--steps` steps by `WireTrainer`, a `LocalTrainer` (the reference single-process
trainer: the same `StageComputer`s, seeded weights and data order as a swarm) whose inter-stage
tensors make the trips they make in a swarm, through `encode` then `decode`. In a swarm the trainer
relays every tensor: a stage's output travels to the trainer (the reply, in the link's
compression) and from it to the next stage (the request, compressed again), and the last stage's
input gradient likewise back to the trainer and on to the previous stage's backward. So every
activation and every gradient between stages goes through encode/decode `HOPS` = 2 times; the
tokens and targets (int64) always travel uncompressed. The stage that receives an activation keeps
the decoded tensor as its input for the backward, as a peer does. One run per compression ("none",
"fp16", "int8"), same seeded weights and data. Reported per run: the initial loss (step 1), the
final loss (mean of the last 10 steps' losses), its relative difference from "none", the largest
per-step loss difference from "none", the mean relative RMS error that the two hops left on the
activations and the gradients, the wire bytes of the inter-stage tensors per microbatch (all hops),
and every step's loss. A short plain `LocalTrainer` run checks that "none" reproduces it bit for bit
(`none_matches_local_trainer`).

`--threads` sets `torch.set_num_threads` (default: torch's own choice); both parts run on the CPU,
and with a fixed thread count the loss curves are the same from run to run. The full run trains
3 x 150 + 2 steps of the demo model, about 5 CPU-minutes with one thread (its wall time depends on
what else the machine runs: the load averages at start and end are recorded). `--smoke`: a 4 MiB
tensor, 2 repetitions, 2 steps per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from swarmnet.config import TrainerConfig, load_manifest
from swarmnet.data.loader import Microbatch
from swarmnet.protocols.compression import COMPRESSIONS, decode, encode
from swarmnet.trainer.local import LocalTrainer
from swarmnet.trainer.role import make_data

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "coordinator" / "runs" / "demo.toml"
HOPS = 2
"""Encode/decode round trips of an inter-stage tensor: peer -> trainer, trainer -> next peer."""
FINAL_WINDOW = 10
"""Steps averaged into the final loss."""
LOCAL_CHECK_STEPS = 2
"""Steps of the plain `LocalTrainer` run that "none" must reproduce exactly."""


# --- part a: throughput -------------------------------------------------------------------------


def measure_throughput(size_bytes: int, repeats: int) -> dict:
    x = torch.randn(size_bytes // 4, generator=torch.Generator().manual_seed(0))
    methods = ("clone", *COMPRESSIONS)
    # per method and repetition: wall and CPU seconds of the encode (clone: the copy), then of the decode
    samples: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in methods}
    for rep in range(repeats + 1):
        for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
            t0 = _clocks()
            data = x.clone() if method == "clone" else encode(x, method)
            t1 = _clocks()
            y = data if method == "clone" else decode(data, x.shape, x.dtype, method)
            t2 = _clocks()
            samples[method].append((t1[0] - t0[0], t1[1] - t0[1], t2[0] - t1[0], t2[1] - t1[1]))
            del data, y
    mb = x.numel() * 4 / 1e6
    medians = {}
    for method in methods:
        measured = samples[method][1:]
        medians[method] = {
            "wall": statistics.median(ew + dw for ew, _, dw, _ in measured),
            "cpu": statistics.median(ec + dc for _, ec, _, dc in measured),
            "encode": statistics.median(ew for ew, _, _, _ in measured),
            "decode": statistics.median(dw for _, _, dw, _ in measured),
        }
    rows = {}
    for method in methods:
        m = medians[method]
        walls = [round((ew + dw) * 1e3, 3) for ew, _, dw, _ in samples[method]]
        cpus = [round((ec + dc) * 1e3, 3) for _, ec, _, dc in samples[method]]
        row = {
            "wall_ms": round(m["wall"] * 1e3, 3),
            "cpu_ms": round(m["cpu"] * 1e3, 3),
            "mb_s": round(mb / m["wall"], 1),
            "mb_per_cpu_s": round(mb / max(m["cpu"], 1e-9), 1),
            "wall_vs_clone": round(m["wall"] / medians["clone"]["wall"], 3),
            "cpu_vs_clone": round(m["cpu"] / max(medians["clone"]["cpu"], 1e-9), 3),
            "per_repeat_wall_ms (first is warm-up)": walls,
            "per_repeat_cpu_ms (first is warm-up)": cpus,
        }
        if method != "clone":
            data = encode(x, method)
            error = (decode(data, x.shape, x.dtype, method) - x).abs()
            row |= {
                "encode_ms": round(m["encode"] * 1e3, 3),
                "decode_ms": round(m["decode"] * 1e3, 3),
                "encode_mb_s": round(mb / m["encode"], 1),
                "decode_mb_s": round(mb / m["decode"], 1),
                "wire_bytes": data.numel(),
                "wire_ratio": round(data.numel() / (x.numel() * 4), 4),
                "max_abs_error": float(error.max()),
                "relative_rms_error": float(error.square().mean().sqrt() / x.square().mean().sqrt()),
            }
        rows[method] = row
    return {"size_mb": round(mb, 3), "methods": rows}


def _clocks() -> tuple[float, float]:
    """(wall, CPU of this process: all its threads) seconds."""
    return time.perf_counter(), time.process_time()


# --- part b: loss ---------------------------------------------------------------------------------


class WireTrainer(LocalTrainer):
    """`LocalTrainer` whose inter-stage activations and gradients go through the wire encoding
    `HOPS` times, as they do between a swarm's peers and its trainer."""

    def __init__(self, *args, compression: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.compression = compression
        self.wire_bytes = 0
        self.errors: dict[str, list[float]] = {"activations": [], "gradients": []}

    def travel(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        sent = tensor
        for _ in range(HOPS):
            data = encode(sent, self.compression)
            self.wire_bytes += data.numel()
            sent = decode(data, sent.shape, sent.dtype, self.compression)
        norm = float(tensor.float().norm())
        if norm > 0:
            self.errors[kind].append(float((sent.float() - tensor.float()).norm()) / norm)
        return sent

    async def run_microbatch(self, mb: Microbatch) -> float:  # LocalTrainer's, plus the trips
        x = mb.tokens
        inputs = []
        for computer in self.stages[:-1]:
            inputs.append(x)
            x = self.travel(computer.forward(x), "activations")
        result = self.stages[-1].loss_backward(x, mb.targets)
        grad = result.grad_input
        for computer, x_in in zip(reversed(self.stages[:-1]), reversed(inputs)):
            grad = computer.backward(x_in, self.travel(grad, "gradients")).grad_input
        return result.loss


def train(trainer: LocalTrainer) -> tuple[list[float], float]:
    losses: list[float] = []

    async def on_step(report) -> None:
        losses.append(report.loss)

    started = time.perf_counter()
    asyncio.run(trainer.train(on_step=on_step))
    return losses, time.perf_counter() - started


def measure_loss(steps: int) -> dict:
    manifest = load_manifest(MANIFEST)
    data = make_data(manifest)
    config = TrainerConfig(max_steps=steps)
    runs: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    for compression in COMPRESSIONS:
        trainer = WireTrainer(manifest, config, data, compression=compression)
        losses, wall = train(trainer)
        curves[compression] = losses
        microbatches = steps * manifest.microbatches_per_step
        runs[compression] = {
            "initial_loss": losses[0],
            "final_loss": statistics.fmean(losses[-FINAL_WINDOW:]),
            "activation_relative_rms_error": _mean(trainer.errors["activations"]),
            "gradient_relative_rms_error": _mean(trainer.errors["gradients"]),
            "inter_stage_wire_bytes_per_microbatch": trainer.wire_bytes // microbatches,
            "wall_s": round(wall, 2),
        }
        final = runs[compression]["final_loss"]
        print(f"{compression}: loss {losses[0]:.4f} -> {final:.4f} in {wall:.1f} s", flush=True)
    base = runs["none"]["final_loss"]
    for compression, run in runs.items():
        run["final_loss_relative_difference"] = (run["final_loss"] - base) / base
        run["max_step_loss_difference"] = max(abs(a - b) for a, b in zip(curves[compression], curves["none"]))
    local, _ = train(LocalTrainer(manifest, TrainerConfig(max_steps=min(steps, LOCAL_CHECK_STEPS)), data))
    return {
        "manifest": str(MANIFEST.relative_to(ROOT)),
        "run_id": manifest.run_id,
        "steps": steps,
        "microbatches_per_step": manifest.microbatches_per_step,
        "hops_per_tensor": HOPS,
        "final_window_steps": FINAL_WINDOW,
        "runs": runs,
        "none_matches_local_trainer": local == curves["none"][: len(local)],
        "loss_per_step": {c: [round(v, 5) for v in losses] for c, losses in curves.items()},
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=float, default=64.0, help="the throughput tensor (float32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="training steps per compression")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="a 4 MiB tensor, 2 repetitions, 2 steps")
    parser.add_argument("--out", default="benchmarks/results/compression.json")
    args = parser.parse_args()
    if args.smoke:
        args.size_mib, args.repeats, args.steps = 4.0, 2, 2
    if args.repeats < 1 or args.size_mib <= 0 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1 and --size-mib positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()
    started = time.perf_counter()
    size_bytes = int(args.size_mib * (1 << 20)) // 4 * 4
    throughput = measure_throughput(size_bytes, args.repeats)
    for method, row in throughput["methods"].items():
        ratio = f", wire ratio {row['wire_ratio']}" if "wire_ratio" in row else ""
        print(f"{method}: {row['mb_s']:.0f} MB/s, {row['mb_per_cpu_s']:.0f} MB per CPU-s{ratio}", flush=True)
    loss = measure_loss(args.steps)
    result = {
        "benchmark": "compression",
        "smoke": args.smoke,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "warm_up": "one repetition of every method, excluded from the medians",
        "note": "MB = 10^6 bytes of the float32 tensor per second; wire_ratio = wire bytes / float32 bytes",
        "throughput": throughput,
        "loss": loss,
        "total_wall_s": round(time.perf_counter() - started, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("initial_loss", "final_loss", "final_loss_relative_difference")
    summary = {c: {k: run[k] for k in keys} for c, run in loss["runs"].items()}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} ({result['total_wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
