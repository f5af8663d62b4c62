"""The WAN emulation kit and the WAN benchmark run end to end (`--smoke`: a tiny model, one short
swarm with every process on its own emulated host). Speed is never asserted; the RTT floor is
checked because it says whether the delay forwarder is in the path at all."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnet.testing import chaos, wan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "benchmark", "when", "machine", "smoke", "link", "emulation_check", "configs", "wan_over_loopback",
    "forwarder_total",
}
ROW_KEYS = {
    "network", "compression", "samples_per_s", "measured_s", "steps_credited", "machine_busy_cores", "forwarder",
    "trainer_call_ms", "peer_launch_to_serving_s",
}


@pytest.fixture(scope="module")
def wan_unavailable() -> str | None:
    return wan.unavailable()


def left_behind(pid: int) -> list[str]:
    """Namespaces still named after process `pid`."""
    return [n for n in chaos.namespaces() if n.startswith(f"{chaos.PREFIX}-{pid}-")]


def test_kit_delays_and_tears_down_even_on_failure(wan_unavailable):
    if wan_unavailable:
        pytest.skip(f"WAN emulation: {wan_unavailable}")
    with pytest.raises(RuntimeError, match="inside the block"), wan.EmulatedWan(2) as net:
        forwarder = net.forwarder
        assert forwarder is not None and forwarder.poll() is None
        measured = net.measure(0, 1, seconds=0.5, pings=5)
        assert measured["rtt_min_ms"] >= 40, measured  # 2 x 25 ms one way: the forwarder is in the path
        assert measured["mbit_s_overall"] > 0, measured
        raise RuntimeError("inside the block")
    assert forwarder.poll() is not None
    assert net.forwarder_stats is not None and net.forwarder_stats["packets"] > 0, net.forwarder_stats
    assert left_behind(os.getpid()) == []


def test_wan_benchmark_smoke(tmp_path, wan_unavailable):
    if wan_unavailable:
        pytest.skip(f"WAN emulation: {wan_unavailable}")
    out, logs = tmp_path / "wan.json", tmp_path / "swarm"
    bench = subprocess.Popen(
        # Delayed parameter updates and a two-step window: the settings the WAN figures recommend.
        [sys.executable, "benchmarks/wan.py", "--smoke", "--staleness", "1", "--max-in-flight", "8",
         "--out", str(out), "--workdir", str(logs)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=220)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
        chaos.cleanup_stale_namespaces()  # its namespaces, were it killed
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert left_behind(bench.pid) == []
    result = json.loads(out.read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["benchmark"] == "wan" and result["smoke"]
    assert result["staleness"] == 1 and result["max_in_flight"] == 8, result
    for direction, measured in result["emulation_check"].items():
        assert measured["rtt_min_ms"] >= 40, (direction, measured)
    (row,) = result["configs"]
    assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
    assert row["network"] == "wan" and row["compression"] == "none" and row["steps_credited"] >= 1, row
    assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0, row
    assert row["forwarder"]["packets"] > 0, row
