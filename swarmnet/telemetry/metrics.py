"""Every Prometheus metric swarmnet exports, in one module, all prefixed `swarmnet_`."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

STAGE_REQUESTS = Counter(
    "swarmnet_stage_requests_total", "Stage protocol requests served, by kind and outcome", ["kind", "outcome"]
)
STAGE_COMPUTE_SECONDS = Histogram(
    "swarmnet_stage_compute_seconds", "Compute time of one stage call", ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SAMPLES = Counter("swarmnet_stage_samples_total", "Samples computed by this peer", ["kind"])
OPTIMIZER_STEPS = Counter("swarmnet_optimizer_steps_total", "Optimizer steps taken by this peer")
QUEUE_DEPTH = Gauge("swarmnet_stage_queue_depth", "Requests waiting for this peer's compute thread")
THROUGHPUT = Gauge("swarmnet_stage_throughput_samples_per_second", "Measured throughput of this peer")
AVERAGING_ROUNDS = Counter("swarmnet_averaging_rounds_total", "All-reduce rounds of this peer's stage", ["outcome"])
AVERAGING_SECONDS = Histogram(
    "swarmnet_averaging_round_seconds", "Duration of successful all-reduce rounds",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STATE_SYNC_SECONDS = Histogram(
    "swarmnet_state_sync_seconds", "Time to download and load a stage's state", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
)
CHECKPOINTS_SAVED = Counter("swarmnet_checkpoints_saved_total", "Stage checkpoints written by this peer")
ARCHIVED_STEP = Gauge("swarmnet_archive_step", "Step of the archived state of each stage (coordinator)", ["stage"])
SUSPECTED_PEERS = Counter(
    "swarmnet_averaging_suspected_peers_total", "Stage-mates left out of rounds because they did not answer a ping"
)
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
TRAINER_LOSS = Gauge("swarmnet_trainer_loss", "Mean training loss of the last step")
TRAINER_SAMPLES = Counter("swarmnet_trainer_samples_total", "Samples completed by this trainer")
TRAINER_DROPPED = Counter("swarmnet_trainer_microbatches_dropped_total", "Microbatches given up after retries")
TRAINER_RETRIES = Counter("swarmnet_trainer_retries_total", "Stage calls retried, by stage", ["stage"])


def serve_metrics(host: str, port: int | None) -> str | None:
    """Starts the `/metrics` endpoint; returns its host:port, or None when disabled."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    return f"{host}:{bound}"
