"""Deterministic microbatches of byte tokens drawn from a corpus.

The i-th microbatch is a pure function of (corpus, training config, i): its offsets come from a
generator seeded with (training.seed, i). Two processes reading the same manifest therefore see
the same sequence of microbatches without talking to each other. The tail of the corpus is held
out of training for evaluation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from swarmnet.config import TrainingConfig
from swarmnet.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Microbatch:
    """One microbatch: `targets` are `tokens` shifted left by one position."""

    index: int
    tokens: torch.Tensor
    """int64 (B, T)."""
    targets: torch.Tensor
    """int64 (B, T)."""


class MicrobatchStream:
    """Random windows of `training.seq_len + 1` bytes from the training part of `corpus`."""

    def __init__(self, corpus: bytes, training: TrainingConfig, holdout_fraction: float):
        if not 0.0 <= holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in [0, 1), not {holdout_fraction}")
        self.training = training
        window = training.seq_len + 1
        if len(corpus) < window:
            raise ConfigError(f"corpus of {len(corpus)} bytes is shorter than seq_len + 1 = {window}")
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)  # (N,)
        n_holdout = max(int(len(data) * holdout_fraction), window) if holdout_fraction > 0 else 0
        n_train = len(data) - n_holdout
        if n_train < window:
            raise ConfigError(
                f"corpus of {len(corpus)} bytes leaves {n_train} for training after the holdout; "
                f"need at least seq_len + 1 = {window}"
            )
        self._train = data[:n_train]
        self._holdout = data[n_train:]

    def microbatch(self, index: int) -> Microbatch:
        """The `index`-th training microbatch (the same in every process)."""
        if index < 0:
            raise ValueError(f"microbatch index must be >= 0, not {index}")
        B, T = self.training.microbatch_size, self.training.seq_len
        generator = torch.Generator().manual_seed(_stable_seed(self.training.seed, "train", index))
        offsets = torch.randint(0, len(self._train) - T, (B,), generator=generator)  # (B,)
        tokens, targets = _windows(self._train, offsets, T)
        return Microbatch(index=index, tokens=tokens, targets=targets)

    def __iter__(self) -> Iterator[Microbatch]:
        """Microbatches 0, 1, 2, ... without end."""
        index = 0
        while True:
            yield self.microbatch(index)
            index += 1

    def eval_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` held-out sequences (tokens, targets), each int64 (n, T), evenly spread over the holdout."""
        if n < 1:
            raise ValueError(f"eval batch size must be >= 1, not {n}")
        if len(self._holdout) == 0:
            raise ConfigError("holdout_fraction is 0: there is no held-out data to evaluate on")
        T = self.training.seq_len
        offsets = torch.linspace(0, len(self._holdout) - T - 1, n).long()  # (n,)
        return _windows(self._holdout, offsets, T)


def _windows(data: torch.Tensor, offsets: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token targets of the windows of `data` starting at `offsets`."""
    index = offsets[:, None] + torch.arange(T + 1)  # (B, T + 1)
    chunk = data[index].long()  # (B, T + 1)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # (B, T), (B, T)


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, equal in every process (unlike `hash()`)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
