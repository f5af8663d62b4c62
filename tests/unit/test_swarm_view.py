"""The coordinator's swarm view: built from records, diffed into events, exported and rendered."""

from __future__ import annotations

import dataclasses
import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from swarmnet.config import ModelConfig, MoEConfig, RunManifest
from swarmnet.coordinator.render import render_html, render_text
from swarmnet.coordinator.view import (
    SWARM_METRIC_NAMES,
    SwarmCollector,
    SwarmHistory,
    build_view,
    diff_views,
    sd_targets,
)
from swarmnet.dht.records import SignedRecord, StageServerRecord, TrainerRecord
from swarmnet.pipeline.snapshot import PeerInfo

pytestmark = pytest.mark.timeout(30)

MANIFEST = RunManifest(name="view")


def server(peer: str, stage: int, throughput: float, *, step: int = 3, failed: int = 0, expert: str | None = None):
    record = StageServerRecord(
        stage=stage, throughput=throughput, queue_depth=1, device="cpu", memory_bytes=1, step=step,
        metrics_addr=f"127.0.0.1:{9000 + len(peer)}" if peer != "nometrics" else None, maddrs=[],
        failed_rounds=failed, expert=expert,
    )
    return PeerInfo(peer_id=peer, stage=stage, throughput=throughput, queue_depth=1, step=step), record


def trainer(peer: str, step: int, loss: float, addr: str | None = "127.0.0.1:9500") -> SignedRecord:
    record = TrainerRecord(step=step, loss=loss, samples_per_s=10.0, metrics_addr=addr)
    return SignedRecord(key="k", peer_id=peer, expiration=0.0, record=record)


def view(stages, trainers=(), leaving=(), at=100.0, manifest=MANIFEST, experts=None):
    return build_view(manifest, stages=stages, experts=experts or {}, trainers=trainers, leaving=leaving, observed_at=at)


def test_bottleneck_capacity_balance_and_global_step():
    v = view([[server("a", 0, 30.0, step=5), server("bb", 0, 20.0, step=4)], [server("ccc", 1, 80.0, step=7)]],
             [trainer("t1", 9, 2.0), trainer("t2", 3, 2.5)])
    assert [s.throughput for s in v.stages] == [50.0, 80.0]
    assert v.bottleneck == 0 and v.capacity == 50.0
    assert v.balance_ratio == pytest.approx(50 / 80)
    assert v.global_step == 5  # stage 0's most advanced peer; stage 1 is further along
    assert v.samples_per_s == 20.0
    assert len(v.peers) == 3


def test_a_stage_without_peers_is_the_bottleneck_and_zeroes_the_balance():
    v = view([[server("a", 0, 30.0)], []])
    assert v.bottleneck == 1 and v.capacity == 0.0 and v.balance_ratio == 0.0
    assert view([[], []]).balance_ratio == 0.0


def test_diff_reports_joins_leaves_vanishings_moves_and_failures():
    before = view([[server("a", 0, 1.0), server("b", 0, 1.0), server("c", 0, 1.0)], [server("d", 1, 1.0)]],
                  [trainer("t1", 4, 2.0), trainer("t2", 4, 2.0)], at=1.0)
    after = view([[server("a", 0, 1.0, failed=2)], [server("c", 1, 1.0)]], [trainer("t1", 5, math.nan)],
                 leaving={"b"}, at=2.0)
    kinds = sorted(e.kind for e in diff_views(before, after))
    assert kinds == ["averaging_failed", "nonfinite_loss", "peer_left", "peer_moved", "peer_vanished", "trainer_vanished"]
    failures = {e.kind for e in diff_views(before, after) if e.failure}
    assert failures == {"averaging_failed", "nonfinite_loss", "peer_vanished", "trainer_vanished"}
    emptied = view([[server("a", 0, 1.0)], []], at=3.0)
    assert [e.kind for e in diff_views(view([[server("a", 0, 1.0)], [server("d", 1, 1.0)]]), emptied)] == [
        "peer_vanished", "stage_empty"
    ]


def test_first_observation_reports_joins_only():
    events = diff_views(None, view([[server("a", 0, 1.0)], []], [trainer("t", 0, math.nan)]))
    assert sorted(e.kind for e in events) == ["peer_joined", "trainer_joined"]  # step 0: no loss yet


def test_history_keeps_one_loss_point_per_trainer_step():
    history = SwarmHistory(points=3)
    for at, step in enumerate([1, 1, 2, 3, 4]):
        history.update(view([[server("a", 0, 1.0)]], [trainer("t", step, 5.0 - step)], at=float(at)))
    latest, points, events = history.snapshot()
    assert [p.step for p in points] == [2, 3, 4] and latest.observed_at == 4.0
    assert [e.kind for e in events] == ["peer_joined", "trainer_joined"]


def test_service_discovery_lists_each_metrics_address_once():
    v = view([[server("a", 0, 1.0), server("nometrics", 0, 1.0)], [server("bb", 1, 1.0)]],
             [trainer("t", 1, 2.0), trainer("t2", 1, 2.0, addr=None)])
    groups = sd_targets(v)
    assert [g["labels"]["role"] for g in groups] == ["peer", "peer", "trainer"]
    assert all(len(g["targets"]) == 1 and g["labels"]["run_id"] == MANIFEST.run_id for g in groups)
    assert sd_targets(None) == []


def moe_manifest():
    return dataclasses.replace(MANIFEST, model=ModelConfig(moe=MoEConfig(layers=(1,), num_experts=2, top_k=1)))


def test_collector_exports_the_swarm_families_and_drops_gone_series():
    manifest = moe_manifest()
    history = SwarmHistory()
    registry = CollectorRegistry()
    registry.register(SwarmCollector(history))
    assert generate_latest(registry) == b""  # nothing observed yet
    experts = {"expert.1.0": [server("e", 2, 500.0, expert="expert.1.0")]}
    history.update(view([[server("a", 0, 10.0)], [server("bb", 1, 20.0)]], [trainer("t", 3, 2.5)],
                        manifest=manifest, experts=experts))
    text = generate_latest(registry).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names == set(SWARM_METRIC_NAMES)
    assert 'swarmnet_swarm_expert_peers{expert="expert.1.1",layer="1"} 0.0' in text
    assert 'swarmnet_swarm_trainer_loss{trainer="t"} 2.5' in text
    assert "swarmnet_swarm_bottleneck_stage 0.0" in text
    history.update(view([[server("a", 0, 10.0)], [server("bb", 1, 20.0)]], [], manifest=manifest))
    assert 'trainer="t"' not in generate_latest(registry).decode()


def test_renderings_show_stages_bottleneck_experts_trainers_and_escape_names():
    manifest = dataclasses.replace(moe_manifest(), name="<b>run</b>")
    v = view([[server("a", 0, 10.0)], []], [trainer("t", 3, 2.5)], manifest=manifest,
             experts={"expert.1.0": [server("e", 2, 5.0, expert="expert.1.0")]})
    text = render_text(v)
    assert [line.split()[0] for line in text.splitlines() if line.endswith("← bottleneck")] == ["1"]
    assert "(no peers)" in text and "expert.1.0" in text and "expert.1.1     (no peers)" in text
    history = SwarmHistory()
    history.update(view([[server("a", 0, 10.0)], [server("bb", 1, 1.0)]], [trainer("t", 2, 3.0)], manifest=manifest, at=1.0))
    history.update(v)
    page = render_html(*history.snapshot())
    assert "<b>run</b>" not in page and "&lt;b&gt;run&lt;/b&gt;" in page
    for element in ('id="summary"', 'id="bottleneck"', 'id="stages"', 'id="experts"', 'id="trainers"',
                    'id="loss-chart"', 'id="failures"', '<polyline class="loss"', 'data-kind="stage_empty"'):
        assert element in page, element
    assert "stage 1 has no peers" in page
    assert "http://" not in page.replace('http-equiv', '')  # no external assets
    assert "Waiting for the first observation" in render_html(None, [], [])
