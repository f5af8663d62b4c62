"""Fixtures that start real swarmnet processes on 127.0.0.1 and always reap them."""

from __future__ import annotations

import pytest

from swarmnet.config import RunManifest
from swarmnet.testing.swarm import LocalSwarm, tiny_manifest


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
