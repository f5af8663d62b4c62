"""Wire encodings of tensors (`swarmnet.protocols.compression`): sizes, round trips, the int8 error
bound, non-finite values, and refusals. Pure functions: no sockets."""

from __future__ import annotations

import math

import pytest
import torch

from swarmnet.protocols import compression as compression_module
from swarmnet.protocols.compression import BLOCK, COMPRESSIONS, decode, encode, wire_nbytes

pytestmark = pytest.mark.timeout(30)

SHAPES = [(0,), (2, 0, 3), (1,), (), (BLOCK,), (BLOCK + 1,), (3 * BLOCK - 7,), (4, 5, 33), (2, BLOCK, 3)]


def _randn(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _round_trip(x: torch.Tensor, compression: str) -> torch.Tensor:
    data = encode(x, compression)
    assert data.dtype == torch.uint8 and data.dim() == 1 and data.is_contiguous()
    assert data.device.type == "cpu"
    assert data.numel() == wire_nbytes(x.numel(), x.dtype, compression)
    y = decode(data, x.shape, x.dtype, compression)
    assert y.shape == x.shape and y.dtype == x.dtype
    return y


def _block_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-element scale of its block (absmax / 127), computed independently of the module."""
    flat = x.reshape(-1).float()
    padded = torch.zeros(math.ceil(flat.numel() / BLOCK) * BLOCK)
    padded[: flat.numel()] = flat
    scales = padded.view(-1, BLOCK).abs().amax(dim=1) / 127
    return scales.repeat_interleave(BLOCK)[: flat.numel()].reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_none_and_fp16_round_trips(shape):
    x = _randn(shape)
    assert torch.equal(_round_trip(x, "none"), x)
    assert torch.equal(_round_trip(x, "fp16"), x.half().float())
    tokens = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_round_trip(tokens, "none"), tokens)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_round_trip_within_half_a_step_of_each_block(shape):
    x = _randn(shape) * 3
    x.view(-1)[: x.numel() // 2] *= 100  # blocks of very different magnitudes
    y = _round_trip(x, "int8")
    bound = _block_scales(x) / 2 * (1 + 1e-5) + 1e-30
    assert ((x - y).abs() <= bound).all()


def test_int8_keeps_zero_blocks_and_extremes_exact():
    x = torch.zeros(3 * BLOCK)
    x[BLOCK + 5], x[2 * BLOCK + 9] = -7.5, 1e30  # each block's absmax is one of its levels (±127)
    y = _round_trip(x, "int8")
    assert torch.equal(y[:BLOCK], torch.zeros(BLOCK))
    assert y[BLOCK + 5].item() == pytest.approx(-7.5, rel=1e-6)
    assert y[2 * BLOCK + 9].item() == pytest.approx(1e30, rel=1e-6)
    assert torch.isfinite(y).all()


def test_int8_wire_layout_is_scales_then_values():
    x = torch.arange(BLOCK + 2, dtype=torch.float32) - 100
    data = encode(x, "int8")
    scales = data[:8].view(torch.float32)
    values = data[8:].view(torch.int8)
    assert scales.tolist() == pytest.approx([155 / 127, 157 / 127])
    assert values[0].item() == round(-100 / (155 / 127)) and values[BLOCK - 1].item() == 127
    assert values[BLOCK + 1].item() == 127


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_half_precision_inputs_keep_their_dtype(dtype, compression):
    x = _randn((5, 77), dtype=dtype)
    y = _round_trip(x, compression)
    if compression == "int8":
        assert ((x.float() - y.float()).abs() <= _block_scales(x) / 2 * 1.01 + 1e-2).all()
    elif compression == "fp16" and dtype == torch.bfloat16:
        assert torch.allclose(y.float(), x.float(), rtol=1e-2)
    else:
        assert torch.equal(y, x)


def test_none_is_zero_copy_and_non_contiguous_inputs_are_encoded_in_logical_order():
    x = _randn((8, 16))
    assert encode(x, "none").data_ptr() == x.data_ptr()
    t = x.t()
    for compression in COMPRESSIONS:
        assert encode(t, compression).numel() == wire_nbytes(t.numel(), t.dtype, compression)
    assert torch.equal(decode(encode(t, "none"), t.shape, t.dtype, "none"), t)
    assert torch.equal(encode(t, "int8"), encode(t.contiguous(), "int8"))


def test_decode_accepts_bytes_at_any_offset():
    x = _randn((3, 100))
    for compression in COMPRESSIONS:
        data = encode(x, compression)
        shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), data])[1:]  # storage offset 1
        expected = decode(data, x.shape, x.dtype, compression)
        assert torch.equal(decode(shifted, x.shape, x.dtype, compression), expected)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_non_finite_values_never_decode_to_finite_blocks(bad, compression):
    x = _randn(3 * BLOCK + 10)
    x[BLOCK + 17] = bad
    x[3 * BLOCK + 3] = bad  # the partial last block
    y = _round_trip(x, compression)
    assert not torch.isfinite(y[BLOCK + 17]) and not torch.isfinite(y[3 * BLOCK + 3])
    if compression == "int8":  # the whole block, so no finite garbage slips through
        assert not torch.isfinite(y[BLOCK : 2 * BLOCK]).any()
        assert not torch.isfinite(y[3 * BLOCK :]).any()
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[BLOCK : 2 * BLOCK] = finite[3 * BLOCK :] = False
    assert torch.isfinite(y[finite]).all()  # other blocks are unaffected


def test_int8_encoding_of_nan_is_deterministic():
    x = _randn(2 * BLOCK)
    x[3] = math.nan
    assert torch.equal(encode(x, "int8"), encode(x.clone(), "int8"))


def test_fp16_overflow_becomes_infinite_not_finite_garbage():
    y = _round_trip(torch.tensor([1e6, -1e6, 1.0]), "fp16")
    assert y.tolist() == [math.inf, -math.inf, 1.0]


def test_wire_sizes():
    n = 1 << 20
    assert wire_nbytes(n, torch.float32, "none") == 4 * n
    assert wire_nbytes(n, torch.bfloat16, "none") == 2 * n
    assert wire_nbytes(n, torch.float32, "fp16") == 2 * n
    assert wire_nbytes(n, torch.float32, "int8") == n + 4 * (n // BLOCK)
    ratio = wire_nbytes(n, torch.float32, "int8") / (4 * n)
    assert ratio == pytest.approx(0.254, abs=0.001)  # (1 + 4/256) / 4
    assert wire_nbytes(0, torch.float32, "int8") == 0
    assert wire_nbytes(1, torch.float32, "int8") == 5
    assert wire_nbytes(BLOCK + 1, torch.float16, "int8") == 8 + BLOCK + 1
    assert wire_nbytes(7, torch.int64, "none") == 56


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_lossy_encodings_refuse_integer_tensors(compression):
    tokens = torch.arange(10)
    with pytest.raises(ValueError, match="floating-point"):
        encode(tokens, compression)
    with pytest.raises(ValueError, match="floating-point"):
        wire_nbytes(10, torch.int64, compression)
    with pytest.raises(ValueError, match="floating-point"):
        decode(torch.zeros(20, dtype=torch.uint8), [10], torch.int64, compression)


def test_refusals():
    x = _randn(300)
    with pytest.raises(ValueError, match="unknown compression"):
        encode(x, "zstd")
    with pytest.raises(ValueError, match="unknown compression"):
        wire_nbytes(3, torch.float32, "int4")
    with pytest.raises(ValueError, match="negative"):
        wire_nbytes(-1, torch.float32, "none")
    for compression in COMPRESSIONS:
        data = encode(x, compression)
        with pytest.raises(ValueError, match="expected"):
            decode(data[:-1], x.shape, x.dtype, compression)
        with pytest.raises(ValueError, match="expected"):
            decode(torch.cat([data, data[:1]]), x.shape, x.dtype, compression)
        with pytest.raises(ValueError, match="expected"):
            decode(data, [301], x.dtype, compression)
    with pytest.raises(ValueError, match="1-D uint8"):
        decode(torch.zeros(300, dtype=torch.float32), [300], torch.float32, "none")
    with pytest.raises(ValueError, match="1-D uint8"):
        decode(torch.zeros(2, 600, dtype=torch.uint8), [300], torch.float32, "none")
    with pytest.raises(ValueError, match="invalid shape"):
        decode(torch.zeros(0, dtype=torch.uint8), [-1, 0], torch.float32, "none")


def test_int8_in_several_passes_matches_a_reference_quantizer(monkeypatch):
    """More blocks than one pass of the scratch buffer: the chunked path equals the plain math."""
    monkeypatch.setattr(compression_module, "_CHUNK_ROWS", 3)
    x = _randn(10 * BLOCK + 100, seed=3)
    x[5 * BLOCK : 6 * BLOCK] = 0
    y = decode(encode(x, "int8"), x.shape, x.dtype, "int8")
    padded = torch.cat([x, torch.zeros(-x.numel() % BLOCK)]).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1, keepdim=True) / 127
    q = (padded / torch.where(scales == 0, 1.0, scales)).round().clamp(-127, 127)
    assert torch.equal(y, (q * scales).view(-1)[: x.numel()])
