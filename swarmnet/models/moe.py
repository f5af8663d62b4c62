"""Mixture-of-Experts layers whose experts live on other peers.

In a block listed in `model.moe.layers`, the MLP is a `MoELayer`: a gate (a linear map to one logit
per expert) that belongs to the stage holding the block, and `num_experts` feed-forward experts
(`ExpertFFN`) that expert peers serve. Each token goes to its `top_k` live experts; their answers are
mixed with the gate's softmax weights, renormalized over the experts that answered.

Naming. Expert uids follow hivemind's grammar (`expert.<layer>.<index>`, checked with hivemind's
`expert_uid` helpers), so the experts of one layer share the prefix `expert.<layer>.`. On the wire an
expert is addressed as a *unit*: units `0..num_stages-1` are the pipeline stages, units from
`num_stages` on are the experts in uid order. The stage, state, averaging and checkpoint protocols
take a unit index, so an expert is served, synced, averaged and checkpointed exactly like a stage.

Where the experts are is the `Experts` interface's business: `RemoteExperts`
(`swarmnet.moe.client`) calls peers, `LocalExperts` computes in-process (reference and tests) and
`NoExperts` has none (the throughput probe). A `MoERuntime` connects the layers of one module to its
experts and to the pass being run:

- *live* (default): route, call the experts' forward, and — if grad is on — their backward when
  autograd reaches the layer;
- *record* (a stage's no-grad forward): route, call the experts, and keep the routes and answers;
- *replay* (the stage's recomputing backward): reuse the recorded routes and answers, recompute the
  gate with grad, and call only the experts' backward. Every expert thus runs one forward and one
  backward per token, and the backward sees exactly the mixture the forward sent on.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from hivemind.moe.expert_uid import UID_DELIMITER, is_valid_uid, split_uid
from torch import nn
from torch.nn import functional as F

from swarmnet.config import ModelConfig, MoEConfig, RunManifest
from swarmnet.errors import ConfigError
from swarmnet.models.gpt import INIT_STD, init_parameters

EXPERT_TYPE = "expert"


# --- uids and units ---------------------------------------------------------------------------


def expert_uid(layer: int, index: int) -> str:
    return f"{EXPERT_TYPE}{UID_DELIMITER}{layer}{UID_DELIMITER}{index}"


def layer_prefix(layer: int) -> str:
    """The uid prefix shared by the experts of one MoE layer (`expert.3.`)."""
    return f"{EXPERT_TYPE}{UID_DELIMITER}{layer}{UID_DELIMITER}"


def parse_uid(uid: str) -> tuple[int, int]:
    """(layer, index) of an expert uid; `ConfigError` if it is not `expert.<layer>.<index>`."""
    parts = uid.split(UID_DELIMITER) if isinstance(uid, str) else []
    if len(parts) != 3 or parts[0] != EXPERT_TYPE or not is_valid_uid(uid):
        raise ConfigError(f"{uid!r} is not an expert uid (expected expert.<layer>.<index>)")
    _, index = split_uid(uid)
    return int(parts[1]), index


def expert_uids(manifest: RunManifest) -> list[str]:
    """Every expert of the run, in unit order (layer by layer, then index)."""
    moe = manifest.model.moe
    if moe is None:
        return []
    return [expert_uid(layer, i) for layer in sorted(moe.layers) for i in range(moe.num_experts)]


def num_units(manifest: RunManifest) -> int:
    return manifest.training.num_stages + len(expert_uids(manifest))


def unit_of(manifest: RunManifest, uid: str) -> int:
    """The unit index of expert `uid`; `ConfigError` if the run has no such expert."""
    uids = expert_uids(manifest)
    if uid not in uids:
        parse_uid(uid)  # a clearer error for a malformed uid
        raise ConfigError(f"run {manifest.run_id} has no expert {uid!r} (it has {', '.join(uids) or 'none'})")
    return manifest.training.num_stages + uids.index(uid)


def uid_of(manifest: RunManifest, unit: int) -> str | None:
    """The expert uid of `unit`, or None for a pipeline stage; `ConfigError` if out of range."""
    stages = manifest.training.num_stages
    uids = expert_uids(manifest)
    if not 0 <= unit < stages + len(uids):
        raise ConfigError(f"unit {unit} outside 0..{stages + len(uids) - 1}")
    return uids[unit - stages] if unit >= stages else None


def expert_batch_tokens(manifest: RunManifest) -> int:
    """Tokens an expert's replicas accumulate per optimizer step (the manifest's, or the expected
    share of one batch: every token visits `top_k` of `num_experts` experts)."""
    moe = _moe(manifest.model)
    if moe.expert_batch_tokens:
        return moe.expert_batch_tokens
    tokens = manifest.training.target_batch_size * manifest.training.seq_len * moe.top_k
    return max(1, tokens // moe.num_experts)


def expert_capacity(moe: MoEConfig, tokens: int) -> int:
    """Most tokens of a microbatch of `tokens` tokens that one expert takes."""
    return min(tokens, max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts)))


def max_expert_tokens(manifest: RunManifest) -> int:
    """The largest token batch an expert is ever sent (one whole microbatch)."""
    return manifest.training.microbatch_size * manifest.training.seq_len


# --- modules ----------------------------------------------------------------------------------


class ExpertFFN(nn.Module):
    """One expert: d_model -> d_expert -> d_model with a GELU, on a flat batch of tokens (N, d)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = _moe(config)
        self.fc = nn.Linear(config.d_model, moe.d_expert)
        self.proj = nn.Linear(moe.d_expert, config.d_model)
        self.proj.init_std = INIT_STD / math.sqrt(2 * config.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (N, d_model)


def build_expert(manifest: RunManifest, uid: str) -> ExpertFFN:
    """Builds expert `uid`, initialized from the run's seed and the uid (the same everywhere)."""
    unit_of(manifest, uid)
    module = ExpertFFN(manifest.model)
    init_parameters(module, manifest.training.seed, f"{uid}.")
    return module


@dataclass(frozen=True)
class Routes:
    """Where the tokens of one microbatch go in one MoE layer."""

    experts: torch.Tensor
    """(N, top_k) int64: the expert of each token's slot, -1 where the slot is empty (fewer live
    experts than top_k, or the expert's capacity was full)."""
    alive: torch.Tensor
    """(E,) bool: the experts that could be chosen."""
    top1: torch.Tensor
    """(N,) int64: each token's first choice before capacity limits (for the balancing loss)."""

    def assignment(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, slots) of the tokens sent to `expert`, in row order."""
        rows, slots = (self.experts == expert).nonzero(as_tuple=True)
        return rows, slots

    def used(self) -> list[int]:
        return sorted(int(e) for e in self.experts.unique() if e >= 0)


@dataclass
class ExpertAnswers:
    """What the experts returned for one microbatch of one layer."""

    values: torch.Tensor
    """(N, top_k, d_model): each slot's expert output, zeros where there is none."""
    answered: torch.Tensor
    """(N, top_k) bool: slots whose expert answered."""
    handles: dict[int, Any]
    """Expert index → whatever its backward needs (the peer and call id that answered)."""


class Experts(Protocol):
    """Where the experts of a module's MoE layers are computed. `forward` and `backward` are called
    on the compute thread and may block on the network; they never raise for a missing expert
    (that slot is simply not answered, or its gradient is zero)."""

    def alive(self, layer: int) -> torch.Tensor:
        """(E,) bool: experts of `layer` that can be asked now."""
        ...

    def forward(self, layer: int, routes: Routes, tokens: torch.Tensor) -> ExpertAnswers: ...

    def backward(self, layer: int, routes: Routes, answers: ExpertAnswers, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of the tokens (N, d_model) given the gradient of `answers.values`."""
        ...


def plan_routes(logits: torch.Tensor, alive: torch.Tensor, top_k: int, capacity: int) -> Routes:
    """Each token's `top_k` best live experts by gate logit, at most `capacity` tokens per expert
    (first slots first, then earlier tokens first, as in Switch Transformer). Pure."""
    N, E = logits.shape
    experts = torch.full((N, top_k), -1, dtype=torch.int64)
    k = min(top_k, int(alive.sum()))
    if k == 0 or N == 0:
        return Routes(experts=experts, alive=alive.clone(), top1=torch.full((N,), -1, dtype=torch.int64))
    masked = logits.detach().float().masked_fill(~alive, float("-inf"))
    top = masked.topk(k, dim=1).indices  # (N, k)
    experts[:, :k] = top
    for e in top.unique().tolist():
        hit = experts == e  # (N, top_k)
        slot_major = hit.t().reshape(-1)
        keep = slot_major & (slot_major.cumsum(0) <= capacity)
        experts[hit & ~keep.view(top_k, N).t()] = -1
    return Routes(experts=experts, alive=alive.clone(), top1=top[:, 0].clone())


def gate_weights(probs: torch.Tensor, routes: Routes, answered: torch.Tensor) -> torch.Tensor:
    """(N, top_k) mixing weights: the gate's probability of each answered slot, renormalized over
    the token's answered slots (zero for a token no expert answered)."""
    g = probs.gather(1, routes.experts.clamp(min=0).to(probs.device)) * answered.to(probs.device)
    return g / g.sum(dim=1, keepdim=True).clamp(min=1e-9)


def load_balancing_loss(probs: torch.Tensor, routes: Routes) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, `E * sum_e f_e * P_e` (f_e: share of tokens whose first
    choice is e, P_e: mean gate probability of e); 1.0 when perfectly balanced, E at worst."""
    E = probs.shape[1]
    chosen = routes.top1[routes.top1 >= 0]
    if chosen.numel() == 0:
        return probs.sum() * 0.0
    share = (torch.bincount(chosen, minlength=E).float() / chosen.numel()).to(probs.device)
    return E * (share * probs.mean(dim=0)).sum()


class _ExpertCall(torch.autograd.Function):
    """Expert answers as a function of the tokens; its backward asks the experts for theirs."""

    @staticmethod
    def forward(ctx, tokens, experts, layer, routes, answers):
        ctx.experts, ctx.layer, ctx.routes, ctx.answers = experts, layer, routes, answers
        return answers.values.to(tokens.device, copy=True)

    @staticmethod
    def backward(ctx, grad):
        # Experts take and return CPU tensors (they go over the network): move across if needed.
        grad_tokens = ctx.experts.backward(ctx.layer, ctx.routes, ctx.answers, grad.detach().cpu().contiguous())
        return grad_tokens.to(grad.device), None, None, None, None


class MoELayer(nn.Module):
    """A gate and `num_experts` experts in place of a block's MLP: (B, T, d) -> (B, T, d)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.moe = _moe(config)
        self.layer = layer
        self.gate = nn.Linear(config.d_model, self.moe.num_experts, bias=False)
        self.runtime: MoERuntime | None = None
        """Set by `attach_experts`; not a submodule, so it holds no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime is None:
            raise RuntimeError(f"MoE layer {self.layer} has no experts attached (see attach_experts)")
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, d)
        logits = self.gate(tokens)  # (N, E)
        recorded = self.runtime.begin(self.layer)
        if recorded is None:
            experts = self.runtime.experts
            alive = experts.alive(self.layer)
            routes = plan_routes(logits.detach().cpu(), alive, self.moe.top_k, expert_capacity(self.moe, B * T))
            answers = experts.forward(self.layer, routes, tokens.detach().cpu())
            self.runtime.record(self.layer, routes, answers)
        else:
            routes, answers = recorded
        if torch.is_grad_enabled():
            values = _ExpertCall.apply(tokens, self.runtime.experts, self.layer, routes, answers)  # (N, k, d)
        else:
            values = answers.values.to(tokens.device)
        if routes.alive.any():
            probs = torch.softmax(logits.masked_fill(~routes.alive.to(logits.device), float("-inf")), dim=1)  # (N, E)
        else:
            probs = torch.zeros_like(logits)
        weights = gate_weights(probs, routes, answers.answered)  # (N, k)
        if torch.is_grad_enabled() and self.moe.aux_loss_weight > 0 and routes.alive.any():
            self.runtime.aux.append(load_balancing_loss(probs, routes))
        out = (weights.unsqueeze(-1).to(values.dtype) * values).sum(dim=1)  # (N, d)
        return out.view(B, T, C)


class MoERuntime:
    """Connects the MoE layers of one module to its experts and to the pass being run (live,
    record or replay; see the module docstring). Used from one thread at a time."""

    def __init__(self, experts: Experts, aux_loss_weight: float):
        self.experts = experts
        self.aux_loss_weight = aux_loss_weight
        self.aux: list[torch.Tensor] = []
        """Balancing losses of the current grad-enabled pass, one per layer."""
        self._mode = "live"
        self._trace: list[tuple[int, Routes, ExpertAnswers]] = []

    def begin(self, layer: int) -> tuple[Routes, ExpertAnswers] | None:
        if self._mode != "replay":
            return None
        if not self._trace or self._trace[0][0] != layer:
            raise RuntimeError(f"the recorded pass has no answers for MoE layer {layer} here")
        _, routes, answers = self._trace.pop(0)
        return routes, answers

    def record(self, layer: int, routes: Routes, answers: ExpertAnswers) -> None:
        if self._mode == "record":
            self._trace.append((layer, routes, answers))

    @contextlib.contextmanager
    def recording(self):
        """A pass whose routes and answers are returned as a trace (a list) for `replaying`."""
        trace: list = []
        self._mode, self._trace = "record", trace
        try:
            yield trace
        finally:
            self._mode, self._trace = "live", []

    @contextlib.contextmanager
    def replaying(self, trace: list | None):
        """A pass that reuses `trace` (or a live pass when it is None); yields the balancing
        objective to add to the pass's loss (a function of the sample count)."""
        self.aux = []
        if trace is not None:
            self._mode, self._trace = "replay", list(trace)
        try:
            yield self.objective
        finally:
            self._mode, self._trace = "live", []

    def objective(self, samples: int) -> torch.Tensor | None:
        """`aux_loss_weight * mean balancing loss * samples` of the pass so far (gradient sums are
        per sample, like the main loss's), or None without MoE layers in the pass."""
        if not self.aux or self.aux_loss_weight == 0:
            return None
        return self.aux_loss_weight * torch.stack(self.aux).mean() * samples

    @property
    def last_aux_loss(self) -> float | None:
        return float(torch.stack(self.aux).mean().detach()) if self.aux else None


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def attach_experts(module: nn.Module, experts: Experts) -> MoERuntime | None:
    """Points every MoE layer of `module` at `experts`; the runtime, or None without MoE layers."""
    layers = moe_layers(module)
    if not layers:
        return None
    runtime = MoERuntime(experts, layers[0].moe.aux_loss_weight)
    for layer in layers:
        layer.runtime = runtime
    return runtime


class LocalExperts:
    """Every expert of some layers computed in this process (the reference, tests, benchmarks)."""

    def __init__(self, modules: dict[int, list[ExpertFFN]]):
        self.modules = modules
        """MoE layer → its experts, by index."""

    @classmethod
    def build(cls, manifest: RunManifest) -> "LocalExperts":
        moe = _moe(manifest.model)
        return cls({
            layer: [build_expert(manifest, expert_uid(layer, i)) for i in range(moe.num_experts)] for layer in moe.layers
        })

    def alive(self, layer: int) -> torch.Tensor:
        return torch.ones(len(self.modules[layer]), dtype=torch.bool)

    def forward(self, layer: int, routes: Routes, tokens: torch.Tensor) -> ExpertAnswers:
        N, K = routes.experts.shape
        values = torch.zeros(N, K, tokens.shape[1], dtype=tokens.dtype)
        answered = torch.zeros(N, K, dtype=torch.bool)
        for e in routes.used():
            rows, slots = routes.assignment(e)
            with torch.no_grad():
                values[rows, slots] = self.modules[layer][e](tokens[rows])
            answered[rows, slots] = True
        return ExpertAnswers(values=values, answered=answered, handles={e: tokens for e in routes.used()})

    def backward(self, layer: int, routes: Routes, answers: ExpertAnswers, grad: torch.Tensor) -> torch.Tensor:
        grad_tokens = torch.zeros(grad.shape[0], grad.shape[2], dtype=grad.dtype)
        for e, tokens in answers.handles.items():
            rows, slots = routes.assignment(e)
            with torch.enable_grad():
                x = tokens[rows].detach().requires_grad_(True)
                self.modules[layer][e](x).backward(grad[rows, slots])
            grad_tokens.index_add_(0, rows, x.grad)
        return grad_tokens


class NoExperts:
    """No expert is reachable: MoE layers add nothing (used by the throughput probe)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def alive(self, layer: int) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=torch.bool)

    def forward(self, layer: int, routes: Routes, tokens: torch.Tensor) -> ExpertAnswers:
        N, K = routes.experts.shape
        return ExpertAnswers(
            values=torch.zeros(N, K, tokens.shape[1]), answered=torch.zeros(N, K, dtype=torch.bool), handles={}
        )

    def backward(self, layer: int, routes: Routes, answers: ExpertAnswers, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros(grad.shape[0], grad.shape[2], dtype=grad.dtype)


def _moe(config: ModelConfig) -> MoEConfig:
    if config.moe is None:
        raise ConfigError("this model has no Mixture-of-Experts layers (model.moe)")
    return config.moe
