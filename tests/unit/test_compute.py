"""`StageComputer`: when it steps, that a step applies the mean gradient over samples, no autograd leaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swarmnet.config import ModelConfig, OptimizerConfig, RunManifest, TrainingConfig
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer

pytestmark = pytest.mark.timeout(30)

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
SGD = OptimizerConfig(name="sgd", lr=1.0)
ADAMW = OptimizerConfig(name="adamw", lr=1e-2)
B, T = 2, 8


def manifest(num_stages: int = 1, optimizer: OptimizerConfig = SGD, target: int = 4) -> RunManifest:
    training = TrainingConfig(
        num_stages=num_stages, microbatch_size=B, seq_len=T, target_batch_size=target, seed=1
    )
    return RunManifest(name="compute", model=MODEL, optimizer=optimizer, training=training)


def computer(m: RunManifest, stage: int = 0, target: int | None = None) -> StageComputer:
    return StageComputer(
        build_stage(m, stage), m.optimizer, target_batch_size=target or m.training.target_batch_size
    )


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, MODEL.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def params(c: StageComputer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in c.module.named_parameters()}


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=atol), name


def assert_params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- when to step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2, 4, 6])
def test_steps_exactly_when_accumulated_samples_reach_the_target(target):
    c = computer(manifest(), target=target)
    before = params(c)
    for i in range(target // B - 1):
        result = c.loss_backward(tokens(B, i), tokens(B, 100 + i))
        assert not result.stepped and c.step == 0
        assert c.accumulated_samples == (i + 1) * B
        assert_params_equal(params(c), before)  # gradients accumulate, parameters wait
        assert all(p.grad is not None for p in c.module.parameters())
    result = c.loss_backward(tokens(B, 50), tokens(B, 150))
    assert result.stepped and c.step == 1
    assert c.accumulated_samples == 0
    assert all(p.grad is None for p in c.module.parameters())
    after = params(c)
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_the_next_batch_starts_from_zero():
    c = computer(manifest(target=4))
    for i in range(4):
        result = c.loss_backward(tokens(B, i), tokens(B, 10 + i))
        assert result.stepped == (i % 2 == 1)
    assert c.step == 2 and c.accumulated_samples == 0


def test_a_microbatch_that_overshoots_the_target_steps_once():
    c = computer(manifest(target=4))
    assert not c.loss_backward(tokens(3, 0), tokens(3, 1)).stepped
    assert c.loss_backward(tokens(3, 2), tokens(3, 3)).stepped
    assert c.step == 1 and c.accumulated_samples == 0


def test_backward_of_a_non_last_stage_counts_samples_too():
    m = manifest(num_stages=2)
    c = computer(m, stage=0)
    x = tokens(B, 0)
    grad = torch.randn(B, T, MODEL.d_model, generator=torch.Generator().manual_seed(0))
    first = c.backward(x, grad)
    assert not first.stepped and first.grad_input is None and first.loss is None  # tokens have no gradient
    second = c.backward(x, grad)
    assert second.stepped and c.step == 1


# --- the step's gradient is the mean over samples ---------------------------------------------------


def manual_sgd_step(m: RunManifest, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD lr=1 step on the whole batch's mean loss, computed by hand."""
    module = build_stage(m, 0)
    logits = module(x)  # (B, T, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    with torch.no_grad():
        return {name: (p - m.optimizer.lr * p.grad).clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("sizes", [[2, 2], [1, 3], [4], [1, 1, 1, 1]], ids=["2+2", "1+3", "4", "1+1+1+1"])
def test_sgd_step_applies_the_mean_gradient_over_samples(sizes):
    m = manifest(target=4)
    x, targets = tokens(4, 0), tokens(4, 1)
    c = computer(m)
    start = 0
    for size in sizes:
        result = c.loss_backward(x[start : start + size], targets[start : start + size])
        start += size
    assert result.stepped and c.step == 1
    assert_params_close(params(c), manual_sgd_step(m, x, targets))


@pytest.mark.parametrize("optimizer", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_two_microbatches_of_two_equal_one_microbatch_of_four(optimizer):
    m = manifest(optimizer=optimizer, target=4)
    x, targets = tokens(4, 2), tokens(4, 3)
    split, whole = computer(m), computer(m)
    assert_params_equal(params(split), params(whole))
    split.loss_backward(x[:2], targets[:2])
    split.loss_backward(x[2:], targets[2:])
    whole.loss_backward(x, targets)
    assert split.step == whole.step == 1
    # Adam's first step is about lr * sign(g): a gradient that is ~0 up to float rounding (the key
    # projection's, softmax is shift-invariant) can move by a small fraction of lr either way.
    assert_params_close(params(split), params(whole), atol=1e-6 if optimizer is SGD else 1e-3 * optimizer.lr)


def test_split_pipeline_matches_one_stage():
    """Stage 0 backward with the grad_input of stage 1 accumulates the same gradients as one stage."""
    m1, m2 = manifest(num_stages=1), manifest(num_stages=2)
    x, targets = tokens(4, 4), tokens(4, 5)
    whole = computer(m1)
    first, last = computer(m2, 0), computer(m2, 1)
    for half in (slice(0, 2), slice(2, 4)):
        whole.loss_backward(x[half], targets[half])
        hidden = first.forward(x[half])
        result = last.loss_backward(hidden, targets[half])
        assert result.grad_input is not None and result.grad_input.shape == hidden.shape
        first.backward(x[half], result.grad_input)
    assert whole.step == first.step == last.step == 1
    merged = {
        stage.module.full_name(name): value
        for stage in (first, last)
        for name, value in params(stage).items()
    }
    assert_params_close(params(whole), merged)


def test_loss_backward_reports_the_microbatch_mean_loss():
    c = computer(manifest(target=4))
    x, targets = tokens(B, 6), tokens(B, 7)
    expected = c.evaluate(x, targets)
    result = c.loss_backward(x, targets)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.grad_input is None  # token input


# --- no autograd state outside backward -------------------------------------------------------------


def test_forward_leaves_no_autograd_graph():
    m = manifest(num_stages=3)
    for stage in range(3):
        c = computer(m, stage)
        if stage == 0:
            x = tokens(B, 8)
        else:
            x = torch.randn(B, T, MODEL.d_model, requires_grad=True)
        out = c.forward(x)
        assert not out.requires_grad and out.grad_fn is None
        assert all(p.grad is None for p in c.module.parameters())
        if x.is_floating_point():
            assert x.grad is None
        assert c.accumulated_samples == 0


def test_middle_stage_backward_returns_a_detached_input_gradient():
    m = manifest(num_stages=3)
    c = computer(m, 1)
    x = torch.randn(B, T, MODEL.d_model, requires_grad=True)
    grad = torch.randn(B, T, MODEL.d_model)
    result = c.backward(x, grad)
    assert result.grad_input.shape == x.shape
    assert not result.grad_input.requires_grad and result.grad_input.grad_fn is None
    assert x.grad is None  # the caller's tensor is left alone
    assert bool(torch.isfinite(result.grad_input).all())


def test_evaluate_leaves_no_gradients():
    c = computer(manifest())
    c.evaluate(tokens(B, 0), tokens(B, 1))
    assert all(p.grad is None for p in c.module.parameters())
    assert c.accumulated_samples == 0
