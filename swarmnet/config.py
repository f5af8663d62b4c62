"""Frozen, keyword-only configuration dataclasses, loaded from TOML.

Each component receives only its own config. The run manifest (`RunManifest`) is the part that
every process of a run must agree on: it is published by the coordinator as a signed DHT record and
its hash is the run id. Peer and trainer profiles are local choices of one volunteer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack

from swarmnet.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts layers: in the listed blocks the MLP becomes a gate, run by the stage that
    holds the block, and `num_experts` remote experts served by expert peers (`join --expert`)."""

    layers: tuple[int, ...]
    """Blocks whose MLP is replaced by a Mixture-of-Experts layer."""
    num_experts: int = 4
    """Experts per MoE layer (uids `expert.<layer>.<index>`)."""
    top_k: int = 2
    """Experts each token is sent to."""
    k_min: int = 1
    """A microbatch goes on once every token has this many expert answers (or cannot get them),
    waiting at most `timeout_after_k_min` more for the rest."""
    d_expert: int = 256
    """Hidden width of each expert's feed-forward network."""
    capacity_factor: float = 2.0
    """An expert takes at most `capacity_factor * tokens * top_k / num_experts` tokens of a
    microbatch; tokens beyond that skip it (their other experts' gates are renormalized)."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer style) added by every gate."""
    forward_timeout: float = 5.0
    """Seconds a gate waits for its experts' forward answers."""
    timeout_after_k_min: float = 1.0
    """Seconds a gate waits for the remaining experts once `k_min` answers per token are in."""
    backward_timeout: float = 10.0
    """Seconds a gate waits for an expert's backward answer (missing: no gradient from it)."""
    expert_batch_tokens: int = 0
    """Tokens an expert's replicas accumulate before an optimizer step; 0: the expected share of
    one batch, `target_batch_size * seq_len * top_k / num_experts`."""

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ConfigError("model.moe.layers must list distinct, non-negative block indices")
        if self.num_experts < 1 or not 1 <= self.k_min <= self.top_k <= self.num_experts:
            raise ConfigError("model.moe needs num_experts >= 1 and 1 <= k_min <= top_k <= num_experts")
        if self.d_expert < 1 or not self.capacity_factor > 0 or self.aux_loss_weight < 0:
            raise ConfigError("model.moe needs d_expert >= 1, capacity_factor > 0 and aux_loss_weight >= 0")
        if min(self.forward_timeout, self.backward_timeout) <= 0 or self.timeout_after_k_min < 0:
            raise ConfigError("model.moe timeouts must be positive")
        if self.expert_batch_tokens < 0:
            raise ConfigError("model.moe.expert_batch_tokens must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A small decoder-only transformer (see `swarmnet.models.gpt`)."""

    vocab_size: int = 256
    """Byte-level tokens: 256 symbols."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks, split across the pipeline stages."""
    n_heads: int = 4
    """Attention heads per block; must divide `d_model`."""
    d_ff: int = 512
    """Hidden width of each block's MLP."""
    max_seq_len: int = 256
    """Longest sequence the position embedding covers."""
    moe: MoEConfig | None = field(default=None, metadata={"omit_if_none": True})
    """Mixture-of-Experts layers, if any (absent from the manifest's hash when none)."""

    def __post_init__(self) -> None:
        if self.moe is not None and max(self.moe.layers) >= self.n_layers:
            raise ConfigError(f"model.moe.layers must be blocks 0..{self.n_layers - 1}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer every stage applies after each collaborative step."""

    name: str = "adamw"
    """`adamw` or `sgd`."""
    lr: float = 3e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam moment decay rates (ignored by sgd)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    momentum: float = 0.0
    """SGD momentum (ignored by adamw)."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer.name must be 'adamw' or 'sgd', not {self.name!r}")
        if not self.lr > 0:
            raise ConfigError("optimizer.lr must be positive")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the trainer's text comes from; tokens are bytes."""

    source: str = "stdlib"
    """`stdlib` (the Python standard library's own sources, always present offline) or a path to a
    folder of text files."""
    max_bytes: int = 4_000_000
    """Read at most this many bytes of corpus (keeps start-up fast)."""
    holdout_fraction: float = 0.02
    """Tail of the corpus kept out of training for evaluation."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """How the run is cut and batched."""

    num_stages: int = 2
    """Number of pipeline stages the model is cut into."""
    microbatch_size: int = 8
    """Sequences per microbatch (one trip through the pipeline)."""
    seq_len: int = 64
    """Tokens per sequence."""
    target_batch_size: int = 32
    """Samples accumulated by a stage before it takes an optimizer step."""
    seed: int = 0
    """Seeds the model initialization and the data order."""
    max_staleness: int = field(default=0, metadata={"omit_if_default": True})
    """Optimizer steps that may run at once in the trainer's pipeline, minus one. 0: a step's
    microbatches start after the previous step's finished, so every gradient is computed on the
    parameters it is applied to and a swarm computes exactly what `train --local` does. 1: delayed
    parameter updates: step k+1's microbatches enter the pipeline while step k's finish, so some of
    their forwards run on parameters one step old. That hides the step barrier (about two round
    trips per step) on slow links, at a cost in the loss measured in docs/benchmarks.md."""

    def __post_init__(self) -> None:
        if self.max_staleness not in (0, 1):
            raise ConfigError("training.max_staleness must be 0 (synchronous) or 1 (delayed updates)")
        if self.num_stages < 1:
            raise ConfigError("training.num_stages must be >= 1")
        if self.microbatch_size < 1 or self.seq_len < 1:
            raise ConfigError("training.microbatch_size and training.seq_len must be positive")
        if self.target_batch_size < 1 or self.target_batch_size % self.microbatch_size:
            raise ConfigError("training.target_batch_size must be a multiple of microbatch_size")


@dataclass(frozen=True, kw_only=True)
class AveragingConfig:
    """How the peers of one stage stay identical."""

    mode: str = "gradient"
    """`gradient`: all-reduce the gradients of every `target_batch_size` samples and take the same
    optimizer step (exact data parallelism). `diloco`: each peer steps locally, and every
    `outer_every` batches the stage averages parameters and takes an outer step (low communication)."""
    outer_every: int = 8
    """diloco: stage-wide batches of `target_batch_size` samples between parameter averages."""
    outer_lr: float = 0.7
    """diloco: learning rate of the outer Nesterov-SGD step on the averaged parameter change."""
    outer_momentum: float = 0.9
    """diloco: momentum of the outer step."""
    round_timeout: float = 30.0
    """Seconds an all-reduce round may take before every member drops it."""
    join_grace: float = 5.0
    """Seconds a ready stage waits for a joining or lagging stage-mate before stepping without it."""
    # The fields below are left out of the run id while they hold their defaults, so that adding
    # them kept existing runs' ids (`omit_if_default`).
    aggregation: str = field(default="mean", metadata={"omit_if_default": True})
    """How the owner of a part combines the members' contributions in a round: `mean` (their sum,
    weighted by samples; one lying peer can move it anywhere) or `centered_clip` (centered clipping,
    robust to a minority of Byzantine peers; see `swarmnet.averaging.robust`)."""
    clip_multiplier: float = field(default=2.0, metadata={"omit_if_default": True})
    """centered_clip: the clipping radius is this × the median distance of the contributions (per
    part, as means over their samples) to their coordinate-wise median."""
    clip_iterations: int = field(default=3, metadata={"omit_if_default": True})
    """centered_clip: most clipping iterations per round."""
    outlier_ratio: float = field(default=3.0, metadata={"omit_if_default": True})
    """centered_clip: a contribution farther than this × the clipping radius from the result is an
    outlier (counted in `swarmnet_averaging_outliers_total`)."""
    ban_after: int = field(default=3, metadata={"omit_if_default": True})
    """centered_clip: a member that is an outlier in this many consecutive rounds is banned by the
    peers that caught it: they give its contributions no weight from then on (0: never ban)."""

    def __post_init__(self) -> None:
        if self.mode not in ("gradient", "diloco"):
            raise ConfigError(f"averaging.mode must be 'gradient' or 'diloco', not {self.mode!r}")
        if self.outer_every < 1 or self.round_timeout <= 0 or self.join_grace < 0:
            raise ConfigError("averaging.outer_every >= 1, round_timeout > 0 and join_grace >= 0 are required")
        if self.aggregation not in ("mean", "centered_clip"):
            raise ConfigError(f"averaging.aggregation must be mean or centered_clip, not {self.aggregation}")
        if not (self.clip_multiplier > 0 and self.outlier_ratio > 0):
            raise ConfigError("averaging.clip_multiplier and averaging.outlier_ratio must be positive")
        if self.clip_iterations < 1 or self.ban_after < 0:
            raise ConfigError("averaging.clip_iterations >= 1 and averaging.ban_after >= 0 are required")


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """How tensors travel between the run's processes."""

    compression: str = "none"
    """Encoding of activations and their gradients between pipeline stages: `none`, `fp16`,
    `int8` (blockwise 8-bit, about 0.254x the bytes of float32), or `auto`: per link, from the
    bandwidth measured on it (`none` on fast links, `fp16`, then `int8` on slow ones)."""
    auto_fp16_below_mbps: float = 2000.0
    """auto: links measured slower than this (Mbit/s) send fp16."""
    auto_int8_below_mbps: float = 400.0
    """auto: links measured slower than this (Mbit/s) send int8."""

    def __post_init__(self) -> None:
        if self.compression not in ("none", "fp16", "int8", "auto"):
            raise ConfigError(f"network.compression must be none, fp16, int8 or auto, not {self.compression!r}")
        if not 0 < self.auto_int8_below_mbps <= self.auto_fp16_below_mbps:
            raise ConfigError("network needs 0 < auto_int8_below_mbps <= auto_fp16_below_mbps")


_PEER_ID = re.compile(r"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}")
"""An Ed25519 libp2p peer id (the only kind swarmnet identities have), as `swarmnet identity` prints."""
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """Who may take part in the run (`[access]`). Empty: a public run. With an allowlist or a join
    token the run is private: every peer refuses calls and ignores DHT records from processes that
    are neither listed nor hold a credential derived from the token (see docs/protocols.md)."""

    allowlist: tuple[str, ...] = ()
    """Peer ids admitted without a token (kept sorted and unique, so order does not change the
    run id). The coordinator adds its own id when it publishes a run with an allowlist."""
    token_sha256: str = ""
    """Hex sha256 of the join token. The token itself is never in the manifest (the manifest is
    public in the DHT); its hash lets a joiner check its token at once, with a clear error."""

    def __post_init__(self) -> None:
        bad = [p for p in self.allowlist if not isinstance(p, str) or not _PEER_ID.fullmatch(p)]
        if bad:
            raise ConfigError(f"access.allowlist: not Ed25519 peer ids (12D3KooW…): {bad[:3]}")
        object.__setattr__(self, "allowlist", tuple(sorted(set(self.allowlist))))
        if self.token_sha256 and not _SHA256_HEX.fullmatch(self.token_sha256):
            raise ConfigError("access.token_sha256 must be 64 lowercase hex digits (sha256 of the join token)")

    @property
    def private(self) -> bool:
        return bool(self.allowlist or self.token_sha256)


@dataclass(frozen=True, kw_only=True)
class RunManifest:
    """Everything the processes of one run agree on. Its content hash is the run id."""

    name: str
    """Human-readable run name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig, metadata={"omit_if_default": True})
    """Left out of the run id while it has its defaults, so adding it kept existing runs' ids."""
    access: AccessConfig = field(default_factory=AccessConfig, metadata={"omit_if_default": True})
    """Private runs only (left out of public runs' ids, like `network`)."""

    def __post_init__(self) -> None:
        if self.training.seq_len > self.model.max_seq_len:
            raise ConfigError("training.seq_len exceeds model.max_seq_len")
        if self.training.num_stages > self.model.n_layers + 1:
            raise ConfigError("more stages than the model can be cut into")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunManifest":
        return _from_plain(cls, data, "manifest")

    @property
    def microbatches_per_step(self) -> int:
        return self.training.target_batch_size // self.training.microbatch_size

    @property
    def run_id(self) -> str:
        """Content hash of the manifest: any change to it is a different run."""
        canonical = msgpack.packb(self.to_dict(), use_bin_type=True)
        return hashlib.sha256(canonical).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """A volunteer peer's local choices (`peers/*.toml`)."""

    device: str = "cpu"
    """torch device to compute on (`cpu`, `cuda`, `cuda:1`)."""
    host: str = "127.0.0.1"
    """Interface to listen on; listening on every interface is an explicit choice."""
    port: int = 0
    """TCP port for libp2p; 0 picks a free one."""
    announce_period: float = 5.0
    """Seconds between refreshes of the peer's DHT record."""
    record_ttl: float = 15.0
    """Seconds a DHT record lives unless refreshed."""
    input_cache_size: int = 256
    """Most microbatch inputs kept for backward."""
    input_cache_ttl: float = 120.0
    """Seconds a cached microbatch input lives before it is dropped."""
    max_queue: int = 64
    """Most requests queued for compute before new ones are refused as overloaded."""
    max_queue_per_client: int = 16
    """Calls one client (a trainer, a stage peer calling experts) may have queued here at once;
    more get a retryable busy error, so one flooding client cannot take the whole queue. The
    compute queue also serves clients fairly (`swarmnet.peer.executor`)."""
    metrics_port: int | None = 0
    """Port of the Prometheus `/metrics` endpoint; 0 picks a free one, none disables it. The
    address is announced in the peer's DHT record, so the coordinator's service discovery finds it."""
    metrics_host: str | None = None
    """Interface of the `/metrics` endpoint (none: `host`)."""
    initial_peers: tuple[str, ...] = ()
    """Where to find the swarm when neither `--initial-peers` nor `SWARMNET_INITIAL_PEERS` is
    given: multiaddrs of live peers, or a coordinator's `http://host:8470`."""
    compute_threads: int = 1
    """torch intra-op threads used by the compute executor."""
    manifest_timeout: float = 30.0
    """Seconds to wait for a verified run manifest to appear in the DHT."""
    averaging_port: int = 0
    """TCP port of the data plane (same host): all-reduce rounds, and direct stage and state
    calls unless `direct_data_plane` is off; 0 picks a free one."""
    direct_data_plane: bool = True
    """Serve and make stage and state calls over direct TCP (authenticated, not encrypted) where
    the other side is reachable, falling back to libp2p streams through p2pd; off: libp2p only."""
    progress_period: float = 0.25
    """Seconds between checks of the stage's progress (when to average and step)."""
    rebalance_period: float | None = 30.0
    """Mean seconds between rebalancing checks (randomized); 0 disables moving."""
    rebalance_margin: float = 0.1
    """Move to the bottleneck stage only if both the stage left and the stage joined end at least
    this fraction above the current bottleneck's throughput (see `pipeline.rebalance`)."""
    leave_timeout: float = 10.0
    """On SIGTERM (or a move), how long the peer drains: it stops taking new microbatches, answers
    the backwards of those it holds, and waits for the round that commits its gradients."""
    checkpoint_dir: str | None = None
    """Where the peer saves its stage's state (atomic files; none: no checkpoints). A restarted
    peer resumes from it unless its stage-mates are further along."""
    checkpoint_every: int = 1
    """Save after every this many optimizer steps (and when leaving)."""
    checkpoint_keep: int = 2
    """Checkpoints kept per stage (older ones are deleted)."""


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    """The single finite retry/backoff/ban policy of every client."""

    max_attempts: int = 5
    """Tries per call before giving up (finite by design)."""
    base_delay: float = 0.1
    """Backoff before the second try; doubles each time."""
    max_delay: float = 2.0
    """Ceiling of the backoff."""
    ban_seconds: float = 10.0
    """How long a peer that failed is avoided."""
    call_timeout: float = 10.0
    """Deadline of one forward or backward call: a frozen or cut-off peer costs this much before
    the call is retried elsewhere. Raise it for models whose forward takes seconds."""


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """A trainer's local choices (`peers/trainer.toml`)."""

    max_in_flight: int = 4
    """Microbatches in the pipeline at once."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (none: run until max_seconds or interrupted)."""
    max_seconds: float | None = None
    """Stop after this much wall time."""
    log_every: int = 1
    """Report loss every this many steps."""
    host: str = "127.0.0.1"
    """Interface for the trainer's own libp2p host."""
    metrics_port: int | None = 0
    """Port of the trainer's Prometheus `/metrics` endpoint; 0 picks a free one, none disables it."""
    metrics_host: str | None = None
    """Interface of the `/metrics` endpoint (none: `host`)."""
    initial_peers: tuple[str, ...] = ()
    """As for peers: used when neither `--initial-peers` nor `SWARMNET_INITIAL_PEERS` is given."""
    manifest_timeout: float = 30.0
    """Seconds to wait for a verified run manifest to appear in the DHT."""
    resume: bool = True
    """Start at the swarm's step (the least advanced stage's) instead of step 0, so a restarted
    trainer continues the run's data and loss curve."""
    direct_data_plane: bool = True
    """Call stage peers over direct TCP where they announce a reachable data port (authenticated,
    not encrypted), else over libp2p streams through p2pd; off: libp2p only."""
    audit_fraction: float = 0.0
    """Share of forward calls sent to two replicas of their stage and compared, to catch peers
    that lie about their results (`swarmnet.trainer.audit`; stages with one peer are never
    audited). 0.02-0.1 is reasonable in an open run; 0 trusts every peer."""
    retry: RetryConfig = field(default_factory=RetryConfig)


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def load_manifest(path: str | Path) -> RunManifest:
    return RunManifest.from_dict(load_toml(path))


def load_profile(cls: type, path: str | Path | None, **overrides: Any):
    """Loads a profile TOML (or defaults) into `cls`, then applies non-None overrides."""
    data = load_toml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _from_plain(cls, data, str(path or cls.__name__))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (getattr(obj, f.name) is None and f.metadata.get("omit_if_none"))
            and not (f.metadata.get("omit_if_default") and getattr(obj, f.name) == _default(f))
        }
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


@functools.cache
def _hints(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A config class's type hints and field names, computed once: `get_type_hints` is slow, and
    manifests are parsed from the network (every manifest record a process reads)."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def _from_plain(cls: type, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints, known = _hints(cls)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(map(repr, unknown))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(typing.get_args(hint)[0], v, where) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{where}: expected a list of {len(typing.get_args(hint))} items")
        return tuple(_coerce(a, v, where) for a, v in zip(typing.get_args(hint), value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool")
    return value
