"""Chaos tests: real swarms on 127.0.0.1 (or a veth pair) with peers killed, frozen, cut off or
restarted, and every process reaped at the end (see `swarmnet.testing.chaos`)."""

from __future__ import annotations

import pytest

from swarmnet.testing.processes import ManagedProcess
from swarmnet.testing.swarm import LocalSwarm
from swarmnet.testing.waiting import wait_until

from ..integration.conftest import pytest_runtest_makereport, tiny_manifest  # noqa: F401 - the hook is re-exported

PEER_PROFILE = "progress_period = 0.1\nrebalance_period = 0\n"


@pytest.fixture
def manifest():
    return tiny_manifest("chaos")


@pytest.fixture
def peer_profile(tmp_path) -> str:
    path = tmp_path / "peer.toml"
    path.write_text(PEER_PROFILE)
    return str(path)


@pytest.fixture
def make_swarm(manifest, tmp_path, request):
    """Builds LocalSwarms (several, e.g. before and after a full restart, or on a veth address);
    every process of each is stopped at teardown and the logs are printed when the test failed."""
    made: list[LocalSwarm] = []

    def make(**kwargs) -> LocalSwarm:
        kwargs.setdefault("manifest", manifest)
        local = LocalSwarm(workdir=tmp_path / f"swarm{len(made)}", **kwargs)
        made.append(local)
        return local

    try:
        yield make
    finally:
        for local in made:
            local.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for local in made:
                for process in local.processes:
                    print(process.describe(lines=40))


def stepped(peer: ManagedProcess) -> dict[int, str]:
    """epoch -> parameter digest, from the peer's `ready` and `stepped` events."""
    return {
        e["epoch"] if e["event"] == "stepped" else e["step"]: e["digest"]
        for e in list(peer.events)
        if e["event"] in ("stepped", "ready") and "digest" in e
    }


def wait_identical(peers: list[ManagedProcess], at_least: int, timeout: float, *, reconverge: bool = False) -> int:
    """Waits until every peer reported a digest at one common epoch >= at_least; asserts that the
    digests there are equal and returns that epoch. With `reconverge`, epochs where the peers
    differ are skipped (peers cut off from each other may both step alone before they notice and
    reload): it waits for one where they agree again."""

    def common() -> int | None:
        reached = [e for e in set.intersection(*(set(stepped(p)) for p in peers)) if e >= at_least]
        if reconverge:
            reached = [e for e in reached if len({stepped(p)[e] for p in peers}) == 1]
        return max(reached) if reached else None

    epoch = wait_until(common, timeout, what=f"a common epoch >= {at_least} of {[p.name for p in peers]}")
    digests = {p.name: stepped(p)[epoch] for p in peers}
    assert len(set(digests.values())) == 1, digests
    return epoch


def steps(trainer: ManagedProcess) -> list[dict]:
    return [e for e in list(trainer.events) if e.get("event") == "step"]


def wait_steps(trainer: ManagedProcess, more: int, timeout: float) -> int:
    """Waits until the trainer completed `more` steps beyond those it reported so far; returns its
    step count then."""
    target = len(steps(trainer)) + more
    trainer.wait_event(lambda e: e.get("event") == "step" and len(steps(trainer)) >= target, timeout)
    return len(steps(trainer))
