"""State snapshots: deterministic digests, exact round trips, bit-identical training after a load,
and refusal of anything tampered with or built for another model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmnet.averaging.state import (
    StateSnapshot,
    StateSyncError,
    TensorEntry,
    check_entries,
    compute_digest,
    decode_header,
    encode_header,
    load_state,
    snapshot_state,
)
from swarmnet.config import ModelConfig, OptimizerConfig, RunManifest, TrainingConfig
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer

pytestmark = pytest.mark.timeout(60)

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
ADAMW = OptimizerConfig(name="adamw", lr=1e-2)
SGD_MOMENTUM = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
SGD_PLAIN = OptimizerConfig(name="sgd", lr=0.1)
B, T = 2, 8


def manifest(optimizer: OptimizerConfig = ADAMW, seed: int = 1, model: ModelConfig = MODEL) -> RunManifest:
    training = TrainingConfig(num_stages=2, microbatch_size=B, seq_len=T, target_batch_size=B, seed=seed)
    return RunManifest(name="state", model=model, optimizer=optimizer, training=training)


def computer(m: RunManifest, stage: int = 1) -> StageComputer:
    return StageComputer(build_stage(m, stage), m.optimizer, target_batch_size=m.training.target_batch_size)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, MODEL.d_model, generator=g)
    return x, torch.randint(0, MODEL.vocab_size, (B, T), generator=g)


def train(c: StageComputer, steps: int, first_seed: int = 0) -> None:
    for i in range(steps):
        assert c.loss_backward(*batch(first_seed + i)).stepped


def params(c: StageComputer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in c.module.named_parameters()}


def assert_params_equal(a: StageComputer, b: StageComputer) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# --- determinism ------------------------------------------------------------------------------------


def test_snapshot_is_deterministic():
    c = computer(manifest())
    train(c, 2)
    first, second = snapshot_state(c), snapshot_state(c)
    assert first.digest == second.digest and first.data == second.data and first.entries == second.entries
    assert first.step == 2
    assert first.digest == compute_digest(first.step, first.entries, first.data)


def test_computers_built_from_the_same_manifest_have_the_same_digest():
    m = manifest()
    a, b = computer(m), computer(m)
    assert snapshot_state(a).digest == snapshot_state(b).digest
    train(a, 1)
    train(b, 1)
    assert snapshot_state(a).digest == snapshot_state(b).digest
    other = computer(manifest(seed=2))
    assert snapshot_state(other).digest != snapshot_state(computer(m)).digest


def test_entries_are_parameters_then_optimizer_state_in_canonical_order():
    c = computer(manifest())
    fresh = snapshot_state(c)
    names = [name for name, _ in c.module.named_parameters()]
    assert [e.name for e in fresh.entries] == names  # no optimizer state before the first step
    train(c, 1)
    entries = [e.name for e in snapshot_state(c).entries]
    expected_opt = [f"opt.{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq", "step")]
    assert entries == names + expected_opt
    step_entry = next(e for e in snapshot_state(c).entries if e.name.endswith(".step"))
    assert step_entry.shape == [] and step_entry.dtype == "float32"


def test_header_round_trip():
    c = computer(manifest())
    train(c, 1)
    snap = snapshot_state(c)
    assert decode_header(encode_header(snap.step, snap.entries)) == (snap.step, snap.entries)
    for garbage in (b"", b"\xc1", encode_header(1, [])[:-1], b"\x93\xa1x\x01\x90"):
        with pytest.raises(StateSyncError):
            decode_header(garbage)
    with pytest.raises(StateSyncError):
        decode_header(encode_header(1, [TensorEntry("w", "float64", [2])]))
    with pytest.raises(StateSyncError):
        decode_header(encode_header(1, [TensorEntry("w", "float32", [-1])]))
    with pytest.raises(StateSyncError):
        decode_header(encode_header(1, [TensorEntry("w", "float32", [1]), TensorEntry("w", "float32", [1])]))


# --- round trip and continuation ---------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [ADAMW, SGD_MOMENTUM, SGD_PLAIN], ids=["adamw", "sgd-momentum", "sgd"])
def test_loaded_computer_continues_bit_identically(optimizer):
    source = computer(manifest(optimizer))
    train(source, 3)
    target = computer(manifest(optimizer, seed=7))  # different initial parameters
    snap = snapshot_state(source)
    load_state(target, snap)
    assert target.step == source.step == 3
    assert_params_equal(source, target)
    assert snapshot_state(target).digest == snap.digest
    for i in range(3):  # same gradients → the same parameters, bit for bit, step after step
        train(source, 1, first_seed=100 + i)
        train(target, 1, first_seed=100 + i)
        assert_params_equal(source, target)
    assert snapshot_state(target).digest == snapshot_state(source).digest


def test_without_the_optimizer_state_adamw_would_diverge():
    source = computer(manifest())
    train(source, 3)
    params_only = computer(manifest(seed=7))
    with torch.no_grad():
        for (_, p), (_, q) in zip(params_only.module.named_parameters(), source.module.named_parameters()):
            p.copy_(q)
    train(source, 1, first_seed=100)
    train(params_only, 1, first_seed=100)
    assert any(not torch.equal(a, b) for a, b in zip(params(source).values(), params(params_only).values()))


def test_load_clears_accumulated_gradients():
    source = computer(manifest())
    train(source, 1)
    target = computer(manifest())
    target.target_batch_size = 4 * B
    assert not target.loss_backward(*batch(5)).stepped
    assert target.accumulated_samples == B
    load_state(target, snapshot_state(source))
    assert target.accumulated_samples == 0
    assert all(p.grad is None for p in target.module.parameters())


def test_load_of_a_fresh_state_clears_the_optimizer_state():
    trained = computer(manifest())
    train(trained, 2)
    load_state(trained, snapshot_state(computer(manifest())))
    assert trained.step == 0
    assert all(not s for s in trained.optimizer.state.values())
    assert_params_equal(trained, computer(manifest()))


def test_snapshot_data_is_read_only():
    snap = snapshot_state(computer(manifest()))
    with pytest.raises(TypeError):
        snap.data[0] = 1
    wrapped = StateSnapshot(step=snap.step, entries=snap.entries, data=bytes(snap.data), digest=snap.digest)
    assert wrapped == snap


# --- refusals ------------------------------------------------------------------------------------------


def _trained_snapshot(optimizer: OptimizerConfig = ADAMW) -> StateSnapshot:
    c = computer(manifest(optimizer))
    train(c, 1)
    return snapshot_state(c)


def _resealed(snap: StateSnapshot, **changes) -> StateSnapshot:
    """A modified snapshot with a *valid* digest: load_state must refuse it for its content."""
    changed = dataclasses.replace(snap, **changes)
    return dataclasses.replace(changed, digest=compute_digest(changed.step, changed.entries, changed.data))


def test_tampered_data_is_refused_and_nothing_changes():
    snap = _trained_snapshot()
    data = bytearray(snap.data)
    data[100] ^= 0xFF
    target = computer(manifest(seed=7))
    before = params(target)
    with pytest.raises(StateSyncError, match="digest"):
        load_state(target, dataclasses.replace(snap, data=bytes(data)))
    with pytest.raises(StateSyncError, match="digest"):
        load_state(target, dataclasses.replace(snap, step=snap.step + 1))
    assert target.step == 0
    assert all(torch.equal(before[n], p) for n, p in params(target).items())


def test_tampered_entries_are_refused():
    snap = _trained_snapshot()
    entries = list(snap.entries)
    entries[0], entries[1] = entries[1], entries[0]
    with pytest.raises(StateSyncError):
        load_state(computer(manifest()), dataclasses.replace(snap, entries=entries))
    with pytest.raises(StateSyncError):
        load_state(computer(manifest()), _resealed(snap, entries=entries))
    renamed = [dataclasses.replace(e, name=e.name.replace("exp_avg_sq", "bogus")) for e in snap.entries]
    with pytest.raises(StateSyncError):
        load_state(computer(manifest()), _resealed(snap, entries=renamed))
    missing_key = [e for e in snap.entries if not e.name.endswith(".exp_avg_sq")]
    keep = [e.name for e in missing_key]
    with pytest.raises(StateSyncError):
        load_state(computer(manifest()), _resealed(snap, entries=missing_key, data=_subset(snap, keep)))
    with pytest.raises(StateSyncError, match="length"):
        load_state(computer(manifest()), _resealed(snap, data=bytes(snap.data)[:-4]))


def test_non_finite_values_are_refused():
    snap = _trained_snapshot()
    data = bytearray(snap.data)
    data[0:4] = torch.tensor([float("nan")]).numpy().tobytes()
    with pytest.raises(StateSyncError, match="non-finite"):
        load_state(computer(manifest()), _resealed(snap, data=bytes(data)))


def test_state_of_another_model_is_refused():
    snap = _trained_snapshot()
    wider = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    with pytest.raises(StateSyncError):
        load_state(computer(manifest(model=wider)), snap)
    with pytest.raises(StateSyncError):
        load_state(computer(manifest(), stage=0), snap)  # another stage of the same model
    with pytest.raises(StateSyncError):
        load_state(computer(manifest(SGD_MOMENTUM)), snap)  # Adam state into SGD
    with pytest.raises(StateSyncError):
        load_state(computer(manifest()), _trained_snapshot(SGD_MOMENTUM))  # SGD state into Adam


def test_check_entries_accepts_own_layouts_and_refuses_foreign_ones():
    target = computer(manifest())
    check_entries(target, snapshot_state(computer(manifest())).entries)  # fresh: parameters only
    check_entries(target, _trained_snapshot().entries)
    with pytest.raises(StateSyncError):
        check_entries(target, _trained_snapshot(SGD_MOMENTUM).entries)
    with pytest.raises(StateSyncError):
        check_entries(computer(manifest(), stage=0), _trained_snapshot().entries)
    with pytest.raises(StateSyncError):
        check_entries(target, [TensorEntry("head.weight", "float64", [1])])


def _subset(snap: StateSnapshot, names: list[str]) -> bytes:
    out, offset = [], 0
    for entry in snap.entries:
        if entry.name in names:
            out.append(bytes(snap.data[offset : offset + entry.nbytes]))
        offset += entry.nbytes
    return b"".join(out)
