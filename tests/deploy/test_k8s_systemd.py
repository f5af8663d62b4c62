"""deploy/k8s and deploy/systemd: schema-valid, consistent with each other and with the sources they copy.

- every manifest passes `kubernetes-validate --strict` (offline, bundled schemas), the kustomization
  lists them all and builds;
- the ConfigMaps copying the run manifest and the alert rules equal their sources;
- Prometheus finds the swarm through the coordinator Service's /sd, and its config passes promtool;
- the coordinator keeps its identity on a volume claim, the GPU peers ask for a GPU node, every
  container runs as uid 10001 (Prometheus: nobody) with no capabilities and a read-only root;
- the systemd units parse, carry what a service needs, and pass `systemd-analyze verify`.
"""

from __future__ import annotations

import configparser
import importlib.util
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from swarmnet.config import PeerConfig, load_profile
from tests.deploy.commands_k8s import k8s_commands, read_unit, systemd_commands

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
KUSTOMIZATION = K8S / "kustomization.yaml"
COORDINATOR_URL = "http://coordinator.swarmnet.svc:8470"
KUBERNETES_VERSIONS = ("1.30.0", None)  # an older supported release, and the tool's newest
SWARMNET_UID = 10001
UNITS = ("swarmnet-peer.service", "swarmnet-coordinator.service")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


@cache
def resources() -> dict[tuple[str, str], dict]:
    """Every object of deploy/k8s by (kind, name)."""
    found = {}
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def get(kind: str, name: str) -> dict:
    try:
        return resources()[kind, name]
    except KeyError:
        pytest.fail(f"deploy/k8s defines no {kind} {name!r}")


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return found


def workloads() -> list[dict]:
    return [doc for (kind, _), doc in resources().items() if kind in ("Deployment", "StatefulSet", "Job")]


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return found


def env(c: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def mount_of(doc: dict, volume: str) -> dict:
    """The one container mount of `volume` in `doc`'s first container."""
    (found,) = [m for m in pod_spec(doc)["containers"][0]["volumeMounts"] if m["name"] == volume]
    return found


def configmap_volume(doc: dict, configmap: str) -> str:
    """The name of the pod volume holding `configmap`."""
    (found,) = [
        v["name"] for v in pod_spec(doc)["volumes"] if v.get("configMap", {}).get("name") == configmap
    ]
    return found


def load_sync_copies():
    name = "swarmnet_deploy_k8s_sync_copies"
    if name not in sys.modules:  # registered before it runs: its dataclass looks its module up
        spec = importlib.util.spec_from_file_location(name, K8S / "sync_copies.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- schemas and kustomize ------------------------------------------------------------------------


def kubernetes_validate() -> str:
    beside = Path(sys.executable).parent / "kubernetes-validate"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubernetes-validate")
    if found is None:
        pytest.fail(
            "kubernetes-validate is not installed: `.venv/bin/pip install kubernetes-validate` "
            "(it validates offline against bundled Kubernetes schemas)"
        )
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "newest")
def test_manifests_pass_kubernetes_validate_strict(version):
    files = manifest_files()
    assert files, "no manifests under deploy/k8s"
    argv = [kubernetes_validate(), "--strict", *(["-k", version] if version else []), *map(str, files)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # A kind without a schema is only warned about: every object here must have one.
    assert "WARN" not in output and "ERROR" not in output, output
    for kind, name in resources():
        assert f"passed for resource {kind.lower()}/{name} " in output, (
            f"{kind}/{name} not validated:\n{output}"
        )


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert kustomization["namespace"] == "swarmnet"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    assert all(
        doc["metadata"].get("namespace") == "swarmnet"
        for (kind, _), doc in resources().items()
        if kind != "Namespace"
    )


def test_kustomization_builds():
    if kustomize := shutil.which("kustomize"):
        argv = [kustomize, "build", str(K8S)]
    elif kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(done.stdout) if d}
    assert built == set(resources())


# --- copies of files kept elsewhere ---------------------------------------------------------------


def test_configmap_copies_equal_their_sources():
    sync = load_sync_copies()
    assert {c.source for c in sync.COPIES} == {
        "coordinator/runs/demo.toml",
        "deploy/prometheus/rules/swarmnet.yml",
    }
    for copy in sync.COPIES:
        source = (ROOT / copy.source).read_text(encoding="utf-8")
        data = get("ConfigMap", copy.name)["data"]
        assert data[copy.key] == source, (
            f"{copy.target} differs from {copy.source}: run `python deploy/k8s/sync_copies.py`"
        )
        target = (K8S / copy.target).read_text(encoding="utf-8")
        assert target == sync.expected(copy, ROOT), (
            f"{copy.target} was edited by hand: run `python deploy/k8s/sync_copies.py`"
        )


# --- Prometheus -----------------------------------------------------------------------------------


def prometheus_config() -> dict:
    return yaml.safe_load(get("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])


def test_prometheus_discovers_the_swarm_through_the_coordinator_service():
    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    # The alert rules name the jobs of deploy/prometheus/prometheus.yml (up{job="swarmnet-coordinator"}).
    upstream = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert set(jobs) == {job["job_name"] for job in upstream["scrape_configs"]}
    assert [sd["url"] for sd in jobs["swarmnet"]["http_sd_configs"]] == [f"{COORDINATOR_URL}/sd"]
    assert jobs["swarmnet"]["honor_labels"] is True
    (static,) = jobs["swarmnet-coordinator"]["static_configs"]
    assert static["targets"] == ["coordinator.swarmnet.svc:8470"]

    service = get("Service", "coordinator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"libp2p": 31337, "http": 8470}
    labels = pod_spec_labels(get("StatefulSet", "coordinator"))
    assert service["spec"]["selector"].items() <= labels.items()


def pod_spec_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_prometheus_mounts_its_config_and_the_rules_where_the_config_says():
    deployment = get("Deployment", "prometheus")
    prometheus = container(deployment, "prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["args"]
    config_mount = mount_of(deployment, configmap_volume(deployment, "prometheus-config"))
    assert (config_mount["mountPath"], config_mount["subPath"]) == (
        "/etc/prometheus/prometheus.yml",
        "prometheus.yml",
    )
    rules_mount = mount_of(deployment, configmap_volume(deployment, "prometheus-rules"))
    assert prometheus_config()["rule_files"] == [f"{rules_mount['mountPath']}/*.yml"]
    service = get("Service", "prometheus")  # the address deploy/grafana's data source uses
    assert [p["port"] for p in service["spec"]["ports"]] == [9090]


def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "swarmnet.yml").write_text(
        get("ConfigMap", "prometheus-rules")["data"]["swarmnet.yml"], encoding="utf-8"
    )
    config = prometheus_config()
    config["rule_files"] = [str(rules / "*.yml")]  # where the rules ConfigMap is mounted, here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout, done.stdout  # the rules were read and checked too


# --- the coordinator, peers and trainer ---------------------------------------------------------


def test_coordinator_is_a_statefulset_keeping_its_identity_on_a_volume_claim():
    statefulset = get("StatefulSet", "coordinator")
    assert statefulset["spec"]["replicas"] == 1
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert mount_of(statefulset, claim["metadata"]["name"])["mountPath"] == "/var/lib/swarmnet"
    headless = get("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"

    coordinator = container(statefulset, "coordinator")
    argv = coordinator["args"]
    assert argv[0] == "coordinator"
    assert option(argv, "--identity").startswith("/var/lib/swarmnet/")
    assert option(argv, "--archive").startswith("/var/lib/swarmnet/")
    assert (option(argv, "--port"), option(argv, "--http-port")) == ("31337", "8470")
    assert option(argv, "--http-host") == "0.0.0.0"

    run = Path(option(argv, "--run"))
    runs_mount = mount_of(statefulset, configmap_volume(statefulset, "swarmnet-run"))
    assert runs_mount["mountPath"] == str(run.parent) == "/etc/swarmnet/coordinator/runs"
    assert run.name in get("ConfigMap", "swarmnet-run")["data"]

    for probe in ("readinessProbe", "livenessProbe"):
        check = coordinator[probe]["httpGet"]
        assert check["path"] == "/healthz" and port_number(coordinator, check["port"]) == 8470


def peer_deployments() -> list[dict]:
    return [
        doc
        for doc in workloads()
        if doc["kind"] == "Deployment" and pod_spec_labels(doc).get("app.kubernetes.io/component") == "peer"
    ]


def test_gpu_peers_request_a_gpu_on_a_gpu_node():
    deployment = get("Deployment", "peer-gpu")
    assert deployment["spec"]["replicas"] >= 2
    spec = pod_spec(deployment)
    peer = container(deployment, "peer")
    assert (
        str(peer["resources"]["requests"]["nvidia.com/gpu"])
        == str(peer["resources"]["limits"]["nvidia.com/gpu"])
        == "1"
    )
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert peer["image"].endswith("-cuda")


@pytest.mark.parametrize("name", ["peer-gpu", "peer-cpu"])
def test_peers_join_through_the_coordinator_url_and_serve_metrics(name):
    deployment = get("Deployment", name)
    assert deployment in peer_deployments()
    peer = container(deployment, "peer")
    argv = peer["args"]
    assert argv[:3] == ["join", "--stage", "auto"]
    assert env(peer)["SWARMNET_INITIAL_PEERS"] == COORDINATOR_URL
    assert (option(argv, "--metrics-host"), option(argv, "--metrics-port")) == ("0.0.0.0", "9100")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = peer[probe]["httpGet"]
        assert check["path"] == "/metrics" and port_number(peer, check["port"]) == 9100
    data = mount_of(deployment, "data")
    assert option(argv, "--checkpoint-dir").startswith(data["mountPath"] + "/")
    assert "emptyDir" in next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "data")


@pytest.mark.parametrize("name", ["peer-gpu", "peer-cpu"])
def test_peer_profiles_load_and_match_the_pod(name, tmp_path):
    deployment = get("Deployment", name)
    peer = container(deployment, "peer")
    profile = Path(option(peer["args"], "--profile"))
    mount = mount_of(deployment, configmap_volume(deployment, "swarmnet-peer-profiles"))
    assert mount["mountPath"] == str(profile.parent)
    path = tmp_path / profile.name
    path.write_text(get("ConfigMap", "swarmnet-peer-profiles")["data"][profile.name], encoding="utf-8")
    config = load_profile(PeerConfig, path)
    assert config.averaging_port == port_number(peer, "averaging")
    assert config.device == ("cuda" if name == "peer-gpu" else "cpu")
    # The peer drains within leave_timeout after SIGTERM; Kubernetes must wait that long.
    assert config.leave_timeout < pod_spec(deployment)["terminationGracePeriodSeconds"]


def test_trainer_is_a_job_retrying_on_failure():
    job = get("Job", "trainer")
    assert job["spec"]["backoffLimit"] >= 1
    assert pod_spec(job)["restartPolicy"] == "OnFailure"
    trainer = container(job, "trainer")
    argv = trainer["args"]
    assert argv[0] == "train" and option(argv, "--max-steps") == "1000"
    assert env(trainer)["SWARMNET_INITIAL_PEERS"] == COORDINATOR_URL


def test_every_container_runs_unprivileged():
    for doc in workloads():
        spec = pod_spec(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        swarmnet = any(c["image"].startswith("swarmnet/") for c in spec["containers"])
        if swarmnet:
            assert spec["securityContext"]["runAsUser"] == SWARMNET_UID, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            if swarmnet:  # p2pd's control sockets and torch's caches need a writable /tmp
                assert "/tmp" in [m["mountPath"] for m in c["volumeMounts"]], where


# --- systemd --------------------------------------------------------------------------------------


def parse_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(encoding="utf-8"), source=name)
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_has_what_a_service_needs(name):
    unit = parse_unit(name)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    for key in (
        "ExecStart",
        "User",
        "Restart",
        "StateDirectory",
        "TimeoutStopSec",
        "NoNewPrivileges",
        "ProtectSystem",
    ):
        assert service.get(key), f"{name}: no {key}="
    assert service["User"] == "swarmnet"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "swarmnet"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/swarmnet" in service["ReadWritePaths"].split()
    # SIGTERM to swarmnet only (its p2pd child stays up while it drains), and time to drain.
    assert (service["KillSignal"], service["KillMode"]) == ("SIGTERM", "mixed")
    leave_timeout = load_profile(PeerConfig, ROOT / "peers" / "gpu.toml").leave_timeout
    assert int(service["TimeoutStopSec"]) > leave_timeout
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Our own reader (joining backslash continuations as systemd does) sees the same keys.
    assert {key for section, key, _ in read_unit(SYSTEMD / name) if section == "Service"} == set(service)


def test_peer_unit_reads_initial_peers_from_its_env_file():
    service = parse_unit("swarmnet-peer.service")["Service"]
    assert service["EnvironmentFile"] == "-/etc/swarmnet/peer.env"
    example = (SYSTEMD / "peer.env.example").read_text(encoding="utf-8")
    assert any(line.startswith("SWARMNET_INITIAL_PEERS=http") for line in example.splitlines())


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's executable exists: point it at a stand-in.
    standin = tmp_path / "swarmnet"
    standin.write_text("#!/bin/sh\n", encoding="utf-8")
    standin.chmod(0o755)
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        assert "/opt/swarmnet/venv/bin/swarmnet " in text
        (tmp_path / name).write_text(
            text.replace("/opt/swarmnet/venv/bin/swarmnet ", f"{standin} "), encoding="utf-8"
        )
    done = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in UNITS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Unknown keys and unparsable values are only warned about ("..., ignoring").
    complaints = [line for line in output.splitlines() if any(name in line for name in UNITS)]
    assert not complaints, output


# --- command lines ---------------------------------------------------------------------------------


def test_every_swarmnet_command_line_is_found():
    k8s = dict(k8s_commands(ROOT))
    assert sorted(argv[0] for argv in k8s.values()) == ["coordinator", "join", "join", "train"]
    assert not any("prometheus" in where for where in k8s)
    systemd = dict(systemd_commands(ROOT))
    assert sorted(where.split(":")[0] for where in systemd) == sorted(
        f"deploy/systemd/{name}" for name in UNITS
    )
    assert sorted(argv[0] for argv in systemd.values()) == ["coordinator", "join"]
    peer = systemd["deploy/systemd/swarmnet-peer.service:ExecStart"]
    assert (
        peer[:3] == ["join", "--stage", "auto"]
        and option(peer, "--profile") == "/etc/swarmnet/peers/gpu.toml"
    )
