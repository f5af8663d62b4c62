"""A stage's throughput: measured once at start, then a moving average of real serving."""

from __future__ import annotations

import time

import torch

from swarmnet.config import RunManifest
from swarmnet.models.partition import target_spec, unit_input_spec, unit_output_spec
from swarmnet.peer.compute import StageComputer


class ThroughputMeter:
    """Samples/s of forward + backward, from per-sample costs averaged with factor `alpha`."""

    def __init__(self, *, alpha: float = 0.1):
        self.alpha = alpha
        self.cost: dict[str, float] = {}

    def record(self, kind: str, samples: int, seconds: float) -> None:
        per_sample = seconds / max(samples, 1)
        old = self.cost.get(kind)
        self.cost[kind] = per_sample if old is None else (1 - self.alpha) * old + self.alpha * per_sample

    @property
    def samples_per_s(self) -> float:
        total = sum(self.cost.values())
        return 1.0 / total if total > 0 else 0.0


def measure_throughput(computer: StageComputer, manifest: RunManifest, stage: int, *, repeats: int = 2) -> ThroughputMeter:
    """Times forward and backward on synthetic microbatches of a unit (a stage, or an expert: then
    samples are tokens); leaves no gradients behind."""
    meter = ThroughputMeter(alpha=0.5)
    spec = unit_input_spec(manifest, stage)
    last = stage == manifest.training.num_stages - 1
    generator = torch.Generator().manual_seed(0)
    if spec.dtype == torch.int64:
        x = torch.randint(0, manifest.model.vocab_size, spec.shape, generator=generator)
    else:
        x = torch.randn(spec.shape, generator=generator)
    batch = spec.shape[0]
    for _ in range(repeats):
        if last:
            targets = torch.randint(0, manifest.model.vocab_size, target_spec(manifest).shape, generator=generator)
            start = time.perf_counter()
            _dry(computer, lambda: computer.module.loss(computer._input_with_grad(x), targets) * batch)
            meter.record("loss_backward", batch, time.perf_counter() - start)
        else:
            grad = torch.randn(unit_output_spec(manifest, stage).shape, generator=generator)
            start = time.perf_counter()
            computer.forward(x)
            meter.record("forward", batch, time.perf_counter() - start)
            start = time.perf_counter()
            _dry(computer, lambda: (computer.module(computer._input_with_grad(x)) * grad).sum())
            meter.record("backward", batch, time.perf_counter() - start)
    return meter


def _dry(computer: StageComputer, objective) -> None:
    objective().backward()
    computer.module.zero_grad(set_to_none=True)
