"""The churn benchmark runs end to end (`--smoke`: a tiny model, seconds per phase) and writes its
result. Only the shape of the result is checked: speed is never asserted in tests."""

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
    "benchmark", "when", "machine", "run_id", "stages", "peers_per_stage", "kill_every_s", "steady_seconds",
    "churn_seconds", "kills", "steady_samples_per_s", "churn_samples_per_s", "goodput_ratio",
    "steady_dropped_microbatches", "churn_dropped_microbatches", "steady_slowest_microbatch_s",
    "churn_slowest_microbatch_s", "restarted_peer_startup_s", "initial_loss", "final_loss",
}


def test_churn_benchmark_smoke(tmp_path):
    out, logs = tmp_path / "churn.json", tmp_path / "swarm"  # the processes' logs stay there
    done = subprocess.run(
        [sys.executable, "benchmarks/churn.py", "--smoke", "--out", str(out), "--workdir", str(logs)],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["benchmark"] == "churn" and result["kills"] >= 1
    assert len(result["restarted_peer_startup_s"]) == result["kills"]
    assert math.isfinite(result["goodput_ratio"]) and result["goodput_ratio"] > 0, result


def test_scale_benchmark_smoke(tmp_path):
    """The scale simulation (`--smoke`: 100 peers, 30 simulated minutes, no processes) writes its
    result; the real policies cross-check some of its decisions, so a drift fails it."""
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    keys = {"benchmark", "when", "machine", "smoke", "seed", "device_mix", "swarm_paper", "configs", "total_wall_s"}
    assert keys <= result.keys(), keys - result.keys()
    assert result["benchmark"] == "scale" and result["smoke"] and len(result["configs"]) == 1
    (row,) = result["configs"]
    assert {"name", "config", "joins", "leaves", "samples", "lpt_to_upper_bound"} <= row.keys()
    run_keys = {
        "ratio_to_upper_bound", "ratio_to_lpt", "samples_ratio_to_upper_bound", "worst_sample_to_upper_bound",
        "moves", "moves_per_peer_hour", "stages_emptied_by_moves", "verified_decisions", "wall_s",
    }
    for name in ("without_rebalancing", "with_rebalancing"):
        figures = row[name]
        assert run_keys <= figures.keys(), run_keys - figures.keys()
        assert 0 < figures["ratio_to_upper_bound"] <= 1 and math.isfinite(figures["ratio_to_lpt"]), figures
        assert figures["stages_emptied_by_moves"] == 0 and figures["verified_decisions"] > 0, figures
    assert row["without_rebalancing"]["moves"] == 0 < row["with_rebalancing"]["moves"]


def test_stream_benchmark_smoke(tmp_path):
    """The tensor stream benchmark (`--smoke`: a 4 MiB tensor, 2 repetitions, two real p2pd)
    writes its result."""
    out = tmp_path / "stream.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/stream.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    keys = {
        "benchmark", "smoke", "size_mb", "tcp_mb_s", "direct_mb_s", "direct_int8_mb_s", "p2p_mb_s", "p2p_fp16_mb_s",
        "ratio", "ratio_direct_int8", "ratio_p2p", "ratio_p2p_fp16", "tcp_sock_mb_s", "ratio_direct_to_tcp_sock",
        "repeats", "median_s",
        "per_repeat_s (first is warm-up)",
    }
    assert keys <= result.keys(), keys - result.keys()
    assert result["benchmark"] == "stream" and result["smoke"] and result["repeats"] == 2
    for name in ("tcp_mb_s", "direct_mb_s", "direct_int8_mb_s", "p2p_mb_s", "ratio", "ratio_p2p"):
        assert math.isfinite(result[name]) and result[name] > 0, (name, result)
