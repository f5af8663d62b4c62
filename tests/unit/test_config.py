"""Configuration dataclasses: defaults, TOML round trip, the run id as a content hash, strict loading."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from swarmnet.config import (
    DataConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    PeerConfig,
    RetryConfig,
    RunManifest,
    TrainerConfig,
    TrainingConfig,
    load_manifest,
    load_profile,
)
from swarmnet.errors import ConfigError
from swarmnet.testing.toml import dump_toml

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
DEMO_MANIFEST = REPO / "coordinator" / "runs" / "demo.toml"


def _manifest() -> RunManifest:
    """A manifest where every section differs from the defaults (floats with exponents included)."""
    return RunManifest(
        name="round trip",
        model=ModelConfig(vocab_size=256, d_model=48, n_layers=3, n_heads=3, d_ff=96, max_seq_len=32),
        optimizer=OptimizerConfig(name="sgd", lr=1e-05, betas=(0.8, 0.99), weight_decay=0.125, momentum=0.5),
        data=DataConfig(source="/srv/text", max_bytes=12345, holdout_fraction=0.1),
        training=TrainingConfig(num_stages=3, microbatch_size=4, seq_len=16, target_batch_size=12, seed=7),
    )


def _toml_round_trip(manifest: RunManifest) -> RunManifest:
    return RunManifest.from_dict(tomllib.loads(dump_toml(manifest.to_dict())))


def _with(manifest: RunManifest, section: str, **changes) -> RunManifest:
    if section == "":
        return dataclasses.replace(manifest, **changes)
    replaced = dataclasses.replace(getattr(manifest, section), **changes)
    return dataclasses.replace(manifest, **{section: replaced})


# --- defaults ---------------------------------------------------------------------------------------


def test_defaults_are_valid():
    manifest = RunManifest(name="defaults")
    assert manifest.training.seq_len <= manifest.model.max_seq_len
    assert manifest.model.d_model % manifest.model.n_heads == 0
    training = manifest.training
    assert manifest.microbatches_per_step * training.microbatch_size == training.target_batch_size
    assert len(manifest.run_id) == 16 and int(manifest.run_id, 16) >= 0
    assert RunManifest.from_dict({"name": "defaults"}) == manifest
    for cls in (PeerConfig, TrainerConfig, RetryConfig):
        cls()  # constructs without arguments


def test_configs_are_frozen():
    manifest = RunManifest(name="frozen")
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.model.d_model = 64  # type: ignore[misc]


@pytest.mark.skipif(not DEMO_MANIFEST.exists(), reason="coordinator/runs/demo.toml does not exist yet")
def test_demo_manifest_loads():
    manifest = load_manifest(DEMO_MANIFEST)
    assert _toml_round_trip(manifest) == manifest


# --- TOML round trip and the run id -----------------------------------------------------------------


def test_toml_round_trip_gives_an_equal_manifest_with_the_same_run_id():
    manifest = _manifest()
    loaded = _toml_round_trip(manifest)
    assert loaded == manifest
    assert loaded.run_id == manifest.run_id
    assert loaded.optimizer.betas == (0.8, 0.99) and isinstance(loaded.optimizer.betas, tuple)


def test_defaults_round_trip_through_toml():
    manifest = RunManifest(name="defaults")
    assert _toml_round_trip(manifest).run_id == manifest.run_id


def test_load_manifest_from_a_file(tmp_path):
    manifest = _manifest()
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(manifest.to_dict()))
    assert load_manifest(path) == manifest


def test_integers_for_floats_are_coerced_and_hash_the_same():
    as_floats = RunManifest.from_dict({"name": "n", "optimizer": {"lr": 1.0, "weight_decay": 0.0}})
    as_ints = RunManifest.from_dict({"name": "n", "optimizer": {"lr": 1, "weight_decay": 0}})
    assert as_ints == as_floats
    assert isinstance(as_ints.optimizer.lr, float)
    assert as_ints.run_id == as_floats.run_id


def test_run_id_is_deterministic():
    assert _manifest().run_id == _manifest().run_id


# One valid change per field of the manifest; `test_every_field_has_a_change` keeps this complete.
FIELD_CHANGES = {
    ("", "name"): "another name",
    ("model", "vocab_size"): 300,
    ("model", "d_model"): 24,
    ("model", "n_layers"): 4,
    ("model", "n_heads"): 6,
    ("model", "d_ff"): 128,
    ("model", "max_seq_len"): 64,
    ("model", "moe"): MoEConfig(layers=(0,), num_experts=2, top_k=1),
    ("optimizer", "name"): "adamw",
    ("optimizer", "lr"): 2e-05,
    ("optimizer", "betas"): (0.8, 0.999),
    ("optimizer", "weight_decay"): 0.25,
    ("optimizer", "momentum"): 0.9,
    ("data", "source"): "stdlib",
    ("data", "max_bytes"): 54321,
    ("data", "holdout_fraction"): 0.2,
    ("training", "num_stages"): 2,
    ("training", "microbatch_size"): 6,
    ("training", "seq_len"): 8,
    ("training", "target_batch_size"): 24,
    ("training", "seed"): 8,
    ("training", "max_staleness"): 1,
}


def test_every_field_has_a_change():
    fields = {("", f.name) for f in dataclasses.fields(RunManifest) if f.name == "name"}
    for section in ("model", "optimizer", "data", "training"):
        cls = type(getattr(_manifest(), section))
        fields |= {(section, f.name) for f in dataclasses.fields(cls)}
    assert set(FIELD_CHANGES) == fields


@pytest.mark.parametrize(("section", "name"), sorted(FIELD_CHANGES), ids=lambda v: v or "top")
def test_run_id_changes_when_any_field_changes(section, name):
    manifest = _manifest()
    changed = _with(manifest, section, **{name: FIELD_CHANGES[section, name]})
    assert changed != manifest
    assert changed.run_id != manifest.run_id
    assert _toml_round_trip(changed).run_id == changed.run_id


# --- strict loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"name": "x", "extra": 1}, id="unknown-top-level-key"),
        pytest.param({"name": "x", "model": {"width": 64}}, id="unknown-model-key"),
        pytest.param({"name": "x", "training": {"batch": 4}}, id="unknown-training-key"),
        pytest.param({"name": "x", "extras": {"a": 1}}, id="unknown-table"),
    ],
)
def test_unknown_keys_raise(data):
    with pytest.raises(ConfigError, match="unknown keys"):
        RunManifest.from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"name": 5}, id="int-for-str"),
        pytest.param({"name": "x", "model": {"d_model": "128"}}, id="str-for-int"),
        pytest.param({"name": "x", "model": {"d_model": 128.0}}, id="float-for-int"),
        pytest.param({"name": "x", "optimizer": {"lr": "fast"}}, id="str-for-float"),
        pytest.param({"name": "x", "optimizer": {"name": 1}}, id="int-for-str-nested"),
        pytest.param({"name": "x", "optimizer": {"betas": 0.9}}, id="scalar-for-tuple"),
        pytest.param({"name": "x", "optimizer": {"betas": ["a", "b"]}}, id="strs-in-tuple"),
        pytest.param({"name": "x", "model": 3}, id="scalar-for-table"),
        pytest.param({"name": "x", "model": [1, 2]}, id="list-for-table"),
        pytest.param({"name": "x", "data": {"source": ["a"]}}, id="list-for-str"),
    ],
)
def test_wrong_types_raise(data):
    with pytest.raises(ConfigError):
        RunManifest.from_dict(data)


@pytest.mark.parametrize(
    ("section", "name"),
    [("model", "d_model"), ("model", "n_layers"), ("training", "seed"), ("training", "microbatch_size")],
)
@pytest.mark.parametrize("value", [True, False])
def test_bools_for_ints_raise(section, name, value):
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", section: {name: value}})


def test_bool_for_float_raises():
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", "optimizer": {"lr": True}})


def test_missing_name_raises():
    with pytest.raises(ConfigError):
        RunManifest.from_dict({})


def test_non_table_manifest_raises():
    with pytest.raises(ConfigError):
        RunManifest.from_dict(["name", "x"])  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [5, 7, 9])
def test_target_batch_size_must_be_a_multiple_of_microbatch_size(target):
    with pytest.raises(ConfigError, match="multiple"):
        RunManifest.from_dict({"name": "x", "training": {"microbatch_size": 4, "target_batch_size": target}})


@pytest.mark.parametrize("target", [0, -4])
def test_target_batch_size_must_be_positive(target):
    # 0 is a "multiple" of every microbatch size, but a run with no samples per step never trains.
    with pytest.raises(ConfigError):
        TrainingConfig(microbatch_size=4, target_batch_size=target)


def test_seq_len_longer_than_max_seq_len_raises():
    with pytest.raises(ConfigError, match="max_seq_len"):
        RunManifest.from_dict({"name": "x", "model": {"max_seq_len": 32}, "training": {"seq_len": 33}})
    RunManifest.from_dict({"name": "x", "model": {"max_seq_len": 32}, "training": {"seq_len": 32}})


def test_d_model_not_divisible_by_heads_raises():
    with pytest.raises(ConfigError, match="divisible"):
        RunManifest.from_dict({"name": "x", "model": {"d_model": 30, "n_heads": 4}})


@pytest.mark.parametrize(
    "model",
    [{"n_heads": 0}, {"n_heads": -4}, {"d_model": 0}, {"n_layers": 0}, {"vocab_size": 0}, {"d_ff": -1}],
    ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()),
)
def test_non_positive_model_sizes_raise(model):
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", "model": model})


@pytest.mark.parametrize("betas", [[0.9], [0.9, 0.95, 0.99]], ids=["one", "three"])
def test_betas_must_have_two_items(betas):
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", "optimizer": {"betas": betas}})


def test_more_stages_than_the_model_can_be_cut_into_raises():
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", "model": {"n_layers": 2}, "training": {"num_stages": 4}})


@pytest.mark.parametrize("optimizer", [{"name": "lion"}, {"lr": 0.0}, {"lr": -1.0}])
def test_invalid_optimizer_raises(optimizer):
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "x", "optimizer": optimizer})


def test_invalid_toml_file_raises_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_manifest(path)
    with pytest.raises(ConfigError, match="not found"):
        load_manifest(tmp_path / "missing.toml")


# --- local profiles ---------------------------------------------------------------------------------


def test_load_profile_applies_overrides_and_ignores_none():
    config = load_profile(PeerConfig, None, device="cpu", port=4242, record_ttl=None, metrics_port=None)
    assert config == dataclasses.replace(PeerConfig(), device="cpu", port=4242)
    assert config.record_ttl == PeerConfig().record_ttl
    assert config.metrics_port == PeerConfig().metrics_port


def test_load_profile_without_file_or_overrides_gives_defaults():
    assert load_profile(PeerConfig, None) == PeerConfig()
    assert load_profile(TrainerConfig, None) == TrainerConfig()


def test_load_profile_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "peer.toml"
    path.write_text('device = "cuda:1"\nport = 7000\nmetrics_port = 9100\n')
    config = load_profile(PeerConfig, path, device="cpu", port=None)
    assert config.device == "cpu"
    assert config.port == 7000
    assert config.metrics_port == 9100


def test_load_profile_nested_table(tmp_path):
    path = tmp_path / "trainer.toml"
    path.write_text("max_steps = 3\n[retry]\nmax_attempts = 2\nbase_delay = 1\n")
    config = load_profile(TrainerConfig, path)
    assert config.max_steps == 3
    assert config.retry == RetryConfig(max_attempts=2, base_delay=1.0)


@pytest.mark.parametrize("overrides", [{"colour": "blue"}, {"port": "80"}, {"port": True}])
def test_load_profile_rejects_bad_overrides(overrides):
    with pytest.raises(ConfigError):
        load_profile(PeerConfig, None, **overrides)


def test_network_table_defaults_keep_the_run_id_and_values_are_checked():
    from swarmnet.config import ConfigError, NetworkConfig

    plain = RunManifest(name="n")
    assert "network" not in plain.to_dict()  # defaults are left out: older runs keep their ids
    int8 = RunManifest(name="n", network=NetworkConfig(compression="int8"))
    assert int8.run_id != plain.run_id and RunManifest.from_dict(int8.to_dict()) == int8
    with pytest.raises(ConfigError, match="compression"):
        NetworkConfig(compression="zstd")
    with pytest.raises(ConfigError):
        NetworkConfig(auto_int8_below_mbps=500.0, auto_fp16_below_mbps=100.0)
