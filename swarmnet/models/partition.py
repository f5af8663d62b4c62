"""How the model of `swarmnet.models.gpt` is cut into pipeline stages.

Stage 0 holds the embeddings, the last stage the head, and the transformer blocks are split into
contiguous ranges between them (`partition_layers`, a pure function). A `StageModule` keeps the
attribute names of the whole model (`embed`, `blocks`, `head`), so each of its parameters maps back
to one full name (`StageModule.full_name`) and is initialized exactly as in the uncut `GPT`.

`TensorSpec` describes what crosses the wire between stages: one microbatch's activations (or
tokens, or targets), with the leading batch dimension included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarmnet.config import ModelConfig, RunManifest
from swarmnet.errors import ConfigError
from swarmnet.models.gpt import Block, Embedding, Head, init_parameters
from swarmnet.models.moe import build_expert, expert_batch_tokens, max_expert_tokens, uid_of

logger = logging.getLogger(__name__)


def partition_layers(n_layers: int, num_stages: int) -> list[range]:
    """Splits blocks `0..n_layers-1` into `num_stages` contiguous, balanced ranges.

    Sizes differ by at most one. When uneven, the extra blocks go to the middle stages first, then
    to stage 0, never to the last stage: the first and last stages also carry the embeddings and
    the head. With `num_stages == n_layers + 1` some stage holds no block at all.
    """
    if n_layers < 0:
        raise ConfigError(f"n_layers must be >= 0, not {n_layers}")
    if not 1 <= num_stages <= n_layers + 1:
        raise ConfigError(f"cannot cut {n_layers} blocks into {num_stages} stages (1..{n_layers + 1})")
    base, extra = divmod(n_layers, num_stages)
    sizes = [base] * num_stages
    # Middle stages first, then the first stage; extra < num_stages, so the last never gets one.
    for stage in (list(range(1, num_stages - 1)) + [0])[:extra]:
        sizes[stage] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one microbatch tensor; `shape[0]` is the largest allowed batch."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def matches(self, tensor: object) -> str | None:
        """Returns why `tensor` does not fit this spec, or None when it does.

        The batch (leading) dimension may be anything from 1 to `shape[0]`; every other dimension
        must be equal.
        """
        if not isinstance(tensor, torch.Tensor):
            return f"expected a tensor, got {type(tensor).__name__}"
        if tensor.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {tensor.dtype}"
        if tensor.ndim != len(self.shape):
            return f"expected {len(self.shape)} dimensions {self.shape}, got shape {tuple(tensor.shape)}"
        if tuple(tensor.shape[1:]) != tuple(self.shape[1:]):
            return f"expected shape (B, {', '.join(map(str, self.shape[1:]))}), got {tuple(tensor.shape)}"
        if not 1 <= tensor.shape[0] <= self.shape[0]:
            return f"batch of {tensor.shape[0]} outside 1..{self.shape[0]}"
        return None


class StageModule(nn.Module):
    """One pipeline stage: optional embeddings, a contiguous run of blocks, optional head.

    Stage 0 maps int64 tokens (B, T) to activations (B, T, d_model); middle stages map activations
    to activations; the last stage maps its input to logits (B, T, vocab).
    """

    def __init__(self, config: ModelConfig, layers: range, *, has_embed: bool, has_head: bool):
        super().__init__()
        self.config = config
        self.layers = layers
        self.embed = Embedding(config) if has_embed else None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in layers)
        self.head = Head(config) if has_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (B, T) -> (B, T, d_model)
        for block in self.blocks:
            x = block(x)  # (B, T, d_model)
        if self.head is not None:
            x = self.head(x)  # (B, T, vocab)
        return x

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every token of the microbatch (last stage only)."""
        if self.head is None:
            raise RuntimeError("loss() needs the head: only the last stage computes it")
        logits = self(x)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def full_name(self, local_name: str) -> str:
        """Maps a parameter name of this stage to its name in the whole model.

        `blocks.0.attn.qkv.weight` of a stage starting at block 3 is `blocks.3.attn.qkv.weight`;
        `embed.*` and `head.*` names are the same in both.
        """
        if local_name.startswith("blocks."):
            _, index, rest = local_name.split(".", 2)
            return f"blocks.{self.layers[int(index)]}.{rest}"
        return local_name

    def init_parameters(self, seed: int) -> None:
        """Initializes every parameter as the same-named parameter of the whole `GPT`."""
        if self.embed is not None:
            init_parameters(self.embed, seed, "embed.")
        for layer, block in zip(self.layers, self.blocks):
            init_parameters(block, seed, f"blocks.{layer}.")
        if self.head is not None:
            init_parameters(self.head, seed, "head.")


def build_stage(manifest: RunManifest, stage: int) -> StageModule:
    """Builds and initializes stage `stage` of the manifest's cut (float32, on the CPU)."""
    num_stages = _check_stage(manifest, stage)
    layers = partition_layers(manifest.model.n_layers, num_stages)[stage]
    module = StageModule(
        manifest.model, layers, has_embed=stage == 0, has_head=stage == num_stages - 1
    )
    module.init_parameters(manifest.training.seed)
    logger.debug("built stage %d/%d with blocks %s", stage, num_stages, list(layers))
    return module


def build_unit(manifest: RunManifest, unit: int) -> nn.Module:
    """Builds a unit: a pipeline stage, or an expert (units from `num_stages` on)."""
    uid = uid_of(manifest, unit)
    return build_stage(manifest, unit) if uid is None else build_expert(manifest, uid)


def unit_batch_size(manifest: RunManifest, unit: int) -> int:
    """Samples (a stage) or tokens (an expert) a unit's replicas accumulate per optimizer step."""
    return manifest.training.target_batch_size if uid_of(manifest, unit) is None else expert_batch_tokens(manifest)


def unit_input_spec(manifest: RunManifest, unit: int) -> TensorSpec:
    """A stage's input, or an expert's: a flat batch of tokens' activations (N, d_model)."""
    if uid_of(manifest, unit) is None:
        return stage_input_spec(manifest, unit)
    return TensorSpec((max_expert_tokens(manifest), manifest.model.d_model), torch.float32)


def unit_output_spec(manifest: RunManifest, unit: int) -> TensorSpec:
    """A stage's output, or an expert's (the shape of its input)."""
    if uid_of(manifest, unit) is None:
        return stage_output_spec(manifest, unit)
    return unit_input_spec(manifest, unit)


def stage_input_spec(manifest: RunManifest, stage: int) -> TensorSpec:
    """What stage `stage` takes: tokens (B, T) for stage 0, activations (B, T, d_model) after."""
    _check_stage(manifest, stage)
    B, T = manifest.training.microbatch_size, manifest.training.seq_len
    if stage == 0:
        return TensorSpec((B, T), torch.int64)
    return TensorSpec((B, T, manifest.model.d_model), torch.float32)


def stage_output_spec(manifest: RunManifest, stage: int) -> TensorSpec:
    """What stage `stage` returns: logits (B, T, vocab) for the last, (B, T, d_model) before."""
    num_stages = _check_stage(manifest, stage)
    B, T = manifest.training.microbatch_size, manifest.training.seq_len
    width = manifest.model.vocab_size if stage == num_stages - 1 else manifest.model.d_model
    return TensorSpec((B, T, width), torch.float32)


def target_spec(manifest: RunManifest) -> TensorSpec:
    """The next-token targets the last stage's loss takes: int64 (B, T)."""
    return TensorSpec((manifest.training.microbatch_size, manifest.training.seq_len), torch.int64)


def _check_stage(manifest: RunManifest, stage: int) -> int:
    num_stages = manifest.training.num_stages
    if not 0 <= stage < num_stages:
        raise ConfigError(f"stage {stage} outside 0..{num_stages - 1}")
    return num_stages
