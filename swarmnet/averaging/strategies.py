"""What a stage averages and how it applies the result: one class per averaging mode.

Methods marked *compute thread* touch torch state and run on the peer's compute executor.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Protocol

import torch

from swarmnet.config import AveragingConfig
from swarmnet.peer.compute import StageComputer


class Strategy(Protocol):
    steps_alone_inline: bool
    """Whether a peer alone in its stage steps on its compute thread without any round."""

    @property
    def epoch(self) -> int: ...

    @property
    def samples(self) -> int: ...

    @property
    def target_samples(self) -> int: ...

    def set_alone(self, alone: bool) -> None: ...

    def freeze(self) -> tuple[torch.Tensor, int]: ...

    def unfreeze(self, tensor: torch.Tensor, weight: int) -> None: ...

    def apply(self, total: torch.Tensor, total_weight: float) -> None: ...

    def parameter_digest(self) -> str: ...

    def state_view(self): ...

    def after_state_loaded(self) -> None: ...


class GradientAveraging:
    """Exact data parallelism: average the gradients of each `target_batch_size` samples."""

    steps_alone_inline = True

    def __init__(self, computer: StageComputer):
        self.computer = computer

    @property
    def epoch(self) -> int:
        return self.computer.step

    @property
    def samples(self) -> int:
        return self.computer.accumulated_samples

    @property
    def target_samples(self) -> int:
        return self.computer.target_batch_size

    def set_alone(self, alone: bool) -> None:
        self.computer.auto_step = alone

    @property
    def handoff_numel(self) -> int | None:
        """Size of the gradient sums a leaving peer hands to a stage-mate (None: no handoffs)."""
        return sum(p.numel() for p in self.computer.module.parameters())

    def freeze(self) -> tuple[torch.Tensor, int]:  # compute thread
        return self.computer.freeze_gradients()

    def unfreeze(self, tensor: torch.Tensor, weight: int) -> None:  # compute thread
        self.computer.unfreeze_gradients(tensor, weight)

    def apply(self, total: torch.Tensor, total_weight: float) -> None:  # compute thread
        self.computer.apply_gradient_sum(total, int(round(total_weight)))

    def parameter_digest(self) -> str:  # compute thread
        return self.computer.parameter_digest()

    def state_view(self):
        """What state sync snapshots and loads: the computer itself."""
        return self.computer

    def after_state_loaded(self) -> None:
        pass


class DilocoAveraging:
    """Low-communication mode (DiLoCo-style): every peer takes local optimizer steps; every
    `outer_every` stage-wide batches the stage averages the parameter change since the last outer
    step (weighted by samples) and applies it with an outer Nesterov-SGD step. Replicas are
    identical at each outer step (the anchor); the inner optimizer state stays local."""

    steps_alone_inline = False
    handoff_numel = None
    """Inner steps are local: there are no pending gradients to hand over when leaving."""

    def __init__(self, computer: StageComputer, config: AveragingConfig):
        self.computer = computer
        computer.auto_step = True
        self.anchor = copy.deepcopy(computer.module).requires_grad_(False)
        self.outer = torch.optim.SGD(
            self.anchor.parameters(), lr=config.outer_lr, momentum=config.outer_momentum, nesterov=True
        )
        self.outer_step = 0
        self._target = config.outer_every * computer.target_batch_size
        self._samples_base = computer.samples_seen

    @property
    def epoch(self) -> int:
        return self.outer_step

    @property
    def samples(self) -> int:
        return self.computer.samples_seen - self._samples_base

    @property
    def target_samples(self) -> int:
        return self._target

    def set_alone(self, alone: bool) -> None:
        pass  # inner steps are always local

    def freeze(self) -> tuple[torch.Tensor, int]:  # compute thread
        weight = self.samples
        self._samples_base = self.computer.samples_seen
        delta = [(a - p.detach()).reshape(-1) for a, p in zip(self.anchor.parameters(), self.computer.module.parameters())]
        return torch.cat(delta).float().cpu().mul_(weight), weight

    def unfreeze(self, tensor: torch.Tensor, weight: int) -> None:  # compute thread
        self._samples_base -= weight

    def apply(self, total: torch.Tensor, total_weight: float) -> None:  # compute thread
        pseudo_grad = total / max(total_weight, 1.0)
        offset = 0
        for a in self.anchor.parameters():
            n = a.numel()
            a.grad = pseudo_grad[offset : offset + n].view_as(a).to(a.device, a.dtype)
            offset += n
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for a, p in zip(self.anchor.parameters(), self.computer.module.parameters()):
                p.copy_(a)
        self.outer_step += 1

    def parameter_digest(self) -> str:  # compute thread
        digest = hashlib.sha256()
        for a in self.anchor.parameters():
            digest.update(a.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def state_view(self):
        """State sync carries the anchor, the outer optimizer and the outer step."""
        return _AnchorView(self)

    def after_state_loaded(self) -> None:  # compute thread
        with torch.no_grad():
            for a, p in zip(self.anchor.parameters(), self.computer.module.parameters()):
                p.copy_(a)
        self._samples_base = self.computer.samples_seen


class _AnchorView:
    """Looks like a `StageComputer` to state snapshots: module, optimizer, step."""

    def __init__(self, diloco: DilocoAveraging):
        self._diloco = diloco
        self.module = diloco.anchor
        self.optimizer = diloco.outer
        self.accumulated_samples = 0

    @property
    def step(self) -> int:
        return self._diloco.outer_step

    @step.setter
    def step(self, value: int) -> None:
        self._diloco.outer_step = value


def make_strategy(computer: StageComputer, config: AveragingConfig) -> Strategy:
    return DilocoAveraging(computer, config) if config.mode == "diloco" else GradientAveraging(computer)
