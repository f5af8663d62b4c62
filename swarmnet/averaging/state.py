"""A stage's full training state as one verifiable byte string, and loading it back.

A `StateSnapshot` holds every parameter of a stage, its optimizer's per-parameter state tensors and
the step counter: a peer joining a stage downloads one from its stage-mates (see
`swarmnet.averaging.sync`) and loads it before it serves. Its layout is fixed by a list of
`TensorEntry` (name, dtype, shape); `data` is the raw bytes of those tensors, concatenated in entry
order; `digest` is the sha256 of a canonical msgpack header (format, step, entries) followed by the
data, so equal digests mean bit-identical state and any corruption or lie about the layout is caught.

Entry order is canonical: the parameters in `module.named_parameters()` order, then for each
parameter in the same order its optimizer state as `opt.<param name>.<key>`, keys sorted. Nothing in
a snapshot is ever unpickled: tensors are rebuilt from raw bytes and validated entries.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from swarmnet.errors import StateSyncError
from swarmnet.peer.compute import StageComputer
from swarmnet.protocols.framing import DTYPE_NAMES, DTYPES

FORMAT = "swarmnet-state/1"
OPT_PREFIX = "opt."
MAX_ENTRIES = 100_000
MAX_NAME_CHARS = 512
MAX_DIMS = 8
_SCALAR_KEYS = frozenset({"step"})
"""Optimizer state keys that are 0-dim tensors; every other key has its parameter's shape and dtype."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a snapshot: its name, dtype (a `framing.DTYPES` name) and shape."""

    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class StateSnapshot:
    """Parameters, optimizer state and step of one stage, as bytes plus their layout and digest."""

    step: int
    entries: list[TensorEntry]
    data: memoryview
    """Read-only bytes of every tensor in entry order (any bytes-like is accepted and wrapped)."""
    digest: str
    """sha256 hex of `encode_header(step, entries) + data`; `load_state` checks it."""

    def __post_init__(self) -> None:
        view = memoryview(self.data)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        object.__setattr__(self, "data", view.toreadonly())

    @property
    def total_bytes(self) -> int:
        return len(self.data)


# --- canonical encoding ------------------------------------------------------------------------


def encode_header(step: int, entries: list[TensorEntry]) -> bytes:
    """The canonical msgpack header that the digest covers (and that the state protocol sends)."""
    layout = [[e.name, e.dtype, list(e.shape)] for e in entries]
    return msgpack.packb([FORMAT, step, layout], use_bin_type=True)


def decode_header(blob: bytes, error: type[Exception] = StateSyncError) -> tuple[int, list[TensorEntry]]:
    """Parses and validates a header from `encode_header`; raises `error` on anything malformed."""
    try:
        decoded = msgpack.unpackb(blob, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise error(f"malformed state header: {e}") from e
    if not (isinstance(decoded, list) and len(decoded) == 3 and decoded[0] == FORMAT):
        raise error(f"state header is not {FORMAT}")
    _, step, raw_entries = decoded
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise error("state header has an invalid step")
    if not isinstance(raw_entries, list) or len(raw_entries) > MAX_ENTRIES:
        raise error("state header has an invalid entry list")
    entries = []
    for raw in raw_entries:
        if not (isinstance(raw, list) and len(raw) == 3):
            raise error("state header has a malformed entry")
        entry = TensorEntry(name=raw[0], dtype=raw[1], shape=raw[2])
        check_entry(entry, error)
        entries.append(entry)
    if len({e.name for e in entries}) != len(entries):
        raise error("state header repeats an entry name")
    return step, entries


def check_entry(entry: TensorEntry, error: type[Exception] = StateSyncError) -> None:
    """Raises `error` unless the entry has a sane name, a known dtype and a valid shape."""
    if not isinstance(entry.name, str) or not 0 < len(entry.name) <= MAX_NAME_CHARS:
        raise error(f"invalid tensor name {entry.name!r:.80}")
    if not isinstance(entry.dtype, str) or entry.dtype not in DTYPES:
        raise error(f"{entry.name}: unsupported dtype {entry.dtype!r:.40}")
    shape = entry.shape
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise error(f"{entry.name}: invalid shape")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise error(f"{entry.name}: invalid shape {shape!r:.80}")


def compute_digest(step: int, entries: list[TensorEntry], data: bytes | memoryview) -> str:
    """sha256 hex of the canonical header and the data (hashlib releases the GIL while hashing)."""
    digest = hashlib.sha256(encode_header(step, entries))
    digest.update(data)
    return digest.hexdigest()


# --- snapshot and load -------------------------------------------------------------------------


def snapshot_state(computer: StageComputer) -> StateSnapshot:
    """Copies `computer`'s parameters, optimizer state and step into a `StateSnapshot`.

    Call it on the thread that owns `computer` (the peer's compute thread), between two operations:
    it reads parameters and optimizer state that a concurrent step would be changing. It copies the
    whole state once (plus hashing it); gradients being accumulated are not part of the state.
    """
    tensors = _state_tensors(computer)
    entries = []
    for name, tensor in tensors:
        if tensor.dtype not in DTYPE_NAMES:
            raise StateSyncError(f"{name}: dtype {tensor.dtype} cannot be synced")
        entries.append(TensorEntry(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape)))
    buffer = bytearray(sum(e.nbytes for e in entries))
    out = np.frombuffer(buffer, dtype=np.uint8)
    offset = 0
    for (_, tensor), entry in zip(tensors, entries):
        if entry.nbytes:
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            out[offset : offset + entry.nbytes] = raw
        offset += entry.nbytes
    step = computer.step
    digest = compute_digest(step, entries, buffer)
    return StateSnapshot(step=step, entries=entries, data=memoryview(buffer), digest=digest)


def check_entries(computer: StageComputer, entries: list[TensorEntry]) -> None:
    """Raises `StateSyncError` unless `entries` is a layout `computer` can load: its parameters
    exactly (names, order, dtypes, shapes), then complete optimizer state in canonical order.

    Reads only parameter shapes and the optimizer's groups, which never change: safe on any thread
    (e.g. to ignore a source announcing a foreign layout before downloading anything from it).
    """
    _layout(computer, entries)


def load_state(computer: StageComputer, snapshot: StateSnapshot) -> None:
    """Replaces `computer`'s parameters, optimizer state and step with the snapshot's.

    Verifies the digest and that the layout matches this computer's parameters and optimizer
    exactly, and that every value is finite, *before* changing anything; raises `StateSyncError`
    otherwise. Afterwards an optimizer step on the same gradients gives bit-identical parameters on
    both computers. Clears accumulated gradients. Call it on the thread that owns `computer`.
    """
    if not isinstance(snapshot.step, int) or isinstance(snapshot.step, bool) or snapshot.step < 0:
        raise StateSyncError(f"invalid step {snapshot.step!r}")
    params, optimizer_state = _layout(computer, snapshot.entries)
    if sum(e.nbytes for e in snapshot.entries) != len(snapshot.data):
        raise StateSyncError("state data length does not match its entries")
    if compute_digest(snapshot.step, snapshot.entries, snapshot.data) != snapshot.digest:
        raise StateSyncError("state digest does not match its content")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in snapshot.entries:
        tensor = _tensor_from(snapshot.data[offset : offset + entry.nbytes], entry)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StateSyncError(f"state tensor {entry.name} has non-finite values")
        tensors[entry.name] = tensor
        offset += entry.nbytes

    with torch.no_grad():
        for name, p in params:
            p.copy_(tensors[name])
    index = {id(p): i for i, p in enumerate(_optimizer_params(computer))}
    state = {
        index[id(p)]: {key: tensors[f"{OPT_PREFIX}{name}.{key}"] for key in keys}
        for (name, p), keys in zip(params, optimizer_state)
        if keys
    }
    groups = computer.optimizer.state_dict()["param_groups"]  # hyperparameters stay the local ones
    computer.optimizer.load_state_dict({"state": state, "param_groups": groups})
    for _, p in params:
        p.grad = None
    computer.accumulated_samples = 0
    computer.step = snapshot.step


def _layout(
    computer: StageComputer, entries: list[TensorEntry]
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[frozenset[str]]]:
    """Checks `entries` against `computer`; returns its named parameters and, per parameter, the
    optimizer state keys the entries carry."""
    for entry in entries:
        check_entry(entry)
    params = list(computer.module.named_parameters())
    if len(entries) < len(params):
        raise StateSyncError(f"state has {len(entries)} tensors, the stage {len(params)} parameters")
    for (name, p), entry in zip(params, entries):
        if entry.name != name or entry.dtype != DTYPE_NAMES.get(p.dtype) or entry.shape != list(p.shape):
            raise StateSyncError(
                f"state tensor {entry.name} {entry.dtype}{entry.shape} does not match parameter "
                f"{name} {p.dtype}{list(p.shape)}"
            )
    optimizer_state = _check_optimizer_entries(computer, params, entries[len(params) :])
    if [e.name for e in entries[len(params) :]] != _canonical_opt_order(params, optimizer_state):
        raise StateSyncError("optimizer state entries are not in canonical order")
    return params, optimizer_state


def _state_tensors(computer: StageComputer) -> list[tuple[str, torch.Tensor]]:
    params = list(computer.module.named_parameters())
    out: list[tuple[str, torch.Tensor]] = list(params)
    for name, p in params:
        state = computer.optimizer.state.get(p, {})
        for key in sorted(state):
            value = state[key]
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise StateSyncError(f"optimizer state {name}.{key} is a {type(value).__name__}")
            out.append((f"{OPT_PREFIX}{name}.{key}", value))
    return out


def _optimizer_params(computer: StageComputer) -> list[torch.Tensor]:
    return [p for group in computer.optimizer.param_groups for p in group["params"]]


def _required_keys(optimizer: torch.optim.Optimizer, group: dict) -> frozenset[str]:
    """The state keys each parameter has once the optimizer has stepped it."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = {"step", "exp_avg", "exp_avg_sq"}
        return frozenset(keys | {"max_exp_avg_sq"} if group.get("amsgrad") else keys)
    if isinstance(optimizer, torch.optim.SGD):
        return frozenset({"momentum_buffer"} if group.get("momentum") else ())
    raise StateSyncError(f"cannot sync the state of optimizer {type(optimizer).__name__}")


def _check_optimizer_entries(
    computer: StageComputer, params: list[tuple[str, torch.Tensor]], entries: list[TensorEntry]
) -> list[frozenset[str]]:
    """Validates the `opt.*` entries; returns, per parameter, the state keys the snapshot has."""
    by_param = {name: p for name, p in params}
    groups = {id(p): g for g in computer.optimizer.param_groups for p in g["params"]}
    found: dict[str, set[str]] = {name: set() for name, _ in params}
    for entry in entries:
        name, _, key = entry.name.removeprefix(OPT_PREFIX).rpartition(".")
        if not entry.name.startswith(OPT_PREFIX) or name not in by_param:
            raise StateSyncError(f"state tensor {entry.name} belongs to no parameter of this stage")
        p = by_param[name]
        if key not in _required_keys(computer.optimizer, groups[id(p)]):
            kind = type(computer.optimizer).__name__
            raise StateSyncError(f"state tensor {entry.name}: {kind} has no {key!r}")
        if key in _SCALAR_KEYS:
            ok = entry.shape == [] and DTYPES[entry.dtype].is_floating_point
        else:
            ok = entry.shape == list(p.shape) and entry.dtype == DTYPE_NAMES.get(p.dtype)
        if not ok:
            raise StateSyncError(f"state tensor {entry.name} has the wrong dtype or shape {entry.shape}")
        found[name].add(key)
    result = []
    for name, p in params:
        keys = frozenset(found[name])
        if keys and keys != _required_keys(computer.optimizer, groups[id(p)]):
            raise StateSyncError(f"optimizer state of {name} is incomplete: {sorted(keys)}")
        result.append(keys)
    return result


def _canonical_opt_order(params: list[tuple[str, torch.Tensor]], keys: list[frozenset[str]]) -> list[str]:
    return [f"{OPT_PREFIX}{name}.{key}" for (name, _), ks in zip(params, keys) for key in sorted(ks)]


def _tensor_from(view: memoryview, entry: TensorEntry) -> torch.Tensor:
    """A fresh tensor holding a copy of `view`'s bytes, as `entry` describes it."""
    tensor = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    if entry.nbytes:
        tensor.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(view, dtype=np.uint8)
    return tensor
