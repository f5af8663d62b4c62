"""The swarm trainer: drives microbatches through the stages and back, over the network.

Each optimizer step's microbatches run with up to `max_in_flight` in the pipeline at once. By
default a step starts after the previous step's microbatches completed (or were dropped), so no
gradient is ever computed against parameters a step older than the ones it is applied to: the swarm
computes exactly what `swarmnet train --local` computes. With the manifest's `training.max_staleness
= 1` (delayed parameter updates) the next step's microbatches enter the pipeline while the current
step's finish (`swarmnet.trainer.steps`), which hides the step barrier's round trips on slow links.

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
from swarmnet.errors import ConfigError, SwarmError, SwarmnetError
from swarmnet.pipeline.retry import RetryPolicy
from swarmnet.pipeline.routing import choose_peer
from swarmnet.pipeline.snapshot import PeerInfo
from swarmnet.protocols.stage import CallTicket, StageStub
from swarmnet.telemetry import metrics
from swarmnet.trainer.audit import Auditor, judge
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
        self.order = GradientOrder(self.session)
        if not 0.0 <= config.audit_fraction <= 1.0:
            raise ConfigError(f"audit_fraction must be within 0..1, not {config.audit_fraction}")
        audits = config.audit_fraction if manifest.averaging.mode == "gradient" else 0.0
        self.auditor = Auditor(audits, self.rng)
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
        async with self.order.turn(last, mb.index) as ticket:
            _, result = await self._call(
                last,
                "forward_loss",
                lambda stub: stub.forward(run_id, mb_id, last, x, mb.targets, order=ticket(stub.peer_id)),
            )
        grad = result.grad_input
        for stage in reversed(range(last)):
            async with self.order.turn(stage, mb.index) as ticket:
                grad = await self._backward(stage, route[stage], inputs[stage], grad, mb_id, ticket)
        return result.loss

    async def _backward(
        self,
        stage: int,
        peer_id: str,
        x: torch.Tensor,
        grad: torch.Tensor,
        mb_id: str,
        ticket: Callable[[str], CallTicket],
    ) -> torch.Tensor:
        run_id = self.manifest.run_id
        try:
            started = time.perf_counter()
            async with asyncio.timeout(self.policy.call_timeout):
                grad_input = await self.directory.stub(peer_id).backward(
                    run_id, mb_id, stage, grad, order=ticket(peer_id)
                )
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
        `kind` names the call in `swarmnet_trainer_stage_call_seconds`. Forward calls are sometimes
        audited (`swarmnet.trainer.audit`)."""
        if kind in ("forward", "forward_loss") and self.auditor.should_audit():
            audited = await self._audited_call(stage, fn)
            if audited is not None:
                return audited
        last_error: BaseException | None = None
        for attempt in range(self.policy.max_attempts):
            peers = self._honest(await self.directory.peers(stage, force=attempt > 0 and last_error is None))
            # Bans steer traffic away from a failing peer; they never starve a stage whose every
            # peer is banned: then the call goes to one of them anyway (after the backoff). Liars
            # caught by an audit are never called again.
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

    def _honest(self, peers: list[PeerInfo]) -> list[PeerInfo]:
        return [p for p in peers if p.peer_id not in self.auditor.liars]

    async def _audited_call(self, stage: int, fn: Callable[[StageStub], Awaitable[T]]) -> tuple[str, T] | None:
        """Sends the same call to two replicas of `stage` (a third on a mismatch) and keeps the
        result a majority vouches for; None when the stage has fewer than two usable peers or a
        replica failed (the caller then makes an ordinary call). Raises `SwarmError` (the
        microbatch is dropped) when no majority forms."""
        peers = self._honest(await self.directory.peers(stage))
        chosen: list[str] = []
        results: dict[str, T] = {}

        async def ask(count: int) -> bool:
            for _ in range(count):
                banned = self.policy.banned() | set(chosen)
                peer = choose_peer(peers, banned=banned, rng=self.rng)
                if peer is None:
                    return False
                chosen.append(peer.peer_id)
            asked = chosen[-count:]
            try:
                async with asyncio.timeout(self.policy.call_timeout):
                    answers = await asyncio.gather(*(fn(self.directory.stub(p)) for p in asked), return_exceptions=True)
            except TimeoutError:
                return False
            complete = True
            for peer_id, answer in zip(asked, answers):
                if isinstance(answer, (SwarmnetError, OSError)):
                    complete = False
                    if self.policy.should_ban(answer):
                        self.policy.ban(peer_id)
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    results[peer_id] = answer
            return complete

        if not await ask(2):
            return next(iter(results.items()), None)  # an ordinary call's result, or an ordinary call
        verdict = judge(results)  # type: ignore[arg-type]
        if verdict.accepted is None and await ask(1):
            verdict = judge(results)  # type: ignore[arg-type]
        metrics.TRAINER_AUDITS.labels(stage=str(stage), outcome=verdict.outcome).inc()
        for liar in verdict.liars:
            if liar not in self.auditor.liars:
                metrics.TRAINER_LIARS_BANNED.labels(stage=str(stage)).inc()
            self.auditor.convict(liar, stage)
        if verdict.accepted is None:
            raise SwarmError(f"stage {stage}: replicas {[p[-6:] for p in results]} disagree and no majority formed")
        return verdict.accepted, results[verdict.accepted]


class GradientOrder:
    """Gradient-producing calls (the last stage's forward+loss, every backward) reach each stage
    in microbatch order. A stage's peer then adds a step's gradients in the same order as
    `train --local` does, and float sums come out bit-identical. Forwards stay concurrent, and
    different stages still work on different microbatches at once (the pipeline).

    A call waits only until its predecessor for the same stage was *sent* (or failed), not until it
    returned: each call carries a `CallTicket` naming the call sent before it to the same peer, and
    the peer applies them in that order (`swarmnet.peer.ordering`). So the calls of a step overlap
    on the wire instead of costing a round trip each."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._active: set[int] = set()
        self._released: dict[tuple[int, int], asyncio.Event] = {}
        self._last_sent: dict[tuple[int, str], int] = {}
        """(stage, peer id) → the last microbatch whose gradient call was sent there."""

    def begin(self, index: int) -> None:
        self._active.add(index)

    def end(self, index: int) -> None:
        """Microbatch `index` is finished or dropped: it blocks nobody any more."""
        self._active.discard(index)
        for key in [k for k in self._released if k[1] == index]:
            self._released.pop(key).set()

    @contextlib.asynccontextmanager
    async def turn(self, stage: int, index: int):
        """Waits for microbatch `index - 1`'s call to `stage` to be sent; yields `ticket(peer_id)`,
        which makes the `CallTicket` for a call of this turn to that peer."""
        if index - 1 in self._active:
            await self._released.setdefault((stage, index - 1), asyncio.Event()).wait()
        released = self._released.setdefault((stage, index), asyncio.Event())

        def ticket(peer_id: str) -> CallTicket:
            def sent() -> None:
                self._last_sent[(stage, peer_id)] = index
                released.set()

            return CallTicket(key=self.key, seq=index, after=self._last_sent.get((stage, peer_id), -1), sent=sent)

        try:
            yield ticket
        finally:
            released.set()


__all__ = ["SwarmTrainer", "StepReport"]
