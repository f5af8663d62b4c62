"""A stage's MoE gates calling remote experts (`swarmnet.models.moe.Experts` over the network).

Discovery: one DHT read per MoE layer finds every live replica of the layer's experts (prefix search
over uids, `dht.stages.read_experts`), refreshed in the background; a replica that failed a call is
banned for `ban_seconds`. An expert is *alive* while it has a replica that is not banned, and the
gate routes tokens only among alive experts.

Dispatch: the experts a microbatch's tokens go to are called in parallel, each on one replica chosen
by stochastic wiring (throughput-weighted, like stage peers), over the stage protocol with the
expert's unit index. The gate goes on once every token has `k_min` answers (or cannot get them),
waiting at most `timeout_after_k_min` more for the rest and never more than `forward_timeout`;
missing answers are left out and the gates renormalized. The backward goes to the replica that
answered the forward (it holds the input); a failed backward just contributes no gradient.

`forward` and `backward` are called on the peer's compute thread and block it while the calls run
on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import threading
import time

import torch
from hivemind.utils import get_dht_time

from swarmnet.config import RetryConfig, RunManifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.stages import read_experts
from swarmnet.models.moe import ExpertAnswers, Routes, expert_uid, expert_uids, max_expert_tokens, unit_of
from swarmnet.pipeline.retry import RetryPolicy
from swarmnet.pipeline.routing import choose_peer
from swarmnet.pipeline.snapshot import PeerInfo
from swarmnet.protocols.stage import StageStub
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

REFRESH_PERIOD = 2.0
"""Seconds between DHT reads of the experts' records."""


class RemoteExperts:
    """The experts of some MoE layers, served by other peers and found through the DHT."""

    def __init__(
        self,
        dht: SwarmDHT,
        manifest: RunManifest,
        layers: list[int],
        *,
        loop: asyncio.AbstractEventLoop,
        retry: RetryConfig | None = None,
        rng: random.Random | None = None,
    ):
        if manifest.model.moe is None:
            raise ValueError("the run has no MoE layers")
        self.dht = dht
        self.manifest = manifest
        self.moe = manifest.model.moe
        self.layers = layers
        self.loop = loop
        self.policy = RetryPolicy(retry or RetryConfig())
        self._ban_lock = threading.Lock()  # bans are set on the event loop, read on the compute thread
        self.rng = rng or random.Random()
        self.closed = False
        self._replicas: dict[str, list[PeerInfo]] = {}
        self._stubs: dict[str, StageStub] = {}
        self._units = {uid: unit_of(manifest, uid) for uid in expert_uids(manifest)}
        self._max_reply_bytes = max_expert_tokens(manifest) * manifest.model.d_model * 4

    # --- discovery (event loop) -----------------------------------------------------------------

    async def run(self, period: float = REFRESH_PERIOD) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(period)  # a periodic DHT read, not a readiness wait

    async def refresh(self) -> None:
        now = get_dht_time()
        for layer in self.layers:
            try:
                found = await read_experts(self.dht, self.manifest, layer)
            except Exception as e:  # noqa: BLE001 - keep the known replicas until their records expire
                logger.warning("could not read the experts of layer %d: %s", layer, e)
                found = {}
            for index in range(self.moe.num_experts):
                uid = expert_uid(layer, index)
                fresh = found.get(uid, [])
                known = [p for p in self._replicas.get(uid, []) if p.expires_at > now]
                self._replicas[uid] = [info for info, _ in fresh] or known
                for info, record in fresh:
                    stub = self._stubs.get(info.peer_id)
                    if stub is None or stub.maddrs != record.maddrs or stub.data_addr != record.averaging_addr:
                        self._stubs[info.peer_id] = StageStub(
                            self.dht.p2p,
                            info.peer_id,
                            record.maddrs,
                            max_reply_bytes=self._max_reply_bytes,
                            data_addr=record.averaging_addr,
                            direct=self.dht.direct,
                        )
            metrics.LIVE_EXPERTS.labels(layer=str(layer)).set(int(self.alive(layer).sum()))

    def replicas(self, uid: str) -> list[PeerInfo]:
        return list(self._replicas.get(uid, []))

    def _banned_now(self) -> set[str]:
        with self._ban_lock:
            return self.policy.banned()

    def _fail(self, peer_id: str, kind: str, error: BaseException) -> None:
        with self._ban_lock:
            self.policy.ban(peer_id)
        metrics.EXPERT_CALLS.labels(kind=kind, outcome="error").inc()
        logger.info("expert %s call to %s failed (%s); banned for %.0f s", kind, peer_id[-6:], error, self.policy.config.ban_seconds)

    # --- the Experts interface (compute thread) -------------------------------------------------

    def alive(self, layer: int) -> torch.Tensor:
        banned = self._banned_now()
        return torch.tensor(
            [
                any(p.peer_id not in banned for p in self._replicas.get(expert_uid(layer, i), []))
                for i in range(self.moe.num_experts)
            ],
            dtype=torch.bool,
        )

    def forward(self, layer: int, routes: Routes, tokens: torch.Tensor) -> ExpertAnswers:
        N, K = routes.experts.shape
        empty = ExpertAnswers(
            values=torch.zeros(N, K, tokens.shape[1]), answered=torch.zeros(N, K, dtype=torch.bool), handles={}
        )
        answers = self._blocking(self._forward(layer, routes, tokens), self.moe.forward_timeout, empty)
        answered = int(answers.answered.sum())
        metrics.MOE_TOKENS.labels(outcome="answered").inc(answered)
        metrics.MOE_TOKENS.labels(outcome="unanswered").inc(int((routes.experts >= 0).sum()) - answered)
        return answers

    def backward(self, layer: int, routes: Routes, answers: ExpertAnswers, grad: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(grad.shape[0], grad.shape[2], dtype=grad.dtype)
        return self._blocking(self._backward(layer, routes, answers, grad), self.moe.backward_timeout, zeros)

    def _blocking(self, coro, timeout: float, fallback):
        if self.closed:
            coro.close()
            return fallback
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout + 5.0)  # the coroutine bounds itself; this is a backstop
        except Exception as e:  # noqa: BLE001 - a stuck or stopped loop: answer without the experts
            future.cancel()
            logger.warning("expert calls did not complete: %r", e)
            return fallback

    # --- the calls (event loop) -----------------------------------------------------------------

    async def _forward(self, layer: int, routes: Routes, tokens: torch.Tensor) -> ExpertAnswers:
        N, K = routes.experts.shape
        C = tokens.shape[1]
        values = torch.zeros(N, K, C)
        answered = torch.zeros(N, K, dtype=torch.bool)
        handles: dict[int, tuple[str, str]] = {}
        banned = self._banned_now()
        calls: dict[asyncio.Task, tuple[int, str, str, torch.Tensor, torch.Tensor, float]] = {}
        reachable = torch.zeros(N, dtype=torch.int64)
        for e in routes.used():
            uid = expert_uid(layer, e)
            peer = choose_peer(self._replicas.get(uid, []), banned=banned, rng=self.rng)
            if peer is None:
                continue
            rows, slots = routes.assignment(e)
            call_id = secrets.token_hex(8)
            stub = self._stubs[peer.peer_id]
            coro = stub.forward(self.manifest.run_id, call_id, self._units[uid], tokens[rows].contiguous())
            calls[asyncio.create_task(coro)] = (e, peer.peer_id, call_id, rows, slots, time.perf_counter())
            reachable[rows] += 1
        need = reachable.clamp(max=self.moe.k_min)
        got = torch.zeros(N, dtype=torch.int64)
        now = self.loop.time()
        deadline = now + self.moe.forward_timeout
        pending = set(calls)
        while pending:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                e, peer_id, call_id, rows, slots, started = calls[task]
                try:
                    output = task.result().output
                    _check_answer(output, (len(rows), C))
                except Exception as error:  # noqa: BLE001 - any failure: this expert is missing here
                    self._fail(peer_id, "forward", error)
                    continue
                metrics.EXPERT_CALLS.labels(kind="forward", outcome="ok").inc()
                metrics.EXPERT_CALL_SECONDS.labels(kind="forward").observe(time.perf_counter() - started)
                values[rows, slots] = output
                answered[rows, slots] = True
                handles[e] = (peer_id, call_id)
                got[rows] += 1
            if bool((got >= need).all()):
                deadline = min(deadline, self.loop.time() + self.moe.timeout_after_k_min)
        for task in pending:  # too slow: left out of this microbatch
            task.cancel()
            metrics.EXPERT_CALLS.labels(kind="forward", outcome="timeout").inc()
        return ExpertAnswers(values=values, answered=answered, handles=handles)

    async def _backward(self, layer: int, routes: Routes, answers: ExpertAnswers, grad: torch.Tensor) -> torch.Tensor:
        grad_tokens = torch.zeros(grad.shape[0], grad.shape[2], dtype=grad.dtype)

        async def one(e: int, peer_id: str, call_id: str) -> None:
            rows, slots = routes.assignment(e)
            uid = expert_uid(layer, e)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.moe.backward_timeout):
                    result = await self._stubs[peer_id].backward(
                        self.manifest.run_id, call_id, self._units[uid], grad[rows, slots].contiguous()
                    )
                _check_answer(result, (len(rows), grad.shape[2]))
            except Exception as error:  # noqa: BLE001 - no gradient from this expert for this microbatch
                self._fail(peer_id, "backward", error)
                return
            metrics.EXPERT_CALLS.labels(kind="backward", outcome="ok").inc()
            metrics.EXPERT_CALL_SECONDS.labels(kind="backward").observe(time.perf_counter() - started)
            grad_tokens.index_add_(0, rows, result.to(grad_tokens.dtype))

        await asyncio.gather(*(one(e, pid, cid) for e, (pid, cid) in answers.handles.items()))
        return grad_tokens


def _check_answer(tensor: torch.Tensor | None, shape: tuple[int, int]) -> None:
    if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
        raise ValueError(f"expert answered {None if tensor is None else tuple(tensor.shape)}, expected {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("expert answered NaN or Inf")
