"""A malicious stage peer for tests: the real `swarmnet join`, with its results corrupted.

`python -m swarmnet.testing.byzantine [--scale S] join ...` runs the ordinary CLI after patching
`StageComputer` so that every forward output and every input gradient it returns is replaced by
noise of `S` times the true value's norm (and the last stage's loss is reported wrong). Nothing
else changes: it announces itself, serves, averages and looks like any honest peer on the wire,
which is the point — only comparing its answers with its replicas' can expose it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from swarmnet.cli import main as swarmnet_main
from swarmnet.peer.compute import StageComputer


def _corrupt(t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    if t is None or not t.is_floating_point():
        return t
    noise = torch.randn_like(t)
    return noise * (scale * float(t.norm()) / max(float(noise.norm()), 1e-12))


def patch(scale: float) -> None:
    forward, backward, loss_backward = StageComputer.forward, StageComputer.backward, StageComputer.loss_backward

    def bad_forward(self, x):
        return _corrupt(forward(self, x), scale)

    def bad_backward(self, *args, **kwargs):
        result = backward(self, *args, **kwargs)
        return dataclasses.replace(result, grad_input=_corrupt(result.grad_input, scale))

    def bad_loss_backward(self, x, targets):
        result = loss_backward(self, x, targets)
        loss = None if result.loss is None else result.loss * (1 + scale)
        return dataclasses.replace(result, grad_input=_corrupt(result.grad_input, scale), loss=loss)

    StageComputer.forward = bad_forward
    StageComputer.backward = bad_backward
    StageComputer.loss_backward = bad_loss_backward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="noise norm relative to the true result's")
    args, rest = parser.parse_known_args(argv)
    patch(args.scale)
    return swarmnet_main(rest)


if __name__ == "__main__":
    sys.exit(main())
