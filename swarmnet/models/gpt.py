"""A small decoder-only transformer (GPT-style), written to be read top to bottom.

Pre-LayerNorm blocks, causal self-attention, a GELU MLP, learned token and position embeddings,
a final LayerNorm and a linear head. No weight tying (the embedding and the head may live on
different pipeline stages) and no dropout (every peer of a stage must compute the same function).

How the model is cut into pipeline stages lives apart, in `swarmnet.models.partition`; `GPT`
itself is the uncut reference model used by tests. Parameter names of the whole model are stable:
`embed.tok.weight`, `embed.pos.weight`, `blocks.{i}.attn.qkv.weight`, ..., `head.norm.weight`,
`head.proj.weight`. `init_parameters` seeds every parameter from its full name, so a stage holds
exactly the values the same parameters have in the whole model, however the model is cut.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from swarmnet.config import ModelConfig

logger = logging.getLogger(__name__)

INIT_STD = 0.02
"""Standard deviation of linear and embedding weights at initialization."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        # The output projection adds to the residual stream: scale its init with depth.
        self.proj.init_std = INIT_STD / math.sqrt(2 * config.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, d_model)
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_heads
        q = q.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: d_model -> d_ff -> d_model with a GELU between."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.proj.init_std = INIT_STD / math.sqrt(2 * config.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))  # (B, T, d_ff)
        return self.proj(h)  # (B, T, d_model)


class Block(nn.Module):
    """One transformer block: pre-norm attention and pre-norm MLP, each added to the residual.

    Block `layer` listed in `config.moe.layers` has a Mixture-of-Experts layer (a gate and remote
    experts, `swarmnet.models.moe`) in place of its MLP."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        if config.moe is not None and layer in config.moe.layers:
            from swarmnet.models.moe import MoELayer  # moe builds on this module

            self.mlp = MoELayer(config, layer)
        else:
            self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, d_model)
        x = x + self.mlp(self.norm2(x))  # (B, T, d_model)
        return x


class Embedding(nn.Module):
    """Token embedding plus learned position embedding: tokens (B, T) -> (B, T, d_model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_seq_len, config.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.max_seq_len}")
        positions = torch.arange(T, device=tokens.device)  # (T,)
        return self.tok(tokens) + self.pos(positions)  # (B, T, d_model)


class Head(nn.Module):
    """Final LayerNorm and the linear language-model head: (B, T, d_model) -> (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))  # (B, T, vocab)


class GPT(nn.Module):
    """The whole, uncut model: the reference that pipeline stages must reproduce exactly."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.head = Head(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)  # (B, T, d_model)
        return self.head(x)  # (B, T, vocab)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Initializes every parameter of `module` deterministically from `seed` and its full name.

    `prefix` is the dotted path of `module` inside the whole model (e.g. `"blocks.3."`), so that a
    parameter gets the same values whether it is initialized as part of `GPT` or of any stage.
    Linear and embedding weights are normal(0, 0.02), residual output projections scaled by
    1/sqrt(2 * n_layers); biases are zeros, LayerNorm weights ones. Values are drawn on the CPU in
    float32 and then copied, so they do not depend on the device either.
    """
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            full_name = prefix + (f"{module_name}.{param_name}" if module_name else param_name)
            if isinstance(sub, nn.LayerNorm):
                values = torch.ones if param_name == "weight" else torch.zeros
                param.copy_(values(param.shape))
            elif param_name == "bias":
                param.zero_()
            elif isinstance(sub, (nn.Linear, nn.Embedding)):
                std = getattr(sub, "init_std", INIT_STD)
                generator = torch.Generator().manual_seed(_name_seed(seed, full_name))
                param.copy_(torch.normal(0.0, std, size=tuple(param.shape), generator=generator))
            else:
                raise TypeError(f"no initialization rule for {full_name} ({type(sub).__name__})")


def _name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from (seed, name); unlike `hash()` it is equal in every process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
