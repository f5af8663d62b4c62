"""The swarm trainer: drives microbatches through the stages and back, over the network.

Each optimizer step's microbatches run with up to `max_in_flight` in the pipeline at once; a step
starts after the previous step's microbatches completed (or were dropped), so no gradient is ever
computed against parameters a step older than the ones it is applied to: the swarm computes exactly
what `swarmnet train --local` computes.

Routing is stochastic wiring (`swarmnet.pipeline.routing`) with one finite retry/backoff/ban policy
(`swarmnet.pipeline.retry`). If a backward fails, the trainer replays that stage's forward on a
peer of the same stage (it still holds the stage input) and runs the backward there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch

from swarmnet.config import RunManifest, TrainerConfig
from swarmnet.data.loader import Microbatch, MicrobatchStream
from swarmnet.errors import SwarmError, SwarmnetError
from swarmnet.pipeline.retry import RetryPolicy
from swarmnet.pipeline.routing import choose_peer
from swarmnet.protocols.stage import StageStub
from swarmnet.telemetry import metrics
from swarmnet.trainer.directory import StageDirectory
from swarmnet.trainer.steps import StepReport, StepRunner

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SwarmTrainer(StepRunner):
    """Trains `manifest` through the peers found in `directory`."""

    def __init__(self, manifest: RunManifest, config: TrainerConfig, directory: StageDirectory, data: MicrobatchStream):
        super().__init__(manifest, config, data)
        self.directory = directory
        self.policy = RetryPolicy(config.retry)
        self.rng = random.Random()
        self.session = secrets.token_hex(4)
        self.num_stages = manifest.training.num_stages
        self.order = GradientOrder()
        self.resume = config.resume
        self.resume_wait = config.manifest_timeout
        """How long to wait for every stage to have a peer before choosing the start step."""

    async def start_step(self) -> int:
        """Resumes where the swarm is: the lowest step among the stages (each stage at its most
        advanced peer), so that no stage's data is skipped after a restart; 0 for a new run."""
        if not self.resume:
            return 0
        deadline = asyncio.get_running_loop().time() + self.resume_wait
        while True:
            per_stage = [await self.directory.peers(stage, force=True) for stage in range(self.num_stages)]
            if all(per_stage) or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.5)  # polls the DHT while the stages' peers announce themselves
        steps = [max(p.step for p in peers) for peers in per_stage if peers]
        step = min(steps) if len(steps) == self.num_stages else 0
        if step:
            logger.info("resuming the run at step %d (stages at %s)", step, steps)
        return step

    async def run_microbatch(self, mb: Microbatch) -> float:
        self.order.begin(mb.index)
        metrics.TRAINER_IN_FLIGHT.inc()
        try:
            return await self._run_microbatch(mb)
        finally:
            metrics.TRAINER_IN_FLIGHT.dec()
            self.order.end(mb.index)  # done or dropped: later microbatches go on

    async def _run_microbatch(self, mb: Microbatch) -> float:
        mb_id = f"{self.session}-{mb.index}"
        run_id = self.manifest.run_id
        last = self.num_stages - 1
        x: torch.Tensor = mb.tokens
        inputs, route = [], []
        for stage in range(last):
            peer_id, result = await self._call(stage, "forward", lambda stub, s=stage, x=x: stub.forward(run_id, mb_id, s, x))
            inputs.append(x)
            route.append(peer_id)
            x = result.output
        async with self.order.turn(last, mb.index):
            _, result = await self._call(last, "forward_loss", lambda stub: stub.forward(run_id, mb_id, last, x, mb.targets))
        grad = result.grad_input
        for stage in reversed(range(last)):
            async with self.order.turn(stage, mb.index):
                grad = await self._backward(stage, route[stage], inputs[stage], grad, mb_id)
        return result.loss

    async def _backward(self, stage: int, peer_id: str, x: torch.Tensor, grad: torch.Tensor, mb_id: str) -> torch.Tensor:
        run_id = self.manifest.run_id
        try:
            started = time.perf_counter()
            async with asyncio.timeout(self.policy.call_timeout):
                grad_input = await self.directory.stub(peer_id).backward(run_id, mb_id, stage, grad)
            metrics.TRAINER_CALL_SECONDS.labels(str(stage), "backward").observe(time.perf_counter() - started)
            return grad_input
        except (SwarmnetError, TimeoutError, OSError) as e:
            if not self.policy.should_retry(e, 0):
                raise
            if self.policy.should_ban(e):
                self.policy.ban(peer_id)
            logger.info("backward of %s on stage %d failed at %s (%s): replaying", mb_id, stage, peer_id[-6:], e)

        async def replay(stub: StageStub) -> torch.Tensor:
            await stub.forward(run_id, mb_id, stage, x)
            return await stub.backward(run_id, mb_id, stage, grad)

        _, grad_input = await self._call(stage, "replay", replay)
        return grad_input

    async def _call(self, stage: int, kind: str, fn: Callable[[StageStub], Awaitable[T]]) -> tuple[str, T]:
        """Calls `fn` on a peer of `stage` picked by stochastic wiring, retrying within the policy;
        `kind` names the call in `swarmnet_trainer_stage_call_seconds`."""
        last_error: BaseException | None = None
        for attempt in range(self.policy.max_attempts):
            peers = await self.directory.peers(stage, force=attempt > 0 and last_error is None)
            # Bans steer traffic away from a failing peer; they never starve a stage whose every
            # peer is banned: then the call goes to one of them anyway (after the backoff).
            peer = choose_peer(peers, banned=self.policy.banned(), rng=self.rng) or choose_peer(peers, rng=self.rng)
            if peer is not None:
                try:
                    started = time.perf_counter()
                    async with asyncio.timeout(self.policy.call_timeout):
                        result = await fn(self.directory.stub(peer.peer_id))
                    metrics.TRAINER_CALL_SECONDS.labels(str(stage), kind).observe(time.perf_counter() - started)
                    return peer.peer_id, result
                except (SwarmnetError, TimeoutError, OSError) as e:
                    last_error = e
                    if self.policy.should_ban(e):
                        self.policy.ban(peer.peer_id)
                    if not self.policy.should_retry(e, attempt):
                        raise
                    metrics.TRAINER_RETRIES.labels(stage=str(stage)).inc()
                    logger.info("stage %d call to %s failed (%s); retrying", stage, peer.peer_id[-6:], e)
            else:
                last_error = None
            if attempt + 1 < self.policy.max_attempts:
                await asyncio.sleep(self.policy.backoff(attempt, self.rng))
        raise SwarmError(f"stage {stage}: no peer served the call after {self.policy.max_attempts} tries") from last_error


class GradientOrder:
    """Gradient-producing calls (the last stage's forward+loss, every backward) reach each stage
    in microbatch order. A stage's peer then adds a step's gradients in the same order as
    `train --local` does, and float sums come out bit-identical. Forwards stay concurrent, and
    different stages still work on different microbatches at once (the pipeline)."""

    def __init__(self) -> None:
        self._active: set[int] = set()
        self._done: dict[tuple[int, int], asyncio.Event] = {}

    def begin(self, index: int) -> None:
        self._active.add(index)

    def end(self, index: int) -> None:
        """Microbatch `index` is finished or dropped: it blocks nobody any more."""
        self._active.discard(index)
        for key in [k for k in self._done if k[1] == index]:
            self._done.pop(key).set()

    @contextlib.asynccontextmanager
    async def turn(self, stage: int, index: int):
        if index - 1 in self._active:
            await self._done.setdefault((stage, index - 1), asyncio.Event()).wait()
        try:
            yield
        finally:
            self._done.setdefault((stage, index), asyncio.Event()).set()


__all__ = ["SwarmTrainer", "StepReport"]
