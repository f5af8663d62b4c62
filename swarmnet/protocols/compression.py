"""Wire encodings of tensors: pure functions from a tensor to the bytes that travel, and back.

No sockets here: `framing` decides which encoding a link uses and moves the bytes; this module only
says how many bytes a tensor takes (`wire_nbytes`), produces them (`encode`) and reads them back
(`decode`). Three encodings, by name:

- `"none"`: the tensor's own bytes in its own dtype (any dtype). Encoding a contiguous CPU tensor
  is a zero-copy view of its memory, and decoding returns a view of the received buffer.
- `"fp16"`: floating-point tensors cast to float16 (2 bytes per element). Values beyond float16's
  range become ±inf, NaN stays NaN.
- `"int8"`: blockwise absmax quantization of floating-point tensors. The flattened tensor is cut
  into blocks of `BLOCK` consecutive elements (the last one zero-padded); each block keeps a float32
  scale `absmax / 127` and its elements as `round(x / scale)` clamped to [-127, 127] in int8, so the
  error of every element is at most half its block's scale. The bytes on the wire are all the
  scales (float32, native byte order: little-endian on every platform swarmnet runs on) followed by
  the int8 values: 1 + 4/256 bytes per element, about 0.254 of float32's size for large tensors.

Non-finite values are never turned into finite ones: in `"int8"` a block holding a NaN or ±inf gets
a non-finite scale, and *every* element of that block decodes to NaN or ±inf, so a receiver's usual
finiteness check rejects the tensor just as it would have rejected the original. (float32 values
beyond float32's range, e.g. from a float64 input, become ±inf the same way.)

Computation stays on the tensor's device (a GPU tensor is quantized there and only the encoded
bytes move to the CPU); decoding happens on the CPU, where the bytes arrive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

COMPRESSIONS = ("none", "fp16", "int8")
BLOCK = 256
"""Elements per int8 quantization block (each adds a 4-byte float32 scale)."""
_QMAX = 127
_CHUNK_ROWS = 4096
"""Blocks quantized per pass of `_quantize` (a 4 MiB float32 scratch buffer)."""


def _check(dtype: torch.dtype, compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}, expected one of {COMPRESSIONS}")
    if compression != "none" and not dtype.is_floating_point:
        raise ValueError(f"{compression} compression applies to floating-point tensors only, not {dtype}")


def wire_nbytes(numel: int, dtype: torch.dtype, compression: str) -> int:
    """Bytes on the wire for a tensor of `numel` elements of `dtype` encoded with `compression`."""
    _check(dtype, compression)
    if numel < 0:
        raise ValueError(f"negative element count {numel}")
    if compression == "none":
        return numel * dtype.itemsize
    if compression == "fp16":
        return numel * 2
    return _n_blocks(numel) * 4 + numel


def encode(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """The wire bytes of `tensor`: a contiguous 1-D uint8 CPU tensor of exactly `wire_nbytes` bytes.

    With `"none"`, the result shares memory with a contiguous CPU `tensor` (no copy): the caller
    must not modify the tensor until the bytes have been sent."""
    _check(tensor.dtype, compression)
    tensor = tensor.detach()
    if compression == "none":
        return tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if compression == "fp16":
        return tensor.to("cpu", torch.float16).contiguous().reshape(-1).view(torch.uint8)
    return _encode_int8(tensor.reshape(-1).to(torch.float32)).to("cpu")


def decode(data: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, compression: str) -> torch.Tensor:
    """The tensor of logical `shape` and `dtype` that `data` (1-D uint8, as `encode` made it) encodes.

    With `"none"` (and `"fp16"` of a float16 tensor) the result may share memory with `data`."""
    _check(dtype, compression)
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValueError(f"invalid shape {shape}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"expected 1-D uint8 wire bytes, got {data.dtype} of shape {list(data.shape)}")
    numel = math.prod(shape)
    expected = wire_nbytes(numel, dtype, compression)
    if data.numel() != expected:
        raise ValueError(
            f"{data.numel()} wire bytes for a {compression} tensor of shape {shape} and {dtype}, "
            f"expected {expected}"
        )
    data = data.cpu()
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if compression == "int8":
        return _decode_int8(data, numel).reshape(shape).to(dtype)
    wire_dtype = dtype if compression == "none" else torch.float16
    return _aligned(data, wire_dtype.itemsize).view(wire_dtype).reshape(shape).to(dtype)


# --- int8 ------------------------------------------------------------------------------------------


def _n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _encode_int8(flat: torch.Tensor) -> torch.Tensor:
    """`flat`: 1-D float32. Full blocks are quantized in place of a view; only a partial last
    block is copied (zero-padded)."""
    numel = flat.numel()
    n_blocks, n_full = _n_blocks(numel), numel // BLOCK
    out = torch.empty(n_blocks * 4 + numel, dtype=torch.uint8, device=flat.device)
    scales = out[: n_blocks * 4].view(torch.float32)  # (n_blocks,)
    values = out[n_blocks * 4 :].view(torch.int8)  # (numel,)
    if n_full:
        head = n_full * BLOCK
        _quantize(flat[:head].view(n_full, BLOCK), scales[:n_full], values[:head].view(n_full, BLOCK))
    if n_full < n_blocks:
        tail = torch.zeros(1, BLOCK, dtype=torch.float32, device=flat.device)
        tail[0, : numel - n_full * BLOCK] = flat[n_full * BLOCK :]
        q = torch.empty(1, BLOCK, dtype=torch.int8, device=flat.device)
        _quantize(tail, scales[n_full:], q)
        values[n_full * BLOCK :] = q[0, : numel - n_full * BLOCK]
    return out


def _quantize(blocks: torch.Tensor, scales_out: torch.Tensor, values_out: torch.Tensor) -> None:
    """blocks (n, BLOCK) float32 → scales_out (n,) float32 and values_out (n, BLOCK) int8.

    The scales come from two reductions over the whole tensor; the values are computed through a
    small scratch buffer, `_CHUNK_ROWS` blocks at a time, which stays in cache: allocating and
    filling one float32 temporary as large as the tensor made encoding about four times slower."""
    torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_(), out=scales_out)  # absmax; NaN propagates
    scales_out.div_(_QMAX)
    # An all-zero block has scale 0: divide by 1 instead (its values are 0 either way). A block
    # with a non-finite scale decodes to non-finite values whatever its int8 values are.
    divisor = torch.where(scales_out == 0, 1.0, scales_out).unsqueeze(1)
    finite = bool(torch.isfinite(scales_out).all())
    scratch = torch.empty(min(len(blocks), _CHUNK_ROWS), BLOCK, dtype=torch.float32, device=blocks.device)
    for start in range(0, len(blocks), _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, len(blocks))
        q = scratch[: stop - start]
        torch.div(blocks[start:stop], divisor[start:stop], out=q)
        q.round_().clamp_(-_QMAX, _QMAX)
        if not finite:
            q.nan_to_num_(0.0)  # NaN → int8 is undefined behaviour in C++: keep the bytes deterministic
        values_out[start:stop].copy_(q)


def _decode_int8(data: torch.Tensor, numel: int) -> torch.Tensor:
    """1-D float32 of `numel` elements from int8 wire bytes."""
    n_blocks, n_full = _n_blocks(numel), numel // BLOCK
    scales = _aligned(data[: n_blocks * 4], 4).view(torch.float32)
    out = torch.empty(numel, dtype=torch.float32)
    out.copy_(data[n_blocks * 4 :].view(torch.int8))
    head = n_full * BLOCK
    if n_full:
        out[:head].view(n_full, BLOCK).mul_(scales[:n_full].unsqueeze(1))
    if n_full < n_blocks:
        out[head:].mul_(scales[n_full])
    return out


def _aligned(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """`data`, copied if its offset in its storage forbids viewing it as `itemsize`-byte elements."""
    return data if data.storage_offset() % itemsize == 0 else data.clone()


__all__ = ["BLOCK", "COMPRESSIONS", "decode", "encode", "wire_nbytes"]
