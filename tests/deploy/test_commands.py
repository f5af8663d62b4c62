"""Every command an image, a compose service, a Kubernetes manifest or a systemd unit runs exists in
the CLI with those flags, and the profiles and run manifests it names exist and load."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from swarmnet.cli import build_parser
from swarmnet.config import PeerConfig, TrainerConfig, load_manifest, load_profile

from .commands import docker_commands
from .commands_k8s import k8s_commands, systemd_commands

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
# Where the images, manifests and units put the repository's profiles and run manifests.
MOUNTS = {"/etc/swarmnet/peers/": ROOT / "peers", "/etc/swarmnet/coordinator/": ROOT / "coordinator"}


def all_commands() -> list[tuple[str, list[str]]]:
    return docker_commands(ROOT) + k8s_commands(ROOT) + systemd_commands(ROOT)


def parse(argv: list[str]):
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"swarmnet {' '.join(argv)}: {error.getvalue().strip()}")


K8S_PROFILES = "/etc/swarmnet/k8s/"
"""Where the Kubernetes peers mount the profiles ConfigMap of deploy/k8s."""


def k8s_config_files() -> dict[str, str]:
    files = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                files.update(doc.get("data") or {})
    return files


def in_repo(path: str, tmp_path: Path) -> Path | None:
    """The file a command names, as the repository (or a Kubernetes ConfigMap) provides it."""
    for prefix, local in MOUNTS.items():
        if path.startswith(prefix):
            return local / path[len(prefix):]
    if path.startswith(K8S_PROFILES) and (text := k8s_config_files().get(path[len(K8S_PROFILES):])) is not None:
        local = tmp_path / Path(path).name
        local.write_text(text)
        return local
    return None


def test_every_asset_runs_swarmnet_somewhere():
    commands = all_commands()
    where = {w.split(":")[0].split("/")[0] for w, _ in commands}
    assert {"docker", "deploy"} <= where, where
    ran = {argv[0] for _, argv in commands}
    assert {"coordinator", "join", "train"} <= ran, ran
    assert any("systemd" in w for w, _ in commands) and any("k8s" in w for w, _ in commands)


@pytest.mark.parametrize("where,argv", all_commands(), ids=[w for w, _ in all_commands()])
def test_command_parses_and_names_existing_files(where, argv, tmp_path):
    args = parse(argv)
    assert args.command == argv[0]
    profile = getattr(args, "profile", None)
    if profile:
        local = in_repo(profile, tmp_path)
        assert local is not None and local.exists(), f"{where}: profile {profile} is not one of peers/"
        load_profile(TrainerConfig if args.command == "train" else PeerConfig, str(local))
    run = getattr(args, "run", None)
    if run:
        local = in_repo(run, tmp_path)
        assert local is not None and local.exists(), f"{where}: run manifest {run} is not in coordinator/"
        load_manifest(str(local))
