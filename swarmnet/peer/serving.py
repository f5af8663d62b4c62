"""A peer's stage backend: validates every request, then computes on the compute thread.

Validation happens in two passes: headers before any tensor byte is read (run id, stage, dtype,
shape, size) and values after (finite floats, token ids in range), so bad input costs little and
always gets a typed error. Inputs are cached per (client, microbatch id) between forward and
backward; the backward recomputes the forward (activation checkpointing by design).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import torch

from swarmnet.config import PeerConfig, RunManifest
from swarmnet.errors import BadRequestError, PeerUnavailableError, UnknownMicrobatchError, UnknownRunError
from swarmnet.models.partition import TensorSpec, target_spec, unit_input_spec, unit_output_spec
from swarmnet.peer.cache import ExpiringCache
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.executor import ComputeExecutor
from swarmnet.peer.ordering import CallOrder
from swarmnet.peer.throughput import ThroughputMeter
from swarmnet.protocols.framing import COMPRESSIONS, DTYPES, TensorHeader
from swarmnet.protocols.stage import BackwardRequest, ForwardRequest, ForwardResult
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

MAX_MICROBATCH_ID = 128
MAX_ABS_VALUE = 1e6
"""Largest magnitude accepted in activations and gradients. Real ones stay orders of magnitude
below; finite but huge values (1e20) overflow inside the stage and would turn its loss and its
accumulated gradients into NaN (found by fuzzing)."""


class StageServing:
    """Implements `swarmnet.protocols.stage.StageBackend` for one unit of one run: a pipeline stage,
    or an expert (whose calls come from the MoE gates of stage peers, with its unit index)."""

    def __init__(
        self,
        manifest: RunManifest,
        stage: int,
        computer: StageComputer,
        meter: ThroughputMeter,
        config: PeerConfig,
    ):
        self.manifest = manifest
        self.run_id = manifest.run_id
        self.stage = stage
        self.is_last = stage == manifest.training.num_stages - 1
        self.computer = computer
        self.meter = meter
        self.executor = ComputeExecutor(
            max_queue=config.max_queue,
            torch_threads=config.compute_threads,
            max_per_client=config.max_queue_per_client,
        )
        self.cache: ExpiringCache[tuple[torch.Tensor, list | None]] = ExpiringCache(
            config.input_cache_size,
            config.input_cache_ttl,
            max_per_owner=max(1, config.input_cache_size // 4),
        )
        """(client, microbatch id) → the forward's input and its MoE trace (see `forward_traced`)."""
        self.input_spec = unit_input_spec(manifest, stage)
        self.output_spec = unit_output_spec(manifest, stage)
        self.target_spec = target_spec(manifest)
        self.on_backward: Callable[[], None] | None = None
        """Called (on the event loop) after every backward: the stage's averaging checks progress."""
        self.draining = False
        """Set while the peer leaves: new microbatches are refused (retryable), the backwards of
        those it already holds are still served."""
        self.in_flight = 0
        """Forward/backward calls being computed now."""
        self.order = CallOrder()
        """Holds a trainer's gradient calls back until their predecessors were handed to compute."""
        self.last_call = time.monotonic()
        """When the last forward/backward call finished."""

    def idle(self, quiet: float) -> bool:
        """No call in progress, and no microbatch waiting for its backward — or none for `quiet`
        seconds (its trainer is gone or replays it elsewhere)."""
        if self.in_flight:
            return False
        return len(self.cache) == 0 or time.monotonic() - self.last_call >= quiet

    @property
    def queue_depth(self) -> int:
        return self.executor.pending

    # --- header checks (before any tensor is read) ----------------------------------------------

    def _check_common(self, run_id: str, stage: int, microbatch_id: str, compression: str) -> None:
        if run_id != self.run_id:
            raise UnknownRunError(f"this peer serves run {self.run_id}, not {run_id!r}")
        if stage != self.stage:
            # Not the caller's fault: a peer that moved to another stage still has a live record
            # under the old stage for a few seconds. Retryable on another peer.
            raise PeerUnavailableError(f"this peer serves stage {self.stage}, not {stage}")
        if not microbatch_id or len(microbatch_id) > MAX_MICROBATCH_ID:
            raise BadRequestError("microbatch id must be 1..128 characters")
        if compression not in COMPRESSIONS:
            raise BadRequestError(f"unknown reply compression {compression!r}")

    def _check_order(self, request: ForwardRequest | BackwardRequest) -> None:
        if len(request.order_key) > MAX_MICROBATCH_ID:
            raise BadRequestError("order key must be at most 128 characters")

    def check_forward(self, request: ForwardRequest, client: str = "") -> None:
        with self._released_on_error(client, request):
            self._check_forward(request)

    def check_backward(self, request: BackwardRequest, client: str = "") -> None:
        with self._released_on_error(client, request):
            self._check_backward(request)

    @contextlib.contextmanager
    def _released_on_error(self, client: str, request: ForwardRequest | BackwardRequest):
        """A refused gradient call still lets its successor go (`swarmnet.peer.ordering`)."""
        try:
            yield
        except Exception:
            self.order.handed_over(client, request.order_key, request.seq)
            raise

    def _check_forward(self, request: ForwardRequest) -> None:
        self._check_common(request.run_id, request.stage, request.microbatch_id, request.reply_compression)
        self._check_order(request)
        _check_header(request.input, self.input_spec, "input")
        if self.is_last != (request.targets is not None):
            raise BadRequestError("targets go to the last stage, and only there")
        if request.targets is not None:
            _check_header(request.targets, self.target_spec, "targets")
            if request.targets.shape[0] != request.input.shape[0]:
                raise BadRequestError("targets and input have different batch sizes")

    def _check_backward(self, request: BackwardRequest) -> None:
        self._check_common(request.run_id, request.stage, request.microbatch_id, request.reply_compression)
        self._check_order(request)
        if self.is_last:
            raise BadRequestError("the last stage computes its backward in the forward call")
        _check_header(request.grad_output, self.output_spec, "grad_output")

    # --- compute --------------------------------------------------------------------------------

    async def forward(
        self, client: str, request: ForwardRequest, x: torch.Tensor, targets: torch.Tensor | None
    ) -> ForwardResult:
        try:
            if self.draining:
                raise PeerUnavailableError("this peer is leaving the stage")
            self._check_values(x, "input")
            self.in_flight += 1
            try:
                return await self._forward(client, request, x, targets)
            finally:
                self.in_flight -= 1
                self.last_call = time.monotonic()
        finally:
            self.order.handed_over(client, request.order_key, request.seq)

    async def _forward(
        self, client: str, request: ForwardRequest, x: torch.Tensor, targets: torch.Tensor | None
    ) -> ForwardResult:
        if targets is not None:
            _check_tokens(targets, self.manifest.model.vocab_size, "targets")
            await self.order.wait_for(client, request.order_key, request.after)
            self.order.handed_over(client, request.order_key, request.seq)  # the executor runs in order
            result, seconds = await self.executor.run_timed(self.computer.loss_backward, x, targets, client=client)
            self._observe("loss_backward", len(x), seconds, stepped=result.stepped)
            self._backward_done()
            return ForwardResult(output=None, grad_input=result.grad_input, loss=result.loss, step=self.computer.step)
        (output, trace), seconds = await self.executor.run_timed(self.computer.forward_traced, x, client=client)
        self._observe("forward", len(x), seconds, stepped=False)
        self.cache.put((client, request.microbatch_id), (x, trace))
        return ForwardResult(output=output, grad_input=None, loss=None, step=self.computer.step)

    async def backward(
        self, client: str, request: BackwardRequest, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        try:
            return await self._backward(client, request, grad_output)
        finally:
            self.order.handed_over(client, request.order_key, request.seq)

    async def _backward(
        self, client: str, request: BackwardRequest, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        _check_finite(grad_output, "grad_output")
        key = (client, request.microbatch_id)
        cached = self.cache.get(key)
        if cached is None:
            raise UnknownMicrobatchError(f"no cached input for microbatch {request.microbatch_id!r}")
        x, trace = cached
        if len(x) != len(grad_output):
            raise BadRequestError("grad_output batch size differs from the forward's input")
        await self.order.wait_for(client, request.order_key, request.after)
        self.in_flight += 1
        try:
            self.order.handed_over(client, request.order_key, request.seq)  # the executor runs in order
            result, seconds = await self.executor.run_timed(
                self.computer.backward, x, grad_output, trace, client=client
            )
        finally:
            self.in_flight -= 1
            self.last_call = time.monotonic()
        self.cache.pop(key)  # only now: a busy peer keeps the input for the retry
        self._observe("backward", len(x), seconds, stepped=result.stepped)
        self._backward_done()
        return result.grad_input, self.computer.step

    def _backward_done(self) -> None:
        if self.computer.moe is not None and self.computer.moe.last_aux_loss is not None:
            metrics.MOE_AUX_LOSS.set(self.computer.moe.last_aux_loss)
        if self.on_backward is not None:
            self.on_backward()

    def _check_values(self, x: torch.Tensor, what: str) -> None:
        if x.dtype == torch.int64:
            _check_tokens(x, self.manifest.model.vocab_size, what)
        else:
            _check_finite(x, what)

    def _observe(self, kind: str, samples: int, seconds: float, *, stepped: bool) -> None:
        """Counts one call; `seconds` is its compute time on the compute thread, so the announced
        throughput is the peer's capacity, the same quantity its start-up probe measured (time
        spent queued behind other calls would make a busy peer look slow and a fresh one fast)."""
        self.meter.record(kind, samples, seconds)
        metrics.STAGE_COMPUTE_SECONDS.labels(kind=kind).observe(seconds)
        metrics.STAGE_SAMPLES.labels(kind=kind).inc(samples)
        if stepped:
            metrics.OPTIMIZER_STEPS.inc()
            logger.debug("stage %d took optimizer step %d", self.stage, self.computer.step)

    def shutdown(self) -> None:
        self.executor.shutdown()


def _check_header(header: TensorHeader, spec: TensorSpec, what: str) -> None:
    if DTYPES.get(header.dtype) != spec.dtype:
        raise BadRequestError(f"{what} dtype {header.dtype} != expected {spec.dtype}")
    shape = header.shape
    if len(shape) != len(spec.shape) or list(shape[1:]) != list(spec.shape[1:]):
        raise BadRequestError(f"{what} shape {shape} does not fit {list(spec.shape)}")
    if not 1 <= shape[0] <= spec.shape[0]:
        raise BadRequestError(f"{what} batch {shape[0]} outside 1..{spec.shape[0]}")
    if header.compression not in COMPRESSIONS:
        raise BadRequestError(f"unknown compression {header.compression!r}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    """One pass over the tensor (it is on the activation path): the largest magnitude is NaN if any
    value is, inf if any is infinite."""
    if not x.numel():
        return
    largest = float(x.abs().max())
    if not math.isfinite(largest):
        raise BadRequestError(f"{what} contains NaN or Inf")
    if largest > MAX_ABS_VALUE:
        raise BadRequestError(f"{what} has values beyond ±{MAX_ABS_VALUE:g}")


def _check_tokens(x: torch.Tensor, vocab_size: int, what: str) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise BadRequestError(f"{what} has token ids outside 0..{vocab_size - 1}")
