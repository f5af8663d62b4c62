"""The shipped manifests and profiles load, and the demo manifest is the embedded default."""

from pathlib import Path

import pytest

from swarmnet.config import PeerConfig, RunManifest, TrainerConfig, load_manifest, load_profile

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[2]


def test_demo_manifest_is_the_embedded_default():
    assert load_manifest(ROOT / "coordinator/runs/demo.toml") == RunManifest(name="demo")


@pytest.mark.parametrize("path", sorted((ROOT / "coordinator/runs").glob("*.toml")), ids=lambda p: p.name)
def test_every_run_manifest_loads(path):
    assert load_manifest(path).run_id


def test_profiles_load():
    assert load_profile(PeerConfig, ROOT / "peers/cpu.toml").device == "cpu"
    assert load_profile(PeerConfig, ROOT / "peers/gpu.toml").device == "cuda"
    assert load_profile(TrainerConfig, ROOT / "peers/trainer.toml").retry.max_attempts == 5
