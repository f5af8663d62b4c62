"""The DHT benchmark runs end to end (`--smoke`: 8 nodes, each with its own p2pd, in 2 worker
processes) and writes its result. Success rates are correctness (every record stored is read back
exactly, all subkeys of a shared key included), so they are asserted; speed never is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "benchmark", "when", "machine", "smoke", "peers", "workers", "subkeys_per_stage_key", "store_success_rate",
    "get_success_rate", "p50_get_ms_one_at_a_time", "p50_get_ms_all_at_once", "all_nodes_created_s",
    "routing_ready_s", "routing_table_at_ready", "usage_at_ready", "usage_at_end", "idle_cpu_cores_after_ready", "phases",
    "cpu_s",
}
PHASES = {"1_store_one_at_a_time", "2_get_one_at_a_time", "3_store_all_at_once", "4_get_all_at_once"}


def test_dht_benchmark_smoke(tmp_path):
    out = tmp_path / "dht.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/dht.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["benchmark"] == "dht" and result["smoke"] and result["peers"] == 8 and result["workers"] == 2
    assert result["store_success_rate"] == 1.0 and result["get_success_rate"] == 1.0, result["phases"]
    assert result["routing_ready_s"] is not None and result["routing_table_at_ready"]["min"] >= 5
    assert result["usage_at_end"]["processes"] == {"python": 2, "p2pd": 8}
    assert PHASES == result["phases"].keys()
    for name, phase in result["phases"].items():
        for part in ("unique_key", "stage_key"):
            figures = phase[part]
            assert figures["ops"] > 0 and figures["ok"] == figures["ops"], (name, part, figures)
            assert all(math.isfinite(figures[p]) and figures[p] > 0 for p in ("p50_ms", "p90_ms", "p99_ms"))
        if "get" in name:  # a shared stage key returns every node's subkey
            returned = phase["stage_key_records_returned"]
            assert returned["min"] == returned["max"] == returned["expected"] == 4, returned
