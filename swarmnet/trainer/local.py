"""`swarmnet train --local`: the same manifest, data order, seed and math, in one process.

The reference a user (and the parity test) compares a swarm against: every stage is a
`StageComputer`, exactly as on the peers, called in pipeline order without a network.
"""

from __future__ import annotations

import dataclasses

from swarmnet.config import RunManifest, TrainerConfig
from swarmnet.data.loader import Microbatch, MicrobatchStream
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer
from swarmnet.trainer.steps import StepRunner


class LocalTrainer(StepRunner):
    def __init__(self, manifest: RunManifest, config: TrainerConfig, data: MicrobatchStream, *, device: str = "cpu"):
        super().__init__(manifest, dataclasses.replace(config, max_in_flight=1), data)
        self.stages = [
            StageComputer(
                build_stage(manifest, s),
                manifest.optimizer,
                target_batch_size=manifest.training.target_batch_size,
                device=device,
            )
            for s in range(manifest.training.num_stages)
        ]

    async def run_microbatch(self, mb: Microbatch) -> float:
        x = mb.tokens
        inputs = []
        for computer in self.stages[:-1]:
            inputs.append(x)
            x = computer.forward(x)
        result = self.stages[-1].loss_backward(x, mb.targets)
        grad = result.grad_input
        for computer, x_in in zip(reversed(self.stages[:-1]), reversed(inputs)):
            grad = computer.backward(x_in, grad).grad_input
        return result.loss
