"""The rebalancing benchmark runs end to end (`--smoke`: a tiny model, two peers, periods of a few
seconds) and writes its result. Only the shape of the result is checked: speed is never asserted in
tests, and neither is when (or whether, in a few seconds on a loaded machine) a peer moves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"benchmark", "when", "machine", "smoke", "run_id", "config", "baseline", "baseline_samples_per_s", "rebalancing"}
REBALANCING_KEYS = {
    "start_on_trainer_clock_s", "per_period", "period_3_ratio", "best_window_within_3_periods",
    "later_periods_samples_per_s", "later_periods_ratio", "first_window_at_goal_ends_s", "all_stages_served_s",
    "moves", "min_moves_needed", "excess_moves", "final_assignment", "final_stage_by_peer",
}


def test_rebalance_benchmark_smoke(tmp_path):
    out, logs = tmp_path / "rebalance.json", tmp_path / "swarm"  # the processes' logs stay there
    done = subprocess.run(
        [sys.executable, "benchmarks/rebalance.py", "--smoke", "--out", str(out), "--workdir", str(logs)],
        cwd=ROOT, capture_output=True, text=True, timeout=290, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["benchmark"] == "rebalance" and result["smoke"]
    config = result["config"]
    assert result["baseline"]["before"]["assignment"] == [1, 1] and config["peers"] == 2
    assert math.isfinite(result["baseline_samples_per_s"]) and result["baseline_samples_per_s"] > 0, result

    rebalancing = result["rebalancing"]
    assert REBALANCING_KEYS <= rebalancing.keys(), REBALANCING_KEYS - rebalancing.keys()
    assert [p["period"] for p in rebalancing["per_period"]] == list(range(1, config["periods"] + 1))
    for period in rebalancing["per_period"]:
        assert period["samples_per_s"] >= 0 and sum(period["assignment_at_end"]) <= config["peers"], period
    assert sum(rebalancing["final_assignment"]) == config["peers"]
    for move in rebalancing["moves"]:  # a move goes from stage 0 (all start there) to the empty stage
        assert {move["from"], move["to"]} == {0, 1} and move["serving_s"] >= move["left_s"], move
    assert (logs / "rebalance" / "events.jsonl").exists()
