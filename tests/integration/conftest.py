"""Fixtures that start real swarmnet processes on 127.0.0.1 and always reap them."""

from __future__ import annotations

import pytest

from swarmnet.config import DataConfig, ModelConfig, OptimizerConfig, RunManifest, TrainingConfig
from swarmnet.testing.swarm import LocalSwarm


def tiny_manifest(name: str = "tiny", **training) -> RunManifest:
    """A run small enough for a 2-core CI machine: a few ms per microbatch."""
    return RunManifest(
        name=name,
        model=ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32),
        optimizer=OptimizerConfig(lr=3e-3),
        data=DataConfig(max_bytes=400_000),
        training=TrainingConfig(
            **{"num_stages": 2, "microbatch_size": 4, "seq_len": 32, "target_batch_size": 16, "seed": 1, **training}
        ),
    )


@pytest.fixture
def manifest() -> RunManifest:
    return tiny_manifest()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def swarm(manifest, tmp_path, request):
    """A LocalSwarm whose coordinator is running; every process is stopped at teardown, and the
    tails of their logs are printed when the test failed."""
    local = LocalSwarm(manifest, workdir=tmp_path / "swarm")
    try:
        local.start_coordinator()
        yield local
    finally:
        local.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for process in local.processes:
                print(process.describe(lines=30))
