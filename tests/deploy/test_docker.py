"""Checks of docker/ without a Docker engine: hadolint lints every Dockerfile, check-jsonschema
validates every compose file against the Compose Specification, and the two are checked against
each other and the repository (build targets, mounted paths, ports, what the build context sends).
Whether each command exists in the CLI is checked with the other deployment assets, from
`commands.docker_commands()`."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from .commands import (
    ENTRYPOINT,
    Stage,
    built_dockerfile,
    compose_files,
    docker_commands,
    dockerfiles,
    exec_form,
    inherited,
    instructions,
    load_compose,
    stages,
    swarmnet_services,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yml"
TARGETS = {"peer": {31337, 9100}, "coordinator": {31337, 8470}}
"""The role targets of docker/Dockerfile and the ports each exposes."""


def tool(name: str) -> str:
    """An executable of the test environment (next to its Python), else one on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the test extras install it (pip install -e '.[test]')")
    return path


def run(*argv: str | Path) -> None:
    done = subprocess.run(
        [*map(str, argv)], capture_output=True, text=True, timeout=90, cwd=ROOT, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def stage_map(path: Path) -> dict[str, Stage]:
    return {s.name: s for s in stages(path.read_text()) if s.name}


def test_assets_are_there():
    assert DOCKERFILE in dockerfiles(ROOT)
    assert COMPOSE in compose_files(ROOT)


# --- linters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", dockerfiles(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint(dockerfile):
    run(tool("hadolint"), dockerfile)


@pytest.mark.parametrize("compose", compose_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_compose_follows_the_compose_spec(compose):
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose)


# --- the Dockerfile --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_role_targets(target):
    all_stages = stages(DOCKERFILE.read_text())
    stage = stage_map(DOCKERFILE)[target]

    entrypoint = inherited(all_stages, stage, "ENTRYPOINT")
    assert entrypoint is not None and exec_form(entrypoint) == ENTRYPOINT
    assert any(i.keyword == "CMD" for i in stage.instructions), f"target {target} has no CMD of its own"

    user = inherited(all_stages, stage, "USER")
    assert user is not None and user.args.split(":")[0] == "10001", "the images run as uid 10001"

    exposed = {
        int(p.split("/")[0]) for i in stage.instructions if i.keyword == "EXPOSE" for p in i.args.split()
    }
    assert exposed == TARGETS[target]

    (healthcheck,) = [i for i in stage.instructions if i.keyword == "HEALTHCHECK"]
    ports = {int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", healthcheck.args)}
    assert ports and ports <= exposed, f"the {target} healthcheck probes /metrics on an exposed port"


def test_stage_references_resolve():
    """Every FROM names an image with a tag or an earlier stage, for every value of its build args
    (their defaults, and what the compose files pass)."""
    text = DOCKERFILE.read_text()
    all_stages = stages(text)
    args: dict[str, set[str]] = {}
    for ins in instructions(text):
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:  # a global ARG with its default
            key, _, value = ins.args.partition("=")
            args.setdefault(key, set()).add(value.strip('"'))
    for compose in compose_files(ROOT):
        for service in swarmnet_services(ROOT, compose).values():
            build = service.get("build")
            for key, value in (build.get("args", {}) if isinstance(build, dict) else {}).items():
                args.setdefault(key, set()).add(str(value))
    names: set[str] = set()
    for stage in all_stages:
        for key, values in args.items():
            for value in values:
                base = stage.base.replace(f"${{{key}}}", value).replace(f"${key}", value).lower()
                assert "$" not in base, f"FROM {stage.base}: an unknown build arg"
                assert base in names or (":" in base and "/" not in base.split(":")[-1]), (
                    f"FROM {stage.base} with {key}={value}: neither an earlier stage nor a tagged image"
                )
        if stage.name:
            names.add(stage.name)


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    found = []
    for stage in stages(path.read_text()):
        for ins in stage.instructions:
            words = ins.args.split()
            if ins.keyword in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
                operands = [w for w in words if not w.startswith("--")]
                found.append((operands[:-1], operands[-1]))
    return found


def ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore `patterns` leave `path` out of the context (the last match wins; a
    pattern matching a directory matches everything in it)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            result = not negated
    return result


def test_build_context_sends_what_the_dockerfile_copies():
    ignore_file = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies(DOCKERFILE):
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(patterns, PurePosixPath(source).as_posix()), (
                f"COPY {source}: left out by {ignore_file.name}"
            )
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/__init__.py", "benchmarks/results/x.json", "x.key"):
        assert ignored(patterns, heavy), f"{heavy} would be sent to the builder"
    assert ignored(patterns, "swarmnet/__pycache__/config.cpython-311.pyc")


def image_path(path: str) -> Path | None:
    """The repository file an absolute path of the image comes from, through the COPYs (or None)."""
    for sources, dest in copies(DOCKERFILE):
        if len(sources) == 1 and dest.endswith("/") and path.startswith(dest):
            return ROOT / sources[0] / path[len(dest) :]
    return None


def test_commands_name_files_the_image_has():
    """Every /etc/swarmnet/... path a command names (profiles, run manifests) is a repository file
    the image copies; state goes under the volume."""
    commands = docker_commands(ROOT)
    assert {where.split(":")[-1] for where, _ in commands} >= {"peer", "coordinator", "trainer"}
    for where, argv in commands:
        for arg in argv:
            if arg.startswith("/etc/swarmnet/"):
                source = image_path(arg)
                assert source is not None and source.is_file(), f"{where}: {arg} is not in the image"
            elif arg.startswith("/") and not arg.startswith("/var/lib/swarmnet/"):
                pytest.fail(
                    f"{where}: {arg} is neither configuration (/etc/swarmnet) nor state (/var/lib/swarmnet)"
                )


# --- the compose files -----------------------------------------------------------------------------


def targets(compose: Path) -> dict[str, str]:
    """The Dockerfile target each swarmnet service of a compose file runs (its own build's, or
    that of the service building its image)."""
    services = swarmnet_services(ROOT, compose)
    by_image = {s.get("image"): s["build"].get("target") for s in services.values() if "build" in s}
    return {
        name: s.get("build", {}).get("target", by_image.get(s.get("image"))) for name, s in services.items()
    }


@pytest.mark.parametrize("compose", compose_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_swarmnet_services_build_existing_targets(compose):
    services = swarmnet_services(ROOT, compose)
    assert services, "no service runs a swarmnet image"
    for name, target in targets(compose).items():
        service = services[name]
        assert "entrypoint" not in service, f"{name}: commands are arguments of the swarmnet entrypoint"
        assert target is not None, f"{name}: builds no target, nor uses an image a service builds"
        dockerfile = built_dockerfile(compose, service) or DOCKERFILE
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        assert target in stage_map(dockerfile), f"{name}: no `FROM ... AS {target}` in {dockerfile.name}"
        if target != "coordinator":  # the others find the swarm through the coordinator's service name
            assert service["environment"]["SWARMNET_INITIAL_PEERS"] == "http://coordinator:8470"
            assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service, short or long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            found.append((source, rest.split(":")[0]))
        else:
            found.append((volume.get("source", ""), volume["target"]))
    return found


@pytest.mark.parametrize("compose", compose_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_mounts_exist(compose):
    """Bind mounts name files of the repository; named volumes are declared; no two swarmnet
    services share a state volume (it holds each one's identity key)."""
    document = load_compose(compose)
    declared = set(document.get("volumes") or {})
    state_volumes: list[str] = []
    swarmnet = swarmnet_services(ROOT, compose)
    for name, service in document["services"].items():
        for source, target in mounts(service):
            if source.startswith((".", "/")):
                path = (compose.parent / source).resolve()
                assert path.exists(), f"{name}: bind mount {source} does not exist"
                assert ROOT in path.parents, f"{name}: bind mount {source} is outside the repository"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
                if name in swarmnet and target == "/var/lib/swarmnet":
                    state_volumes.append(source)
        command = service.get("command") or ["(the image's CMD)"]
        first = command.split()[0] if isinstance(command, str) else command[0]
        if name in swarmnet and first != "train":  # a trainer keeps no state; peers and coordinators do
            assert "/var/lib/swarmnet" in {t for _, t in mounts(service)}, (
                f"{name}: its identity would not survive"
            )
    assert len(state_volumes) == len(set(state_volumes)), "swarmnet services share a state volume"


def test_prometheus_and_grafana_mount_the_shipped_config():
    services = load_compose(COMPOSE)["services"]

    def bound(service: str) -> dict[str, Path]:
        return {
            target: (DOCKER / source).resolve()
            for source, target in mounts(services[service])
            if source.startswith(".")
        }

    prometheus = bound("prometheus")
    assert prometheus["/etc/prometheus/prometheus.yml"] == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert (
        prometheus["/etc/prometheus/rules"] == ROOT / "deploy" / "prometheus" / "rules"
    )  # rule_files: rules/*.yml
    grafana = bound("grafana")
    assert grafana["/etc/grafana/provisioning"] == ROOT / "deploy" / "grafana" / "provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == ROOT / "deploy" / "grafana" / "dashboards"

    # The shipped Prometheus configuration finds everything through the service named coordinator.
    config = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "coordinator:8470" in config and "coordinator" in services
    assert "8470:8470" in services["coordinator"]["ports"]


def test_gpu_peer_asks_for_a_gpu_and_the_cuda_build():
    gpu = load_compose(COMPOSE)["services"]["gpu-peer"]
    assert gpu["profiles"] == ["gpu"], "the GPU peer starts only with --profile gpu"
    assert gpu["build"]["args"]["BASE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/etc/swarmnet/peers/gpu.toml" in gpu["command"]
