"""Audit verdicts (`swarmnet.trainer.audit`): replicas that agree up to float noise pass, a peer
contradicted by two agreeing replicas is the liar, no majority convicts nobody, and replicas at
different steps are not compared."""

from __future__ import annotations

import random

import torch

from swarmnet.protocols.stage import ForwardResult
from swarmnet.trainer.audit import Auditor, judge, results_agree


def result(output: torch.Tensor | None = None, *, step: int = 3, loss: float | None = None, grad=None):
    return ForwardResult(output=output, grad_input=grad, loss=loss, step=step)


def test_float_noise_agrees_and_corruption_does_not():
    x = torch.randn(4, 8, 16)
    assert results_agree(result(x), result(x + 1e-6 * torch.randn_like(x)))
    assert not results_agree(result(x), result(x * 1.1))
    assert not results_agree(result(x), result(torch.randn_like(x)))
    assert not results_agree(result(x), result(x[:2]))
    assert results_agree(result(x), result(x, step=4)) is None


def test_last_stage_results_compare_loss_and_input_gradient():
    g = torch.randn(4, 8, 16)
    assert results_agree(result(loss=2.5, grad=g), result(loss=2.5 + 1e-7, grad=g.clone()))
    assert not results_agree(result(loss=2.5, grad=g), result(loss=5.0, grad=g))
    assert not results_agree(result(loss=2.5, grad=g), result(loss=2.5, grad=-g))
    assert not results_agree(result(loss=float("nan"), grad=g), result(loss=float("nan"), grad=g))


def test_two_agreeing_replicas_convict_the_third():
    x = torch.randn(2, 4)
    honest = result(x)
    for order in (["a", "b", "liar"], ["liar", "a", "b"], ["a", "liar", "b"]):
        answers = {p: (result(torch.randn(2, 4)) if p == "liar" else honest) for p in order}
        verdict = judge(answers)
        assert verdict.liars == ("liar",) and verdict.accepted != "liar" and verdict.outcome == "liar"


def test_without_a_majority_nobody_is_convicted():
    x = torch.randn(2, 4)
    two = judge({"a": result(x), "b": result(-x)})
    assert two.accepted is None and not two.liars and two.outcome == "no_majority"
    three = judge({"a": result(x), "b": result(-x), "c": result(2 * x)})
    assert three.accepted is None and not three.liars
    assert judge({"a": result(x), "b": result(x)}).accepted == "a"
    incomparable = judge({"a": result(x), "b": result(-x, step=9)})
    assert incomparable.accepted == "a" and incomparable.outcome == "incomparable"


def test_auditor_samples_its_fraction_and_remembers_liars():
    auditor = Auditor(0.25, random.Random(0))
    assert 2000 < sum(auditor.should_audit() for _ in range(10_000)) < 3000
    assert not any(Auditor(0.0, random.Random(0)).should_audit() for _ in range(100))
    auditor.convict("p", 1)
    assert auditor.liars == {"p"}
