"""Cutting the model into stages: balance, exact reproduction of the whole model, specs."""

from __future__ import annotations

import pytest
import torch

from swarmnet.config import ModelConfig, RunManifest, TrainingConfig
from swarmnet.errors import ConfigError
from swarmnet.models.gpt import GPT, init_parameters
from swarmnet.models.partition import (
    TensorSpec,
    build_stage,
    partition_layers,
    stage_input_spec,
    stage_output_spec,
    target_spec,
)

pytestmark = pytest.mark.timeout(30)

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=16)


def _manifest(num_stages: int, seed: int = 3) -> RunManifest:
    training = TrainingConfig(
        num_stages=num_stages, microbatch_size=2, seq_len=8, target_batch_size=4, seed=seed
    )
    return RunManifest(name="test", model=MODEL, training=training)


def test_partition_is_contiguous_and_balanced():
    for n_layers in range(0, 9):
        for num_stages in range(1, n_layers + 2):
            ranges = partition_layers(n_layers, num_stages)
            assert len(ranges) == num_stages
            assert [i for r in ranges for i in r] == list(range(n_layers))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1
            # The last stage (which carries the head) never holds more blocks than any other.
            assert sizes[-1] == min(sizes)


def test_partition_examples():
    assert partition_layers(4, 1) == [range(0, 4)]
    assert partition_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert partition_layers(4, 3) == [range(0, 1), range(1, 3), range(3, 4)]
    assert partition_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert partition_layers(4, 5) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 4)]


@pytest.mark.parametrize("num_stages", [0, -1, 6])
def test_partition_rejects_invalid_counts(num_stages):
    with pytest.raises(ConfigError):
        partition_layers(4, num_stages)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_stages_compose_to_the_whole_model_exactly(num_stages):
    manifest = _manifest(num_stages)
    gpt = GPT(MODEL)
    init_parameters(gpt, manifest.training.seed)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    x = tokens
    with torch.no_grad():
        for stage in range(num_stages):
            x = build_stage(manifest, stage)(x)
        expected = gpt(tokens)
    assert torch.equal(x, expected)


def test_stage_parameters_match_whole_model_by_full_name():
    manifest = _manifest(3)
    gpt = GPT(MODEL)
    init_parameters(gpt, manifest.training.seed)
    seen = set()
    for stage in range(3):
        module = build_stage(manifest, stage)
        for local, param in module.named_parameters():
            full = module.full_name(local)
            assert torch.equal(param, gpt.get_parameter(full)), full
            seen.add(full)
    assert seen == set(dict(gpt.named_parameters()))


def test_full_name_mapping():
    module = build_stage(_manifest(3), 2)  # blocks 3..3 and the head
    assert module.embed is None and module.head is not None
    assert module.full_name("blocks.0.attn.qkv.weight") == "blocks.3.attn.qkv.weight"
    assert module.full_name("head.proj.weight") == "head.proj.weight"
    first = build_stage(_manifest(3), 0)
    assert first.full_name("embed.tok.weight") == "embed.tok.weight"
    assert first.full_name("blocks.0.mlp.fc.bias") == "blocks.0.mlp.fc.bias"


def test_loss_on_last_stage_only():
    manifest = _manifest(2)
    last = build_stage(manifest, 1)
    x = torch.randn(2, 8, 32)
    targets = torch.randint(0, 256, (2, 8))
    loss = last.loss(x, targets)
    assert loss.ndim == 0
    expected = torch.nn.functional.cross_entropy(last(x).reshape(-1, 256), targets.reshape(-1))
    assert torch.equal(loss, expected)
    with pytest.raises(RuntimeError):
        build_stage(manifest, 0).loss(torch.zeros(2, 8, dtype=torch.int64), targets)


def test_build_stage_rejects_bad_index():
    with pytest.raises(ConfigError):
        build_stage(_manifest(2), 2)
    with pytest.raises(ConfigError):
        stage_input_spec(_manifest(2), -1)


def test_specs():
    manifest = _manifest(3)
    assert stage_input_spec(manifest, 0) == TensorSpec((2, 8), torch.int64)
    assert stage_input_spec(manifest, 1) == TensorSpec((2, 8, 32), torch.float32)
    assert stage_output_spec(manifest, 1) == TensorSpec((2, 8, 32), torch.float32)
    assert stage_output_spec(manifest, 2) == TensorSpec((2, 8, 256), torch.float32)
    assert target_spec(manifest) == TensorSpec((2, 8), torch.int64)
    # Each stage's output spec is the next stage's input spec.
    for stage in range(2):
        assert stage_output_spec(manifest, stage) == stage_input_spec(manifest, stage + 1)


def test_spec_matches():
    spec = TensorSpec((2, 8, 32), torch.float32)
    assert spec.matches(torch.zeros(2, 8, 32)) is None
    assert spec.matches(torch.zeros(1, 8, 32)) is None
    assert "dtype" in spec.matches(torch.zeros(2, 8, 32, dtype=torch.float64))
    assert spec.matches(torch.zeros(2, 8)) is not None
    assert spec.matches(torch.zeros(2, 8, 33)) is not None
    assert spec.matches(torch.zeros(2, 7, 32)) is not None
    assert "batch" in spec.matches(torch.zeros(3, 8, 32))
    assert "batch" in spec.matches(torch.zeros(0, 8, 32))
    assert spec.matches([1, 2, 3]) is not None
