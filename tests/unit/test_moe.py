"""Mixture-of-Experts layers without sockets: uids and units, routing, gradients, record/replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmnet.config import ModelConfig, MoEConfig, RunManifest, TrainingConfig
from swarmnet.errors import ConfigError
from swarmnet.models.moe import (
    ExpertAnswers,
    LocalExperts,
    NoExperts,
    Routes,
    attach_experts,
    expert_batch_tokens,
    expert_capacity,
    expert_uid,
    expert_uids,
    gate_weights,
    layer_prefix,
    load_balancing_loss,
    parse_uid,
    plan_routes,
    uid_of,
    unit_of,
)
from swarmnet.models.partition import build_stage, build_unit, unit_batch_size, unit_input_spec
from swarmnet.peer.compute import StageComputer

pytestmark = pytest.mark.timeout(60)

MOE = MoEConfig(layers=(1,), num_experts=4, top_k=2, d_expert=16, capacity_factor=4.0)
MODEL = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=MOE)


def _manifest(num_stages: int = 1, **moe) -> RunManifest:
    model = dataclasses.replace(MODEL, moe=dataclasses.replace(MOE, **moe))
    training = TrainingConfig(num_stages=num_stages, microbatch_size=2, seq_len=8, target_batch_size=4, seed=1)
    return RunManifest(name="moe", model=model, training=training)


# --- configuration, uids, units -----------------------------------------------------------------


def test_manifest_round_trip_and_hash_without_moe_is_unchanged():
    manifest = _manifest()
    assert RunManifest.from_dict(manifest.to_dict()) == manifest
    plain = RunManifest(name="x")
    assert "moe" not in plain.to_dict()["model"]
    assert RunManifest.from_dict({"name": "x", "model": {"moe": {"layers": [0]}}}).model.moe.layers == (0,)


@pytest.mark.parametrize(
    "moe",
    [dict(layers=()), dict(layers=(0, 0)), dict(top_k=5), dict(k_min=3), dict(capacity_factor=0.0), dict(layers=(2,))],
)
def test_bad_moe_configs_are_refused(moe):
    with pytest.raises(ConfigError):
        _manifest(**moe)


def test_uids_units_and_prefixes():
    manifest = _manifest(num_stages=2)
    assert expert_uids(manifest) == [expert_uid(1, i) for i in range(4)] == ["expert.1.0", "expert.1.1", "expert.1.2", "expert.1.3"]
    assert [unit_of(manifest, uid) for uid in expert_uids(manifest)] == [2, 3, 4, 5]
    assert uid_of(manifest, 0) is None and uid_of(manifest, 3) == "expert.1.1"
    assert parse_uid("expert.1.3") == (1, 3)
    assert layer_prefix(1) == "expert.1." and "expert.1.3".startswith(layer_prefix(1))
    for bad in ("expert.1", "ffn.1.2", "expert.1.2.3", "expert.01.2", "", "expert.a.1"):
        with pytest.raises(ConfigError):
            parse_uid(bad)
    with pytest.raises(ConfigError, match="no expert"):
        unit_of(manifest, "expert.0.1")
    with pytest.raises(ConfigError):
        uid_of(manifest, 6)


def test_expert_units_build_and_specs():
    manifest = _manifest(num_stages=2)
    expert = build_unit(manifest, 3)
    again = build_unit(manifest, 3)
    other = build_unit(manifest, 4)
    assert all(torch.equal(a, b) for a, b in zip(expert.parameters(), again.parameters()))
    assert not torch.equal(expert.fc.weight, other.fc.weight)
    assert unit_input_spec(manifest, 3).shape == (16, 16)
    assert unit_batch_size(manifest, 3) == expert_batch_tokens(manifest) == 4 * 8 * 2 // 4
    assert unit_batch_size(manifest, 0) == 4


# --- routing ----------------------------------------------------------------------------------


def test_routes_take_top_k_live_experts_and_respect_capacity():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 5)
    routes = plan_routes(logits, torch.tensor([True, True, True, True]), top_k=2, capacity=3)
    # Expert 0 is everyone's first choice but takes 3 tokens; expert 1 (second choice) takes 3 too.
    assert routes.experts[:, 0].tolist() == [0, 0, 0, -1, -1]
    assert routes.experts[:, 1].tolist() == [1, 1, 1, -1, -1]
    assert routes.top1.tolist() == [0] * 5
    dead = plan_routes(logits, torch.tensor([False, True, False, True]), top_k=2, capacity=5)
    assert dead.experts.tolist() == [[1, 3]] * 5
    one = plan_routes(logits, torch.tensor([False, False, True, False]), top_k=2, capacity=5)
    assert one.experts.tolist() == [[2, -1]] * 5
    none = plan_routes(logits, torch.zeros(4, dtype=torch.bool), top_k=2, capacity=5)
    assert (none.experts == -1).all() and none.used() == []
    assert expert_capacity(MOE, 16) == 16 and expert_capacity(dataclasses.replace(MOE, capacity_factor=1.0), 16) == 8


def test_gate_weights_renormalize_over_answered_experts():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    routes = Routes(experts=torch.tensor([[0, 1], [1, 2]]), alive=torch.ones(3, dtype=torch.bool), top1=torch.tensor([0, 1]))
    both = gate_weights(probs, routes, torch.ones(2, 2, dtype=torch.bool))
    assert torch.allclose(both, torch.tensor([[0.625, 0.375], [2 / 3, 1 / 3]]))
    missing = gate_weights(probs, routes, torch.tensor([[False, True], [False, False]]))
    assert torch.allclose(missing, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_balancing_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((4, 4), 0.25)
    balanced = Routes(experts=torch.zeros(4, 1, dtype=torch.long), alive=torch.ones(4, dtype=torch.bool), top1=torch.arange(4))
    assert float(load_balancing_loss(probs, balanced)) == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    skewed = dataclasses.replace(balanced, top1=torch.zeros(4, dtype=torch.long))
    assert float(load_balancing_loss(skewed_probs, skewed)) == pytest.approx(2.8)


# --- gradients ----------------------------------------------------------------------------------


def _direct_moe_output(layer, experts: LocalExperts, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer written as one differentiable expression (every expert of every token)."""
    B, T, C = x.shape
    tokens = x.reshape(-1, C)
    logits = layer.gate(tokens)
    probs = torch.softmax(logits, dim=1)
    top = logits.detach().topk(layer.moe.top_k, dim=1).indices
    out = torch.zeros_like(tokens)
    chosen = probs.gather(1, top)
    weights = chosen / chosen.sum(1, keepdim=True)
    for slot in range(top.shape[1]):
        for e, expert in enumerate(experts.modules[layer.layer]):
            mask = top[:, slot] == e
            if mask.any():
                out[mask] = out[mask] + weights[mask, slot : slot + 1] * expert(tokens[mask])
    return out.view(B, T, C)


def test_moe_layer_gradients_match_the_direct_computation():
    manifest = _manifest(aux_loss_weight=0.0)
    torch.manual_seed(0)
    stage = build_stage(manifest, 0)
    experts = LocalExperts.build(manifest)
    attach_experts(stage, experts)
    layer = stage.blocks[1].mlp
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    got_x, got_gate = x.grad.clone(), layer.gate.weight.grad.clone()
    got_expert = [e.fc.weight.grad.clone() if e.fc.weight.grad is not None else torch.zeros_like(e.fc.weight) for e in experts.modules[1]]
    for p in list(stage.parameters()) + [p for e in experts.modules[1] for p in e.parameters()]:
        p.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _direct_moe_output(layer, experts, x2)
    assert torch.allclose(y, y2, atol=1e-6)
    y2.backward(grad)
    assert torch.allclose(got_x, x2.grad, atol=1e-6)
    assert torch.allclose(got_gate, layer.gate.weight.grad, atol=1e-6)
    for got, expert in zip(got_expert, experts.modules[1]):
        want = expert.fc.weight.grad if expert.fc.weight.grad is not None else torch.zeros_like(expert.fc.weight)
        assert torch.allclose(got, want, atol=1e-6)


class _CountingExperts(LocalExperts):
    def __init__(self, modules):
        super().__init__(modules)
        self.forwards = self.backwards = 0

    def forward(self, layer, routes, tokens):
        self.forwards += 1
        return super().forward(layer, routes, tokens)

    def backward(self, layer, routes, answers, grad):
        self.backwards += 1
        return super().backward(layer, routes, answers, grad)


def test_a_recorded_forward_is_replayed_by_the_recomputing_backward():
    manifest = _manifest(num_stages=2, layers=(0,))
    module = build_stage(manifest, 0)  # embeddings and MoE block 0
    experts = _CountingExperts(LocalExperts.build(manifest).modules)
    computer = StageComputer(module, manifest.optimizer, target_batch_size=4)
    computer.moe = attach_experts(module, experts)
    reference = StageComputer(build_stage(manifest, 0), manifest.optimizer, target_batch_size=4)
    reference.moe = attach_experts(reference.module, LocalExperts(experts.modules))
    tokens = torch.randint(0, 64, (2, 8))
    output, trace = computer.forward_traced(tokens)
    assert experts.forwards == 1 and len(trace) == 1
    grad = torch.randn_like(output)
    computer.backward(tokens, grad, trace)
    assert (experts.forwards, experts.backwards) == (1, 1)  # replayed: no second expert forward
    assert computer.moe.last_aux_loss is not None and computer.moe.last_aux_loss >= 1.0 - 1e-6
    reference.backward(tokens, grad)  # live pass: same gradients
    for a, b in zip(computer.module.parameters(), reference.module.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_no_reachable_expert_leaves_the_residual_alone():
    manifest = _manifest()
    stage = build_stage(manifest, 0)
    attach_experts(stage, NoExperts(4))
    x = torch.randn(2, 8, 16)
    assert torch.equal(stage.blocks[1].mlp(x), torch.zeros_like(x))


def test_a_missing_expert_answer_renormalizes_the_rest():
    manifest = _manifest(aux_loss_weight=0.0)
    stage = build_stage(manifest, 0)
    local = LocalExperts.build(manifest)

    class Flaky(LocalExperts):
        def forward(self, layer, routes, tokens):
            answers = super().forward(layer, routes, tokens)
            drop = routes.experts == 0
            return ExpertAnswers(
                values=answers.values.masked_fill(drop.unsqueeze(-1), 0.0),
                answered=answers.answered & ~drop,
                handles={e: h for e, h in answers.handles.items() if e != 0},
            )

    attach_experts(stage, Flaky(local.modules))
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = stage.blocks[1].mlp(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert local.modules[1][0].fc.weight.grad is None  # the missing expert learns nothing
