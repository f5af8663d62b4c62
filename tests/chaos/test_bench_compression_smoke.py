"""The compression benchmark runs end to end (`--smoke`: a 4 MiB tensor, 2 repetitions, 2 training
steps per encoding) and writes its result. Only the shape of the result is checked: speed is never
asserted in tests, and neither is a loss difference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(330)]

ROOT = Path(__file__).resolve().parents[2]
ENCODINGS = ("none", "fp16", "int8")


def test_compression_benchmark_smoke(tmp_path):
    out = tmp_path / "compression.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/compression.py", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    keys = {
        "benchmark", "when", "machine", "smoke", "size_mib", "repeats", "throughput", "loss", "total_wall_s",
    }
    assert keys <= result.keys(), keys - result.keys()
    assert result["benchmark"] == "compression" and result["smoke"] and result["repeats"] == 2

    methods = result["throughput"]["methods"]
    assert set(methods) == {"clone", *ENCODINGS}
    for name, row in methods.items():
        for key in ("mb_s", "mb_per_cpu_s", "wall_vs_clone", "cpu_vs_clone"):
            assert math.isfinite(row[key]) and row[key] >= 0, (name, key, row)
        assert len(row["per_repeat_wall_ms (first is warm-up)"]) == 3
        assert len(row["per_repeat_cpu_ms (first is warm-up)"]) == 3
    for name in ENCODINGS:
        row = methods[name]
        for key in ("encode_mb_s", "decode_mb_s", "wire_ratio", "relative_rms_error"):
            assert math.isfinite(row[key]), (name, key, row)
    assert methods["none"]["wire_ratio"] == 1.0 and methods["none"]["max_abs_error"] == 0.0
    assert methods["fp16"]["wire_ratio"] == 0.5
    assert 0.25 < methods["int8"]["wire_ratio"] < 0.26

    loss = result["loss"]
    assert loss["steps"] == 2 and loss["hops_per_tensor"] == 2 and loss["none_matches_local_trainer"]
    assert set(loss["runs"]) == set(ENCODINGS)
    for name in ENCODINGS:
        run = loss["runs"][name]
        for key in ("initial_loss", "final_loss", "final_loss_relative_difference"):
            assert math.isfinite(run[key]), (name, key, run)
        assert math.isfinite(run["max_step_loss_difference"]), (name, run)
        assert len(loss["loss_per_step"][name]) == 2
    assert loss["runs"]["none"]["final_loss_relative_difference"] == 0.0
    assert loss["runs"]["none"]["activation_relative_rms_error"] == 0.0
    none_bytes = loss["runs"]["none"]["inter_stage_wire_bytes_per_microbatch"]
    assert loss["runs"]["int8"]["inter_stage_wire_bytes_per_microbatch"] < none_bytes / 3
