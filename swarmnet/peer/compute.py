"""The math of one stage: forward, recomputing backward, gradient accumulation and stepping.

`StageComputer` is synchronous and knows nothing about the network; the peer runs it on its compute
thread and the local reference trainer calls it directly, so a swarm and `swarmnet train --local`
execute exactly the same operations.

Gradients accumulate as *sums* over samples (each microbatch's mean loss is scaled by its sample
count); at a step they are divided by the number of samples accumulated, so a step's gradient is the
mean over its `target_batch_size` samples wherever the microbatches were computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from swarmnet.config import OptimizerConfig
from swarmnet.models.moe import MoERuntime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackwardResult:
    grad_input: torch.Tensor | None
    """Gradient of the stage input (None for integer token inputs)."""
    stepped: bool
    """Whether this call completed a batch and took an optimizer step."""
    loss: float | None = None
    """Mean loss of the microbatch (last stage only)."""


class StageComputer:
    """One stage's module, optimizer and gradient accumulator."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: OptimizerConfig,
        *,
        target_batch_size: int,
        device: str = "cpu",
    ):
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.target_batch_size = target_batch_size
        self.optimizer = make_optimizer(self.module.parameters(), optimizer)
        self.accumulated_samples = 0
        self.samples_seen = 0
        """Samples back-propagated by this computer since it was built (never reset)."""
        self.step = 0
        self.moe: MoERuntime | None = None
        """Set when the module has Mixture-of-Experts layers (`models.moe.attach_experts`)."""
        self.auto_step = True
        """Step as soon as this computer alone has `target_batch_size` samples (a stage served by
        one peer). Stage swarms turn it off and step through `apply_gradient_sum` after averaging."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage output for `x`, without keeping any autograd state."""
        with torch.no_grad():
            return self.module(x.to(self.device)).cpu()

    def forward_traced(self, x: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """`forward`, plus what its MoE layers routed and their experts answered (None without
        MoE layers): `backward` replays it instead of asking the experts again."""
        if self.moe is None:
            return self.forward(x), None
        with self.moe.recording() as trace:
            output = self.forward(x)
        return output, trace

    def backward(self, x: torch.Tensor, grad_output: torch.Tensor, trace: list | None = None) -> BackwardResult:
        """Recomputes the forward of `x` with grad (replaying `trace`, see `forward_traced`),
        back-propagates `grad_output` (plus any MoE balancing loss), accumulates."""
        x = self._input_with_grad(x)
        with self._moe_pass(trace) as balancing:
            output = self.module(x)
            extra = balancing(len(x))
            grad_output = grad_output.to(self.device, output.dtype)
            if extra is None:
                output.backward(grad_output)
            else:
                torch.autograd.backward([output, extra], [grad_output, None])
        return self._finish(x, len(x), loss=None)

    def loss_backward(self, x: torch.Tensor, targets: torch.Tensor) -> BackwardResult:
        """Last stage: computes the loss against `targets` and back-propagates it, in one pass."""
        x = self._input_with_grad(x)
        with self._moe_pass(None) as balancing:
            loss = self.module.loss(x, targets.to(self.device))
            extra = balancing(len(x))
            objective = loss * len(x)
            (objective if extra is None else objective + extra).backward()
        return self._finish(x, len(x), loss=float(loss.detach()))

    def _moe_pass(self, trace: list | None):
        if self.moe is None:
            return contextlib.nullcontext(lambda samples: None)
        return self.moe.replaying(trace)

    def evaluate(self, x: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.module.loss(x.to(self.device), targets.to(self.device)))

    def _input_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.detach().requires_grad_(True)
        return x

    def _finish(self, x: torch.Tensor, samples: int, loss: float | None) -> BackwardResult:
        grad_input = x.grad.cpu() if x.is_floating_point() and x.grad is not None else None
        self.accumulated_samples += samples
        self.samples_seen += samples
        stepped = self.auto_step and self.accumulated_samples >= self.target_batch_size
        if stepped:
            self._apply_step()
        return BackwardResult(grad_input=grad_input, stepped=stepped, loss=loss)

    def _apply_step(self) -> None:
        scale = 1.0 / self.accumulated_samples
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if not _grads_finite(self.module.parameters()):
            logger.warning("skipping optimizer step %d: the accumulated gradients are not finite", self.step + 1)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated_samples = 0
        self.step += 1

    # --- collaborative steps (called on the compute thread) -------------------------------------

    def freeze_gradients(self) -> tuple[torch.Tensor, int]:
        """Takes the accumulated gradient sums out as one flat tensor, with their sample count;
        later backwards accumulate afresh (for the next step) while the frozen ones are averaged."""
        params = list(self.module.parameters())
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu() for p in params
        ])
        samples = self.accumulated_samples
        for p in params:
            p.grad = None
        self.accumulated_samples = 0
        return flat, samples

    def unfreeze_gradients(self, flat: torch.Tensor, samples: int) -> None:
        """Puts frozen gradients back (a round that failed): nothing computed is lost."""
        for p, part in zip(self.module.parameters(), _split(flat, self.module.parameters())):
            part = part.to(p.device, p.dtype).view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad.add_(part)
        self.accumulated_samples += samples

    def apply_gradient_sum(self, flat_sum: torch.Tensor, total_samples: int) -> None:
        """One optimizer step with the stage-wide mean gradient `flat_sum / total_samples`; the
        gradients accumulated meanwhile for the next step are kept aside and restored."""
        params = list(self.module.parameters())
        pending = [p.grad for p in params]
        scale = 1.0 / max(total_samples, 1)
        for p, part in zip(params, _split(flat_sum, params)):
            p.grad = part.to(p.device, p.dtype).view_as(p).mul(scale)
        if not _grads_finite(params):
            logger.warning("skipping optimizer step %d: the averaged gradients are not finite", self.step + 1)
        else:
            self.optimizer.step()
        for p, grad in zip(params, pending):
            p.grad = grad
        self.step += 1

    def parameter_digest(self) -> str:
        """sha256 of every parameter's bytes, in order: equal digests mean identical replicas."""
        digest = hashlib.sha256()
        for p in self.module.parameters():
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def memory_bytes(self) -> int:
        """Parameters, gradients and optimizer state, in bytes (read from the event loop while the
        compute thread may be stepping: iterate over copies)."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in list(self.optimizer.state.values())
            for t in list(s.values())
            if isinstance(t, torch.Tensor)
        )
        return 2 * params + state


def _grads_finite(params) -> bool:
    """Whether every gradient is finite: a non-finite one would make the parameters NaN for good,
    so that step is skipped instead (the stage's step count still advances, like the replicas')."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def _split(flat: torch.Tensor, params) -> list[torch.Tensor]:
    sizes = [p.numel() for p in params]
    return list(torch.split(flat, sizes))


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
