"""Observability end to end: a live local swarm (coordinator, two stages with two peers on stage 0,
a MoE expert peer, a trainer), a real Prometheus that finds every process through the coordinator's
HTTP service discovery and loads the shipped alert rules, every Grafana panel's query answered, the
status page rendered by headless Chromium and `swarmnet status` in a terminal."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from swarmnet.config import MoEConfig
from swarmnet.testing.processes import ManagedProcess, swarmnet_command
from swarmnet.testing.swarm import LocalSwarm
from swarmnet.testing.waiting import wait_until

from ..integration.conftest import tiny_manifest
from .dashboard import dashboard_queries

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "swarmnet.json"
# Records refresh every second and expire after 4: a killed peer leaves the view within seconds.
PEER_PROFILE = "progress_period = 0.1\nrebalance_period = 0\nannounce_period = 1.0\nrecord_ttl = 4.0\nleave_timeout = 2.0\n"


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(url: str):
    return json.loads(get(url))


@dataclasses.dataclass
class Live:
    swarm: LocalSwarm
    http: str
    stage_peers: list[ManagedProcess]
    late_peer: ManagedProcess
    expert: ManagedProcess
    trainer: ManagedProcess
    prometheus: str
    workdir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_config(http: str, workdir: Path) -> Path:
    """The shipped prometheus.yml pointed at this swarm's coordinator, scraping every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        for static in job.get("static_configs", []):
            static["targets"] = [http]
        for sd in job.get("http_sd_configs", []):
            sd["url"] = f"http://{http}/sd"
            sd["refresh_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config.get("rule_files", [])]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("observability")
    base = tiny_manifest("observability")
    moe = MoEConfig(layers=(0,), num_experts=1, top_k=1, k_min=1, d_expert=64)
    manifest = dataclasses.replace(base, model=dataclasses.replace(base.model, moe=moe))
    profile = workdir / "peer.toml"
    profile.write_text(PEER_PROFILE)
    swarm = LocalSwarm(manifest, workdir=workdir / "swarm")
    prometheus = None
    log = open(workdir / "prometheus.log", "wb")
    try:
        http = swarm.start_coordinator("--observe-period", "1").ready["http"]
        # Prometheus starts with the swarm: the coordinator's /sd shows it each process as it comes.
        assert shutil.which("prometheus"), "Debian's prometheus is not installed (the set-up installs it)"
        port = _free_port()
        prometheus = subprocess.Popen(
            [
                "prometheus", f"--config.file={_prometheus_config(http, workdir)}",
                f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        starting = [swarm.start_peer(s, "--profile", str(profile), wait=False) for s in (0, 1)]
        starting.append(swarm.start_expert("auto", "--profile", str(profile), wait=False))
        for process in starting:
            process.wait_event("ready", 90)
        *stage_peers, expert = starting
        trainer = swarm.start_trainer("--max-seconds", "600")
        trainer.wait_event("step", 90)
        # Joins a stage that has already stepped: it downloads the state (a state sync), and the
        # stage's two peers average from then on. The tests wait for it where they need it.
        late_peer = swarm.start_peer(0, "--profile", str(profile), wait=False)

        def ready() -> bool:
            assert prometheus.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            try:
                return get(f"{url}/-/ready", timeout=2) is not None
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_until(ready, timeout=60, what="Prometheus to be ready")
        late_peer.wait_event("ready", 90)
        yield Live(swarm, http, stage_peers, late_peer, expert, trainer, url, workdir)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(5)
        log.close()
        swarm.close()


def test_service_discovery_lists_every_process_and_each_serves_metrics(live):
    peers = [*live.stage_peers, live.late_peer, live.expert]
    expected = {p.ready["metrics"] for p in peers} | {live.trainer.ready["metrics"]}

    def listed() -> bool:
        return expected <= {t for group in get_json(f"http://{live.http}/sd") for t in group["targets"]}

    wait_until(listed, timeout=30, what="every peer and the trainer to be listed in /sd")
    groups = {group["targets"][0]: group["labels"] for group in get_json(f"http://{live.http}/sd")}
    assert groups[live.trainer.ready["metrics"]]["role"] == "trainer"
    assert {groups[p.ready["metrics"]]["peer_id"] for p in peers} == {p.ready["peer_id"] for p in peers}

    peer_text = get(f"http://{live.stage_peers[0].ready['metrics']}/metrics").decode()
    for family in ("swarmnet_requests_total", "swarmnet_transferred_bytes_total", "swarmnet_peer_info",
                   "swarmnet_dht_operation_seconds", "swarmnet_dht_known_peers", "swarmnet_optimizer_step"):
        assert family in peer_text
    trainer_text = get(f"http://{live.trainer.ready['metrics']}/metrics").decode()
    assert "swarmnet_trainer_loss" in trainer_text and "swarmnet_trainer_stage_call_seconds_bucket" in trainer_text
    coordinator_text = get(f"http://{live.http}/metrics").decode()
    assert 'swarmnet_swarm_stage_peers{stage="0"}' in coordinator_text

    assert get(f"http://{live.http}/healthz") == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"http://{live.http}/no-such-page")
    assert missing.value.code == 404

    table = subprocess.run(
        swarmnet_command("status", "--initial-peers", *live.swarm.initial_peers),
        capture_output=True, text=True, timeout=60, env=live.swarm.env, check=True,
    ).stdout
    for peer in peers:
        assert peer.ready["peer_id"][-8:] in table
    assert "expert.0.0" in table and "trainer" in table


def test_every_dashboard_panel_returns_data_and_rules_load(live):
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 20
    empty: list[tuple[str, str]] = []

    def answered() -> bool:
        empty.clear()
        for title, expr in queries:
            body = get_json(f"{live.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert body["status"] == "success", (title, expr, body)
            if not body["data"]["result"]:
                empty.append((title, expr))
        return not empty

    try:
        wait_until(answered, timeout=120, interval=2.0, what="every dashboard query to return data")
    except AssertionError:
        pytest.fail(f"panels without data: {json.dumps(empty, indent=1)}")

    groups = get_json(f"{live.prometheus}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 6
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [a["labels"]["alertname"] for a in get_json(f"{live.prometheus}/api/v1/alerts")["data"]["alerts"]
              if a["state"] == "firing"]
    assert "SwarmnetStageWithoutPeers" not in firing and "SwarmnetNonFiniteLoss" not in firing, firing


def test_status_page_in_headless_chromium(live):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed (the set-up installs it)"
    page = f"http://{live.http}/"
    wait_until(lambda: len(get_json(f"http://{live.http}/api/swarm")["loss"]) >= 2, timeout=60,
               what="two loss points in the coordinator's history")

    live.late_peer.signal(signal.SIGKILL)  # vanishes without leaving: a failure on the page

    def vanished() -> bool:
        return any(e["kind"] == "peer_vanished" for e in get_json(f"http://{live.http}/api/swarm")["events"])

    wait_until(vanished, timeout=30, what="the coordinator to notice the killed peer")

    profile = live.workdir / "chromium"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100", "--hide-scrollbars"]
    screenshot = live.workdir / "status.png"
    # Each browser runs in its own session: its whole process group (renderers, zygote) is ended.
    shooting = subprocess.Popen(
        [*flags, f"--user-data-dir={profile}-shot", f"--screenshot={screenshot}", page],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    dumping = subprocess.Popen(
        [*flags, f"--user-data-dir={profile}-dom", "--dump-dom", page],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        dom, _ = dumping.communicate(timeout=90)
        assert dumping.returncode == 0 and shooting.wait(90) == 0
    finally:
        for browser in (shooting, dumping):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(10)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000

    assert 'id="stages"' in dom and 'id="bottleneck"' in dom and 'id="failures"' in dom and 'id="experts"' in dom
    assert 'data-stage="0"' in dom and 'data-stage="1"' in dom
    for peer in live.stage_peers:
        assert f'data-peer="{peer.ready["peer_id"]}"' in dom
    assert 'id="loss-chart"' in dom and '<polyline class="loss"' in dom
    assert 'class="fail" data-kind="peer_vanished"' in dom
    assert "bottleneck: stage" in dom
