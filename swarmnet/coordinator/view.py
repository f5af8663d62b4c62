"""The swarm as a person (or Prometheus) wants to see it, built from DHT records.

`build_view` is a pure function of the records; `read_view` reads them. `SwarmHistory` turns a
sequence of views into the loss curve and the list of recent events (peers that vanished, stages
left empty, failed averaging rounds, non-finite losses). `SwarmCollector` exports the latest view as
the `swarmnet_swarm_*` Prometheus families, and `sd_targets` lists every live process's metrics
address for Prometheus' HTTP service discovery.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import SignedRecord, StageServerRecord, TrainerRecord
from swarmnet.dht.stages import read_experts, read_stage_and_progress
from swarmnet.models.moe import expert_uid, parse_uid
from swarmnet.pipeline.snapshot import PeerInfo
from swarmnet.telemetry import metrics

HISTORY_POINTS = 720
"""Loss points kept for the status page (an hour at the default 5 s observation period)."""
EVENTS_KEPT = 100


@dataclass(frozen=True, kw_only=True)
class PeerView:
    peer_id: str
    unit: int
    throughput: float
    queue_depth: int
    step: int
    device: str
    metrics_addr: str | None
    failed_rounds: int = 0
    expert: str | None = None


@dataclass(frozen=True, kw_only=True)
class StageView:
    stage: int
    peers: tuple[PeerView, ...]

    @property
    def throughput(self) -> float:
        return sum(p.throughput for p in self.peers)

    @property
    def step(self) -> int:
        return max((p.step for p in self.peers), default=0)


@dataclass(frozen=True, kw_only=True)
class ExpertView:
    uid: str
    layer: int
    peers: tuple[PeerView, ...]


@dataclass(frozen=True, kw_only=True)
class TrainerView:
    peer_id: str
    step: int
    loss: float
    samples_per_s: float
    metrics_addr: str | None


@dataclass(frozen=True, kw_only=True)
class SwarmView:
    run_id: str
    name: str
    observed_at: float
    """Wall-clock time of the observation (seconds since the epoch)."""
    stages: tuple[StageView, ...]
    experts: tuple[ExpertView, ...] = ()
    trainers: tuple[TrainerView, ...] = ()
    leaving: frozenset[str] = field(default_factory=frozenset)
    """Peers that announced they left or are leaving a unit (a disappearance that is not a failure)."""

    @property
    def peers(self) -> list[PeerView]:
        return [p for s in self.stages for p in s.peers] + [p for e in self.experts for p in e.peers]

    @property
    def bottleneck(self) -> int | None:
        """The stage with the least total throughput (a stage without peers has none)."""
        if not self.stages:
            return None
        return min(self.stages, key=lambda s: (s.throughput, s.stage)).stage

    @property
    def capacity(self) -> float:
        """Samples/s the pipeline can carry: its bottleneck stage's throughput."""
        return min((s.throughput for s in self.stages), default=0.0)

    @property
    def balance_ratio(self) -> float:
        """Least over greatest stage throughput: 1 is perfectly balanced, 0 a stage delivers nothing."""
        best = max((s.throughput for s in self.stages), default=0.0)
        return self.capacity / best if best > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        """What the trainers report getting through the swarm."""
        return sum(t.samples_per_s for t in self.trainers)

    @property
    def global_step(self) -> int:
        """The step every served stage has reached."""
        return min((s.step for s in self.stages if s.peers), default=0)

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "observed_at": self.observed_at,
            "bottleneck": self.bottleneck,
            "capacity_samples_per_s": self.capacity,
            "balance_ratio": self.balance_ratio,
            "samples_per_s": self.samples_per_s,
            "global_step": self.global_step,
            "stages": [
                {"stage": s.stage, "throughput": s.throughput, "step": s.step, "peers": [asdict(p) for p in s.peers]}
                for s in self.stages
            ],
            "experts": [{"uid": e.uid, "layer": e.layer, "peers": [asdict(p) for p in e.peers]} for e in self.experts],
            "trainers": [{**asdict(t), "loss": finite_or_none(t.loss)} for t in self.trainers],
        }


def build_view(
    manifest: RunManifest,
    *,
    stages: Sequence[Sequence[tuple[PeerInfo, StageServerRecord]]],
    experts: Mapping[str, Sequence[tuple[PeerInfo, StageServerRecord]]] = {},
    trainers: Iterable[SignedRecord] = (),
    leaving: Iterable[str] = (),
    observed_at: float | None = None,
) -> SwarmView:
    """The view of one observation: `stages[s]` are stage s's live servers, `experts[uid]` an
    expert's, `trainers` the signed trainer records."""
    expert_views = []
    for layer in sorted(manifest.model.moe.layers) if manifest.model.moe else []:
        for index in range(manifest.model.moe.num_experts):
            uid = expert_uid(layer, index)
            expert_views.append(
                ExpertView(uid=uid, layer=layer, peers=tuple(_peer(i, r) for i, r in experts.get(uid, ())))
            )
    trainer_views = [
        TrainerView(
            peer_id=signed.peer_id, step=t.step, loss=t.loss, samples_per_s=t.samples_per_s, metrics_addr=t.metrics_addr
        )
        for signed in trainers
        if isinstance(t := signed.record, TrainerRecord)
    ]
    return SwarmView(
        run_id=manifest.run_id,
        name=manifest.name,
        observed_at=time.time() if observed_at is None else observed_at,
        stages=tuple(StageView(stage=s, peers=tuple(_peer(i, r) for i, r in found)) for s, found in enumerate(stages)),
        experts=tuple(expert_views),
        trainers=tuple(sorted(trainer_views, key=lambda t: t.peer_id)),
        leaving=frozenset(leaving),
    )


def _peer(info: PeerInfo, record: StageServerRecord) -> PeerView:
    return PeerView(
        peer_id=info.peer_id,
        unit=record.stage,
        throughput=info.throughput,
        queue_depth=info.queue_depth,
        step=info.step,
        device=record.device,
        metrics_addr=record.metrics_addr,
        failed_rounds=record.failed_rounds,
        expert=record.expert,
    )


async def read_view(dht: SwarmDHT, manifest: RunManifest) -> SwarmView:
    """One observation of the whole run: every stage, every MoE layer and the trainers."""
    num_stages = manifest.training.num_stages
    layers = sorted(manifest.model.moe.layers) if manifest.model.moe else []
    stage_reads = [read_stage_and_progress(dht, manifest, s) for s in range(num_stages)]
    expert_reads = [read_experts(dht, manifest, layer) for layer in layers]
    results = await asyncio.gather(*stage_reads, *expert_reads, dht.get(keys.trainer_key(manifest.run_id)))
    per_stage = results[:num_stages]
    experts: dict[str, list] = {}
    for found in results[num_stages : num_stages + len(layers)]:
        experts.update(found)
    leaving = {
        signed.peer_id for _, progress in per_stage for signed in progress if signed.record.left or signed.record.leaving
    }
    return build_view(
        manifest,
        stages=[servers for servers, _ in per_stage],
        experts=experts,
        trainers=results[-1],
        leaving=leaving,
    )


# --- history: the loss curve and recent events ----------------------------------------------------


@dataclass(frozen=True)
class SwarmEvent:
    at: float
    kind: str
    """peer_joined, peer_left, peer_moved, peer_vanished, stage_empty, averaging_failed,
    nonfinite_loss, trainer_joined, trainer_vanished."""
    message: str

    @property
    def failure(self) -> bool:
        return self.kind in FAILURES


FAILURES = frozenset({"peer_vanished", "stage_empty", "averaging_failed", "nonfinite_loss", "trainer_vanished"})


@dataclass(frozen=True)
class LossPoint:
    at: float
    trainer: str
    step: int
    loss: float


class SwarmHistory:
    """Consecutive views → loss points and events. Thread-safe: the coordinator's HTTP threads
    read it while its event loop updates it."""

    def __init__(self, *, points: int = HISTORY_POINTS, events: int = EVENTS_KEPT):
        self._lock = threading.Lock()
        self._view: SwarmView | None = None
        self._points: deque[LossPoint] = deque(maxlen=points)
        self._events: deque[SwarmEvent] = deque(maxlen=events)

    def update(self, view: SwarmView) -> list[SwarmEvent]:
        """Records `view`; returns the events it revealed (also counted in `swarmnet_swarm_events_total`)."""
        with self._lock:
            new = diff_views(self._view, view)
            last_steps = {p.trainer: p.step for p in self._points}
            for t in view.trainers:
                if t.step > 0 and last_steps.get(t.peer_id) != t.step:
                    self._points.append(LossPoint(view.observed_at, t.peer_id, t.step, t.loss))
            self._events.extend(new)
            self._view = view
        for event in new:
            metrics.SWARM_EVENTS.labels(event.kind).inc()
        return new

    def snapshot(self) -> tuple[SwarmView | None, list[LossPoint], list[SwarmEvent]]:
        with self._lock:
            return self._view, list(self._points), list(self._events)


def diff_views(before: SwarmView | None, after: SwarmView) -> list[SwarmEvent]:
    """What changed between two observations (pure)."""
    at = after.observed_at
    events: list[SwarmEvent] = []
    old = {p.peer_id: p for p in before.peers} if before else {}
    new = {p.peer_id: p for p in after.peers}
    for pid, peer in new.items():
        where = _where(peer)
        if pid not in old:
            events.append(SwarmEvent(at, "peer_joined", f"peer {short_id(pid)} joined {where}"))
        elif old[pid].unit != peer.unit:
            events.append(SwarmEvent(at, "peer_moved", f"peer {short_id(pid)} moved from {_where(old[pid])} to {where}"))
        if pid in old and peer.failed_rounds > old[pid].failed_rounds:
            n = peer.failed_rounds - old[pid].failed_rounds
            events.append(SwarmEvent(at, "averaging_failed", f"{n} averaging round(s) failed on peer {short_id(pid)} of {where}"))
    for pid, peer in old.items():
        if pid not in new:
            if pid in after.leaving:
                events.append(SwarmEvent(at, "peer_left", f"peer {short_id(pid)} left {_where(peer)}"))
            else:
                events.append(SwarmEvent(at, "peer_vanished", f"peer {short_id(pid)} of {_where(peer)} vanished without leaving"))
    if before is not None:
        for prev, stage in zip(before.stages, after.stages):
            if prev.peers and not stage.peers:
                events.append(SwarmEvent(at, "stage_empty", f"stage {stage.stage} has no peers left"))
    old_trainers = {t.peer_id: t for t in before.trainers} if before else {}
    for t in after.trainers:
        if t.peer_id not in old_trainers:
            events.append(SwarmEvent(at, "trainer_joined", f"trainer {short_id(t.peer_id)} started"))
        previous = old_trainers.get(t.peer_id)
        if t.step > 0 and not math.isfinite(t.loss) and (previous is None or previous.step != t.step):
            events.append(SwarmEvent(at, "nonfinite_loss", f"trainer {short_id(t.peer_id)} reported loss {t.loss} at step {t.step}"))
    gone = set(old_trainers) - {t.peer_id for t in after.trainers}
    for pid in sorted(gone):
        events.append(SwarmEvent(at, "trainer_vanished", f"trainer {short_id(pid)} stopped reporting"))
    return events


def _where(peer: PeerView) -> str:
    return peer.expert if peer.expert else f"stage {peer.unit}"


def short_id(peer_id: str) -> str:
    """The tail of a peer id, as the status page and table show it."""
    return "…" + peer_id[-8:]


def finite_or_none(value: float) -> float | None:
    """`value`, or None for NaN and infinities (JSON has no such numbers)."""
    return value if math.isfinite(value) else None


# --- Prometheus: the swarm families and service discovery -----------------------------------------


SWARM_METRIC_NAMES = (
    "swarmnet_swarm_stage_peers",
    "swarmnet_swarm_stage_throughput_samples_per_second",
    "swarmnet_swarm_stage_step",
    "swarmnet_swarm_expert_peers",
    "swarmnet_swarm_peers",
    "swarmnet_swarm_trainers",
    "swarmnet_swarm_bottleneck_stage",
    "swarmnet_swarm_bottleneck_throughput_samples_per_second",
    "swarmnet_swarm_balance_ratio",
    "swarmnet_swarm_samples_per_second",
    "swarmnet_swarm_global_step",
    "swarmnet_swarm_trainer_loss",
    "swarmnet_swarm_trainer_step",
    "swarmnet_swarm_last_observation_timestamp_seconds",
)
"""Families exported by `SwarmCollector` (the coordinator's view of the swarm)."""


class SwarmCollector:
    """A prometheus_client collector that exports the latest view at scrape time, so series of
    trainers and experts that are gone disappear instead of keeping their last value."""

    def __init__(self, history: SwarmHistory):
        self.history = history

    def describe(self) -> list[Metric]:
        return []  # families depend on the run; collected lazily

    def collect(self) -> Iterator[Metric]:
        view, _, _ = self.history.snapshot()
        if view is None:
            return
        yield from swarm_families(view)


def swarm_families(view: SwarmView) -> list[Metric]:
    def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    peers = gauge("swarmnet_swarm_stage_peers", "Peers serving each stage", ["stage"])
    throughput = gauge(
        "swarmnet_swarm_stage_throughput_samples_per_second", "Announced throughput of each stage (sum over its peers)", ["stage"]
    )
    step = gauge("swarmnet_swarm_stage_step", "Most advanced optimizer step among each stage's peers", ["stage"])
    for s in view.stages:
        peers.add_metric([str(s.stage)], len(s.peers))
        throughput.add_metric([str(s.stage)], s.throughput)
        step.add_metric([str(s.stage)], s.step)
    experts = gauge("swarmnet_swarm_expert_peers", "Peers serving each expert", ["expert", "layer"])
    for e in view.experts:
        experts.add_metric([e.uid, str(parse_uid(e.uid)[0])], len(e.peers))
    loss = gauge("swarmnet_swarm_trainer_loss", "Each trainer's last reported loss", ["trainer"])
    trainer_step = gauge("swarmnet_swarm_trainer_step", "Each trainer's last completed step", ["trainer"])
    for t in view.trainers:
        if t.step > 0:
            loss.add_metric([t.peer_id], t.loss)
        trainer_step.add_metric([t.peer_id], t.step)
    families = [peers, throughput, step, experts, loss, trainer_step]
    bottleneck = view.bottleneck
    for name, doc, value in (
        ("swarmnet_swarm_peers", "Peers serving a stage or an expert", len(view.peers)),
        ("swarmnet_swarm_trainers", "Trainers reporting to the run", len(view.trainers)),
        ("swarmnet_swarm_bottleneck_stage", "The stage with the least throughput", -1 if bottleneck is None else bottleneck),
        ("swarmnet_swarm_bottleneck_throughput_samples_per_second", "Throughput of the bottleneck stage", view.capacity),
        ("swarmnet_swarm_balance_ratio", "Least over greatest stage throughput (0: a stage delivers nothing)", view.balance_ratio),
        ("swarmnet_swarm_samples_per_second", "Samples/s the trainers get through the swarm", view.samples_per_s),
        ("swarmnet_swarm_global_step", "The step every served stage has reached", view.global_step),
        ("swarmnet_swarm_last_observation_timestamp_seconds", "When the coordinator last read the swarm", view.observed_at),
    ):
        family = gauge(name, doc)
        family.add_metric([], value)
        families.append(family)
    return families


def sd_targets(view: SwarmView | None) -> list[dict]:
    """Prometheus HTTP service discovery: one target group per live peer and trainer with a
    metrics address (https://prometheus.io/docs/prometheus/latest/http_sd/)."""
    if view is None:
        return []
    groups, seen = [], set()
    for role, pid, addr in [("peer", p.peer_id, p.metrics_addr) for p in view.peers] + [
        ("trainer", t.peer_id, t.metrics_addr) for t in view.trainers
    ]:
        if addr and addr not in seen:
            seen.add(addr)
            groups.append({"targets": [addr], "labels": {"role": role, "peer_id": pid, "run_id": view.run_id}})
    return groups
