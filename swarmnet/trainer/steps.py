"""The step loop shared by the swarm trainer and the local reference trainer.

Step k consists of microbatches `k*m .. k*m+m-1` (m = target_batch_size / microbatch_size) of the
manifest's deterministic data stream, so both trainers see the same data in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from swarmnet.config import RunManifest, TrainerConfig
from swarmnet.data.loader import Microbatch, MicrobatchStream
from swarmnet.errors import AccessDeniedError, SwarmnetError
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    step: int
    """The run's steps completed so far (1 after the first; a resumed trainer goes on counting from
    where the swarm's stages are)."""
    loss: float
    """Mean loss of this step's completed microbatches (NaN if all were dropped)."""
    samples: int
    """Samples completed in this step."""
    dropped: int
    """Microbatches given up in this step."""
    step_seconds: float
    samples_per_s: float
    """Samples completed per second of wall time since training began."""
    elapsed: float
    slowest_microbatch_s: float = 0.0
    """Longest time one microbatch of this step took from start to completion or drop."""


@dataclass(frozen=True)
class TrainingSummary:
    initial_loss: float
    final_loss: float
    steps: int
    first_step: int
    """Step the trainer started from (0, or where the swarm was when it resumed)."""
    samples_per_s: float
    dropped: int
    elapsed: float


class StepRunner(ABC):
    def __init__(self, manifest: RunManifest, config: TrainerConfig, data: MicrobatchStream):
        self.manifest = manifest
        self.config = config
        self.data = data

    @abstractmethod
    async def run_microbatch(self, mb: Microbatch) -> float:
        """Forward and backward of one microbatch through every stage; returns its loss."""

    async def start_step(self) -> int:
        """The step to start from (its data comes next): 0 unless the trainer resumes a run."""
        return 0

    async def train(
        self, *, stop: asyncio.Event | None = None, on_step: Callable[[StepReport], Awaitable[None]] | None = None
    ) -> TrainingSummary:
        """Runs steps until `max_steps`, `max_seconds` or `stop`. With `training.max_staleness` 1,
        the next step's microbatches start while the current step's finish (one shared
        `max_in_flight` window); steps are still reported in order, each when it completes."""
        per_step = self.manifest.microbatches_per_step
        max_steps, max_seconds = self.config.max_steps, self.config.max_seconds
        overlap = self.manifest.training.max_staleness
        gate = asyncio.Semaphore(self.config.max_in_flight)
        first_step = started = await self.start_step()
        start = last_done = time.monotonic()
        reports: list[StepReport] = []
        total_samples = 0
        running: deque[asyncio.Task[tuple[list[float], int, float]]] = deque()

        def more() -> bool:
            if max_steps is not None and started - first_step >= max_steps:
                return False
            if stop is not None and stop.is_set():
                return False
            return max_seconds is None or time.monotonic() - start < max_seconds

        async def finish_oldest() -> None:
            nonlocal total_samples, last_done
            losses, dropped, slowest = await running[0]
            running.popleft()
            step = first_step + len(reports) + 1
            samples = len(losses) * self.manifest.training.microbatch_size
            total_samples += samples
            now = time.monotonic()
            report = StepReport(
                step=step,
                loss=sum(losses) / len(losses) if losses else math.nan,
                samples=samples,
                dropped=dropped,
                step_seconds=now - last_done,
                samples_per_s=total_samples / max(now - start, 1e-9),
                elapsed=now - start,
                slowest_microbatch_s=slowest,
            )
            last_done = now
            reports.append(report)
            metrics.TRAINER_SAMPLES.inc(samples)
            metrics.TRAINER_STEP.set(step)
            metrics.TRAINER_STEPS.inc()
            metrics.TRAINER_SAMPLES_PER_SECOND.set(report.samples_per_s)
            if losses:
                metrics.TRAINER_LOSS.set(report.loss)
            if on_step is not None:
                await on_step(report)

        try:
            while True:
                while len(running) > overlap:
                    await finish_oldest()
                if not more():
                    break
                microbatches = [self.data.microbatch(started * per_step + i) for i in range(per_step)]
                running.append(asyncio.create_task(self._run_step(microbatches, gate)))
                started += 1
            while running:
                await finish_oldest()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        elapsed = time.monotonic() - start
        finite = [r.loss for r in reports if math.isfinite(r.loss)]
        return TrainingSummary(
            initial_loss=finite[0] if finite else math.nan,
            final_loss=finite[-1] if finite else math.nan,
            steps=len(reports),
            first_step=first_step,
            samples_per_s=total_samples / max(elapsed, 1e-9),
            dropped=sum(r.dropped for r in reports),
            elapsed=elapsed,
        )

    async def _run_step(
        self, microbatches: list[Microbatch], gate: asyncio.Semaphore
    ) -> tuple[list[float], int, float]:
        """Runs one step's microbatches, at most `gate`'s count of them (of any step) at once;
        returns their losses, how many were dropped, and the longest time one of them took."""
        losses: dict[int, float] = {}
        dropped = 0
        slowest = 0.0

        async def one(mb: Microbatch) -> None:
            nonlocal dropped, slowest
            async with gate:
                began = time.monotonic()
                try:
                    losses[mb.index] = await self.run_microbatch(mb)
                except AccessDeniedError:
                    raise  # a private run refused us: stop training (below), dropping would go on forever
                except (SwarmnetError, TimeoutError, OSError) as e:
                    dropped += 1
                    metrics.TRAINER_DROPPED.inc()
                    logger.warning("dropped microbatch %d: %s", mb.index, e)
                finally:
                    slowest = max(slowest, time.monotonic() - began)

        try:
            async with asyncio.TaskGroup() as tasks:
                for mb in microbatches:
                    tasks.create_task(one(mb))
        except* AccessDeniedError as refused:
            raise refused.exceptions[0] from None
        return [losses[i] for i in sorted(losses)], dropped, slowest
