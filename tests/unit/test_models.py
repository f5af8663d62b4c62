"""The reference GPT model and its name-seeded initialization."""

from __future__ import annotations

import math

import pytest
import torch

from swarmnet.config import ModelConfig
from swarmnet.models.gpt import GPT, Block, init_parameters

pytestmark = pytest.mark.timeout(30)

CONFIG = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=16)


def _gpt(seed: int = 0) -> GPT:
    model = GPT(CONFIG)
    init_parameters(model, seed)
    return model


def test_logits_shape_and_finite():
    tokens = torch.randint(0, 256, (2, 10))
    logits = _gpt()(tokens)
    assert logits.shape == (2, 10, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_parameter_names_are_stable():
    names = set(dict(_gpt().named_parameters()))
    expected = {
        "embed.tok.weight",
        "embed.pos.weight",
        "blocks.2.attn.qkv.weight",
        "blocks.2.attn.proj.bias",
        "blocks.0.mlp.fc.weight",
        "blocks.1.norm1.weight",
        "head.norm.weight",
        "head.proj.weight",
    }
    assert expected <= names
    assert not any(name.startswith("blocks.3.") for name in names)


def test_no_weight_tying():
    model = _gpt()
    assert model.embed.tok.weight.data_ptr() != model.head.proj.weight.data_ptr()


def test_causal():
    model = _gpt()
    tokens = torch.randint(0, 256, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 256
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.equal(a[:, 5:], b[:, 5:])


def test_init_is_deterministic_and_seed_dependent():
    a, b, c = _gpt(0).state_dict(), _gpt(0).state_dict(), _gpt(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_init_rules():
    params = dict(_gpt().named_parameters())
    assert torch.equal(params["blocks.0.norm1.weight"], torch.ones(32))
    assert torch.equal(params["head.norm.bias"], torch.zeros(32))
    assert torch.equal(params["blocks.1.mlp.fc.bias"], torch.zeros(64))
    assert abs(params["embed.tok.weight"].std().item() - 0.02) < 0.003
    residual_std = 0.02 / math.sqrt(2 * CONFIG.n_layers)
    assert abs(params["blocks.0.mlp.proj.weight"].std().item() - residual_std) < 0.002
    # Same shape, different names: different values.
    assert not torch.equal(params["blocks.0.attn.qkv.weight"], params["blocks.1.attn.qkv.weight"])


def test_prefix_reproduces_whole_model_parameters():
    model = _gpt(seed=7)
    block = Block(CONFIG)
    init_parameters(block, 7, prefix="blocks.2.")
    for name, param in block.named_parameters():
        assert torch.equal(param, model.get_parameter(f"blocks.2.{name}")), name


def test_too_long_sequence_raises():
    with pytest.raises(ValueError, match="max_seq_len"):
        _gpt()(torch.zeros(1, CONFIG.max_seq_len + 1, dtype=torch.int64))
