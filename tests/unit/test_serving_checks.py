"""`StageServing`'s request validation and compute, called directly (no network, no P2P)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from swarmnet.config import ModelConfig, MoEConfig, PeerConfig, RunManifest, TrainingConfig
from swarmnet.errors import BadRequestError, PeerUnavailableError, UnknownMicrobatchError, UnknownRunError
from swarmnet.models.moe import unit_of
from swarmnet.models.partition import build_stage, build_unit, unit_batch_size
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.serving import MAX_MICROBATCH_ID, StageServing
from swarmnet.peer.throughput import ThroughputMeter
from swarmnet.protocols.framing import TensorHeader
from swarmnet.protocols.stage import BackwardRequest, ForwardRequest

pytestmark = pytest.mark.timeout(30)

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
B, T, D, V = 2, 8, 32, 256


def tiny_manifest(num_stages: int = 2) -> RunManifest:
    training = TrainingConfig(num_stages=num_stages, microbatch_size=B, seq_len=T, target_batch_size=4)
    return RunManifest(name="serving", model=MODEL, training=training)


MANIFEST = tiny_manifest()
RUN = MANIFEST.run_id


def make_serving(manifest: RunManifest, stage: int) -> StageServing:
    computer = StageComputer(
        build_stage(manifest, stage),
        manifest.optimizer,
        target_batch_size=manifest.training.target_batch_size,
    )
    return StageServing(manifest, stage, computer, ThroughputMeter(), PeerConfig())


@pytest.fixture
def servings():
    """Builds `StageServing`s on demand and shuts every one of them down."""
    built: list[StageServing] = []

    def build(stage: int, manifest: RunManifest = MANIFEST) -> StageServing:
        serving = make_serving(manifest, stage)
        built.append(serving)
        return serving

    yield build
    for serving in built:
        serving.shutdown()


@pytest.fixture
def first(servings) -> StageServing:
    return servings(0)


@pytest.fixture
def last(servings) -> StageServing:
    return servings(1)


def header(dtype: str, *shape: int, compression: str = "none") -> TensorHeader:
    return TensorHeader(dtype=dtype, shape=list(shape), compression=compression)


TOKENS = header("int64", B, T)
HIDDEN = header("float32", B, T, D)


def forward_request(stage: int = 0, **changes) -> ForwardRequest:
    request = ForwardRequest(
        run_id=RUN,
        microbatch_id="mb-0",
        stage=stage,
        input=TOKENS if stage == 0 else HIDDEN,
        targets=TOKENS if stage == 1 else None,
    )
    return dataclasses.replace(request, **changes)


def backward_request(stage: int = 0, **changes) -> BackwardRequest:
    request = BackwardRequest(run_id=RUN, microbatch_id="mb-0", stage=stage, grad_output=HIDDEN)
    return dataclasses.replace(request, **changes)


def tokens(batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def hidden(batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, T, D, generator=torch.Generator().manual_seed(seed))


def bad_request(call, *args) -> BadRequestError:
    """Runs `call(*args)`, which must raise exactly `BadRequestError` (not a subclass)."""
    with pytest.raises(BadRequestError) as caught:
        call(*args)
    assert type(caught.value) is BadRequestError
    return caught.value


# --- header checks: forward -------------------------------------------------------------------------


def test_valid_forward_requests_pass(first, last):
    first.check_forward(forward_request(0))
    first.check_forward(forward_request(0, input=header("int64", 1, T)))
    first.check_forward(forward_request(0, microbatch_id="x" * MAX_MICROBATCH_ID))
    last.check_forward(forward_request(1))
    one = header("float32", 1, T, D, compression="fp16")
    last.check_forward(forward_request(1, input=one, targets=header("int64", 1, T)))
    last.check_forward(forward_request(1, reply_compression="fp16"))


def test_another_run_is_unknown(first, last):
    with pytest.raises(UnknownRunError):
        first.check_forward(forward_request(0, run_id="0123456789abcdef"))
    with pytest.raises(UnknownRunError):
        last.check_forward(forward_request(1, run_id=""))
    other_run = tiny_manifest(num_stages=3).run_id
    with pytest.raises(UnknownRunError):
        first.check_backward(backward_request(0, run_id=other_run))


def test_wrong_stage_is_retryable_elsewhere(first, last):
    # A peer that moved still has a record under its old stage for a while: not the caller's fault.
    for check, request in (
        (first.check_forward, dataclasses.replace(forward_request(0), stage=1)),
        (first.check_forward, dataclasses.replace(forward_request(0), stage=-1)),
        (last.check_forward, dataclasses.replace(forward_request(1), stage=0)),
        (first.check_backward, dataclasses.replace(backward_request(0), stage=1)),
    ):
        with pytest.raises(PeerUnavailableError) as info:
            check(request)
        assert info.value.retryable


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_wrong_input_dtype_on_the_first_stage(first, dtype):
    bad_request(first.check_forward, forward_request(0, input=header(dtype, B, T)))


@pytest.mark.parametrize("dtype", ["int64", "float16", "bfloat16"])
def test_wrong_input_dtype_on_the_last_stage(last, dtype):
    bad_request(last.check_forward, forward_request(1, input=header(dtype, B, T, D)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_wrong_targets_dtype(last, dtype):
    bad_request(last.check_forward, forward_request(1, targets=header(dtype, B, T)))


@pytest.mark.parametrize(
    ("stage", "shape"),
    [
        (0, (B, T + 1)),
        (0, (B, T - 1)),
        (0, (B, T, 1)),
        (0, (B * T,)),
        (0, ()),
        (1, (B, T, D - 1)),
        (1, (B, T + 1, D)),
        (1, (B, T, D, 1)),
        (1, (B, T * D)),
        (1, (B, T, V)),
    ],
)
def test_wrong_input_shape(first, last, stage, shape):
    serving = first if stage == 0 else last
    dtype = "int64" if stage == 0 else "float32"
    bad_request(serving.check_forward, forward_request(stage, input=header(dtype, *shape)))


@pytest.mark.parametrize("batch", [0, B + 1, 1000, -1])
def test_input_batch_outside_one_to_microbatch_size(first, last, batch):
    bad_request(first.check_forward, forward_request(0, input=header("int64", batch, T)))
    bad_request(
        last.check_forward,
        forward_request(1, input=header("float32", batch, T, D), targets=header("int64", batch, T)),
    )


def test_wrong_targets_shape(last):
    bad_request(last.check_forward, forward_request(1, targets=header("int64", B, T + 1)))
    bad_request(last.check_forward, forward_request(1, targets=header("int64", B, T, 1)))
    bad_request(last.check_forward, forward_request(1, targets=header("int64", B + 1, T)))


def test_targets_batch_must_match_the_input(last):
    bad_request(last.check_forward, forward_request(1, targets=header("int64", 1, T)))


def test_targets_only_on_the_last_stage(first, last):
    bad_request(first.check_forward, forward_request(0, targets=TOKENS))
    bad_request(last.check_forward, forward_request(1, targets=None))


def test_targets_to_a_middle_stage_are_refused(servings):
    middle = servings(1, tiny_manifest(num_stages=3))
    request = ForwardRequest(
        run_id=middle.run_id, microbatch_id="m", stage=1, input=HIDDEN, targets=TOKENS
    )
    bad_request(middle.check_forward, request)
    middle.check_forward(dataclasses.replace(request, targets=None))


@pytest.mark.parametrize("microbatch_id", ["", "x" * (MAX_MICROBATCH_ID + 1), "x" * 10_000])
def test_microbatch_id_length(first, last, microbatch_id):
    bad_request(first.check_forward, forward_request(0, microbatch_id=microbatch_id))
    bad_request(last.check_forward, forward_request(1, microbatch_id=microbatch_id))
    bad_request(first.check_backward, backward_request(0, microbatch_id=microbatch_id))


def test_unknown_compressions(first):
    bad_request(first.check_forward, forward_request(0, reply_compression="zstd"))
    bad_request(first.check_forward, forward_request(0, input=header("int64", B, T, compression="gzip")))
    bad_request(first.check_backward, backward_request(0, reply_compression="int4"))
    odd = header("float32", B, T, D, compression="x")
    bad_request(first.check_backward, backward_request(0, grad_output=odd))


# --- header checks: backward ------------------------------------------------------------------------


def test_valid_backward_requests_pass(first):
    first.check_backward(backward_request(0))
    first.check_backward(backward_request(0, grad_output=header("float32", 1, T, D, compression="fp16")))
    first.check_backward(backward_request(0, grad_output=header("float32", 1, T, D, compression="int8")))


def test_backward_to_the_last_stage_is_refused(last):
    error = bad_request(last.check_backward, backward_request(1))
    assert "last stage" in str(error)


@pytest.mark.parametrize(
    "grad_output",
    [
        header("int64", B, T, D),
        header("float16", B, T, D),
        header("float32", B, T, V),  # the last stage's output shape, not stage 0's
        header("float32", B, T),
        header("float32", 0, T, D),
        header("float32", B + 1, T, D),
    ],
    ids=["int64", "float16", "vocab-width", "2d", "batch-0", "batch-too-large"],
)
def test_wrong_grad_output(first, grad_output):
    bad_request(first.check_backward, backward_request(0, grad_output=grad_output))


# --- value checks and compute -----------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(last, bad):
    x = hidden()
    x[1, 3, 7] = bad
    error = bad_request(run, last.forward("client", forward_request(1), x, tokens()))
    assert "NaN or Inf" in str(error)
    assert last.computer.accumulated_samples == 0


@pytest.mark.parametrize("bad", [V, V + 1000, -1])
def test_token_ids_out_of_range_are_refused(first, bad):
    x = tokens()
    x[0, 5] = bad
    bad_request(run, first.forward("client", forward_request(0), x, None))
    assert len(first.cache) == 0


@pytest.mark.parametrize("bad", [V, -1])
def test_target_ids_out_of_range_are_refused(last, bad):
    targets = tokens()
    targets[1, 0] = bad
    bad_request(run, last.forward("client", forward_request(1), hidden(), targets))
    assert last.computer.accumulated_samples == 0


def test_non_finite_grad_output_is_refused(first):
    run(first.forward("client", forward_request(0), tokens(), None))
    grad = hidden()
    grad[0, 0, 0] = float("nan")
    bad_request(run, first.backward("client", backward_request(0), grad))


def test_backward_without_a_forward_is_an_unknown_microbatch(first):
    with pytest.raises(UnknownMicrobatchError):
        run(first.backward("client", backward_request(0), hidden()))


def test_backward_needs_a_forward_from_the_same_client_and_microbatch(first):
    run(first.forward("alice", forward_request(0, microbatch_id="mb-1"), tokens(), None))
    with pytest.raises(UnknownMicrobatchError):
        run(first.backward("bob", backward_request(0, microbatch_id="mb-1"), hidden()))
    with pytest.raises(UnknownMicrobatchError):
        run(first.backward("alice", backward_request(0, microbatch_id="mb-2"), hidden()))


def test_backward_grad_batch_must_match_the_forward_input(first):
    run(first.forward("client", forward_request(0), tokens(batch=2), None))
    bad_request(run, first.backward("client", backward_request(0), hidden(batch=1)))


def test_first_stage_forward_then_backward(first):
    x = tokens()
    result = run(first.forward("client", forward_request(0), x, None))
    assert result.output.shape == (B, T, D) and result.output.dtype == torch.float32
    assert not result.output.requires_grad
    assert result.grad_input is None and result.loss is None and result.step == 0
    assert len(first.cache) == 1
    grad_input, step = run(first.backward("client", backward_request(0), hidden()))
    assert grad_input is None  # token inputs have no gradient
    assert step == 0 and first.computer.accumulated_samples == B
    assert len(first.cache) == 0
    with pytest.raises(UnknownMicrobatchError):  # the cached input is used once
        run(first.backward("client", backward_request(0), hidden()))


def test_middle_stage_forward_then_backward_returns_the_input_gradient(servings):
    manifest = tiny_manifest(num_stages=3)
    middle = servings(1, manifest)
    request = ForwardRequest(run_id=manifest.run_id, microbatch_id="m", stage=1, input=HIDDEN)
    x = hidden(seed=1)
    middle.check_forward(request)
    result = run(middle.forward("client", request, x, None))
    assert result.output.shape == (B, T, D) and result.grad_input is None
    backward = BackwardRequest(run_id=manifest.run_id, microbatch_id="m", stage=1, grad_output=HIDDEN)
    middle.check_backward(backward)
    grad_input, step = run(middle.backward("client", backward, hidden(seed=2)))
    assert grad_input.shape == x.shape and grad_input.dtype == torch.float32
    assert bool(torch.isfinite(grad_input).all()) and bool(grad_input.abs().sum() > 0)
    assert step == 0


def test_last_stage_forward_computes_loss_and_input_gradient(last):
    x = hidden(seed=3)
    result = run(last.forward("client", forward_request(1), x, tokens(seed=4)))
    assert result.output is None
    assert result.grad_input.shape == x.shape and bool(torch.isfinite(result.grad_input).all())
    assert result.loss is not None and 0 < result.loss < 10
    assert result.step == 0
    assert len(last.cache) == 0  # nothing to keep for a backward


def test_serving_steps_after_target_batch_size_samples(first):
    async def one(i: int) -> int:
        request = forward_request(0, microbatch_id=f"mb-{i}")
        await first.forward("client", request, tokens(seed=i), None)
        _, step = await first.backward("client", backward_request(0, microbatch_id=f"mb-{i}"), hidden(seed=i))
        return step

    steps = run(_sequence(one, 4))
    assert steps == [0, 1, 1, 2]  # target 4 = two microbatches of 2


async def _sequence(fn, n: int) -> list:
    return [await fn(i) for i in range(n)]


# --- experts ----------------------------------------------------------------------------------------


def test_an_expert_unit_validates_and_computes_token_batches():
    moe = MoEConfig(layers=(1,), num_experts=2, top_k=1, d_expert=16, expert_batch_tokens=24)
    manifest = dataclasses.replace(MANIFEST, model=dataclasses.replace(MODEL, moe=moe))
    unit = unit_of(manifest, "expert.1.1")
    computer = StageComputer(build_unit(manifest, unit), manifest.optimizer, target_batch_size=unit_batch_size(manifest, unit))
    serving = StageServing(manifest, unit, computer, ThroughputMeter(), PeerConfig())
    try:
        def request(*shape, dtype="float32", stage=unit):
            return ForwardRequest(run_id=manifest.run_id, microbatch_id="e", stage=stage, input=header(dtype, *shape))

        serving.check_forward(request(5, D))
        serving.check_forward(request(B * T, D))
        for bad in (request(B * T + 1, D), request(5, D + 1), request(B, T, D), request(5, D, dtype="float16")):
            bad_request(serving.check_forward, bad)
        with pytest.raises(PeerUnavailableError):
            serving.check_forward(request(5, D, stage=0))
        x = torch.randn(12, D)
        with pytest.raises(BadRequestError):
            run(serving.forward("gate", request(12, D), torch.full((12, D), float("nan")), None))
        result = run(serving.forward("gate", request(12, D), x, None))
        assert result.output.shape == (12, D) and result.grad_input is None
        backward = BackwardRequest(run_id=manifest.run_id, microbatch_id="e", stage=unit, grad_output=header("float32", 12, D))
        serving.check_backward(backward)
        grad_input, step = run(serving.backward("gate", backward, torch.randn(12, D)))
        assert grad_input.shape == (12, D) and step == 0
        run(serving.forward("gate", request(12, D), x, None))
        run(serving.backward("gate", backward, torch.randn(12, D)))
        assert computer.step == 1  # 24 tokens: the expert's batch
    finally:
        serving.shutdown()
