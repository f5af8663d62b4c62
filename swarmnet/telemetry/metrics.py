"""Every Prometheus metric swarmnet exports, in one module, all prefixed `swarmnet_`.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` for counters. A process
exports the families of its role; the coordinator adds the swarm view (`swarmnet_swarm_*`, see
`swarmnet.coordinator.view`). Peer-side series carry no `stage` label on purpose: a peer moves
between stages, so its current stage is the `swarmnet_peer_info` series, joined where needed
(`* on(instance) group_left(stage) swarmnet_peer_info`). See docs/observability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from swarmnet.protocols.addresses import announced_host

logger = logging.getLogger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- every protocol server (peer, coordinator's archive) ------------------------------------------

REQUESTS = Counter(
    "swarmnet_requests_total",
    "Requests served, by protocol (stage, state, averaging), kind (forward, backward, ...) and outcome "
    "(ok, an error code such as bad_request or overloaded, disconnected, timeout, internal)",
    ["protocol", "kind", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "swarmnet_request_seconds", "Time to serve one request, from its first byte to the last reply byte",
    ["protocol", "kind"], buckets=_LATENCY,
)
TRANSFERRED_BYTES = Counter(
    "swarmnet_transferred_bytes_total", "Bytes this process sent and received, by protocol and direction (sent, received)",
    ["protocol", "direction"],
)
STREAMS = Counter(
    "swarmnet_streams_opened_total",
    "Stage and state call streams this process opened, by protocol and transport (direct TCP, or p2p through p2pd)",
    ["protocol", "transport"],
)
ACCESS_DENIED = Counter(
    "swarmnet_access_denied_total",
    "Private runs: callers refused and records ignored because their peer id is neither on the run's allowlist "
    "nor holds a valid join credential, by protocol (stage, state, dht)",
    ["protocol"],
)
DIRECT_CONNECTIONS = Counter(
    "swarmnet_direct_connections_total",
    "Direct data-plane connections opened (as a client) and accepted (as a server), by outcome",
    ["side", "outcome"],
)

# --- peer: serving a stage or an expert -----------------------------------------------------------

PEER_INFO = Gauge(
    "swarmnet_peer_info", "1 for what this peer serves now: run, unit index, stage ('' for an expert), expert uid, device",
    ["run_id", "unit", "stage", "expert", "device"],
)
STAGE_COMPUTE_SECONDS = Histogram(
    "swarmnet_stage_compute_seconds", "Compute time of one stage call", ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SAMPLES = Counter("swarmnet_stage_samples_total", "Samples computed by this peer", ["kind"])
QUEUE_DEPTH = Gauge("swarmnet_stage_queue_depth", "Requests waiting for this peer's compute thread")
THROUGHPUT = Gauge("swarmnet_stage_throughput_samples_per_second", "Measured throughput of this peer")
OPTIMIZER_STEPS = Counter("swarmnet_optimizer_steps_total", "Optimizer steps taken by this peer")
OPTIMIZER_STEP = Gauge("swarmnet_optimizer_step", "The step this peer's parameters are at")
AVERAGING_ROUNDS = Counter(
    "swarmnet_averaging_rounds_total", "All-reduce rounds of this peer's stage, by outcome (ok, failed)", ["outcome"]
)
AVERAGING_SECONDS = Histogram(
    "swarmnet_averaging_round_seconds", "Duration of successful all-reduce rounds",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
AVERAGING_GROUP_SIZE = Histogram(
    "swarmnet_averaging_group_size", "Peers taking part in each all-reduce round this peer joined",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
SUSPECTED_PEERS = Counter(
    "swarmnet_averaging_suspected_peers_total", "Stage-mates left out of rounds because they did not answer a ping"
)
AVERAGING_OUTLIERS = Counter(
    "swarmnet_averaging_outliers_total",
    "Stage-mates whose contribution to the part this peer owns was an outlier in a completed round "
    "(averaging.aggregation = centered_clip), by their peer id",
    ["peer"],
)
STATE_SYNC_SECONDS = Histogram(
    "swarmnet_state_sync_seconds", "Time to download and load a stage's state", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
)
STATE_SYNC_BYTES = Counter("swarmnet_state_sync_bytes_total", "Bytes of stage state downloaded from other peers")
CHECKPOINTS_SAVED = Counter("swarmnet_checkpoints_saved_total", "Stage checkpoints written by this peer")
EXPERT_CALLS = Counter(
    "swarmnet_expert_calls_total", "Calls from this peer's MoE gates to remote experts, by kind and outcome", ["kind", "outcome"]
)
EXPERT_CALL_SECONDS = Histogram(
    "swarmnet_expert_call_seconds", "Duration of successful remote expert calls", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MOE_TOKENS = Counter(
    "swarmnet_moe_token_slots_total", "Token slots routed by this peer's MoE gates, by outcome (answered, unanswered)", ["outcome"]
)
MOE_AUX_LOSS = Gauge("swarmnet_moe_balancing_loss", "Load-balancing loss of this peer's MoE gates in the last backward")
LIVE_EXPERTS = Gauge("swarmnet_moe_live_experts", "Experts of each MoE layer with a reachable replica", ["layer"])

# --- every DHT participant ------------------------------------------------------------------------

DHT_SECONDS = Histogram(
    "swarmnet_dht_operation_seconds", "Duration of DHT operations, by operation (get, put, replicate) and outcome",
    ["operation", "outcome"], buckets=_LATENCY,
)
DHT_KNOWN_PEERS = Gauge("swarmnet_dht_known_peers", "DHT nodes in this process's routing table")

# --- trainer --------------------------------------------------------------------------------------

TRAINER_LOSS = Gauge("swarmnet_trainer_loss", "Mean training loss of the last step (NaN if it was not finite)")
TRAINER_STEP = Gauge("swarmnet_trainer_step", "The optimizer step this trainer last completed")
TRAINER_STEPS = Counter("swarmnet_trainer_steps_total", "Steps this trainer completed")
TRAINER_SAMPLES = Counter("swarmnet_trainer_samples_total", "Samples completed by this trainer")
TRAINER_SAMPLES_PER_SECOND = Gauge("swarmnet_trainer_samples_per_second", "This trainer's samples/s since it started")
TRAINER_IN_FLIGHT = Gauge("swarmnet_trainer_microbatches_in_flight", "Microbatches this trainer has in the pipeline")
TRAINER_DROPPED = Counter("swarmnet_trainer_microbatches_dropped_total", "Microbatches given up after retries")
TRAINER_RETRIES = Counter("swarmnet_trainer_retries_total", "Stage calls retried, by stage", ["stage"])
RECORDS_REJECTED = Counter(
    "swarmnet_records_rejected_total",
    "DHT records this node refused to store or accept from a query, by reason (forged, replayed, misplaced, malformed)",
    ["reason"],
)
TRAINER_AUDITS = Counter(
    "swarmnet_trainer_audits_total",
    "Forward calls sent to two replicas and compared, by stage and outcome (agree, liar, no_majority, incomparable)",
    ["stage", "outcome"],
)
TRAINER_LIARS_BANNED = Counter(
    "swarmnet_trainer_liars_banned_total", "Stage peers caught returning results their replicas contradict", ["stage"]
)
TRAINER_CALL_SECONDS = Histogram(
    "swarmnet_trainer_stage_call_seconds", "Duration of this trainer's successful calls to a stage, by stage and kind",
    ["stage", "kind"], buckets=_LATENCY,
)

# --- coordinator ----------------------------------------------------------------------------------

ARCHIVED_STEP = Gauge("swarmnet_archive_step", "Step of the archived state of each stage (coordinator)", ["stage"])
SWARM_EVENTS = Counter(
    "swarmnet_swarm_events_total",
    "Changes the coordinator saw between two observations, by kind (peer_joined, peer_left, peer_vanished, "
    "stage_empty, averaging_failed, nonfinite_loss, trainer_joined, trainer_vanished)",
    ["kind"],
)
SWARM_OBSERVATIONS = Counter("swarmnet_swarm_observations_total", "Swarm observations by outcome (ok, failed)", ["outcome"])


def serve_metrics(host: str, port: int | None, maddrs: Sequence[str] = ()) -> str | None:
    """Starts the `/metrics` endpoint; returns the host:port to announce, or None when disabled.
    On a wildcard interface the announced host is the first non-loopback IPv4 of `maddrs`."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    return f"{announced_host(host, maddrs)}:{bound}"


def set_peer_info(*, run_id: str, unit: int, stage: int | None, expert: str | None, device: str) -> None:
    """Replaces the `swarmnet_peer_info` series (a peer serves one unit at a time)."""
    PEER_INFO.clear()
    PEER_INFO.labels(run_id, str(unit), "" if stage is None else str(stage), expert or "", device).set(1)
