"""Per-link compression choice for `network.compression = "auto"` (pure, no sockets)."""

from __future__ import annotations

import pytest

from swarmnet.protocols.links import MIN_SAMPLE_BYTES, LinkEstimate, choose_compression

pytestmark = pytest.mark.timeout(10)

THRESHOLDS = {"fp16_below": 2000.0, "int8_below": 400.0}


def test_fixed_settings_are_kept_whatever_the_link():
    for setting in ("none", "fp16", "int8"):
        for mbps in (None, 1.0, 1e5):
            assert choose_compression(setting, mbps, **THRESHOLDS) == setting


def test_auto_follows_the_measured_bandwidth():
    assert choose_compression("auto", None, **THRESHOLDS) == "none"  # not measured yet
    assert choose_compression("auto", 10_000.0, **THRESHOLDS) == "none"
    assert choose_compression("auto", 2000.0, **THRESHOLDS) == "none"
    assert choose_compression("auto", 1999.0, **THRESHOLDS) == "fp16"
    assert choose_compression("auto", 400.0, **THRESHOLDS) == "fp16"
    assert choose_compression("auto", 100.0, **THRESHOLDS) == "int8"


def test_estimate_ignores_small_transfers_and_averages_the_rest():
    link = LinkEstimate(alpha=0.5)
    link.observe(MIN_SAMPLE_BYTES - 1, 0.001)
    link.observe(10 * MIN_SAMPLE_BYTES, 0.0)
    assert link.mbps is None
    link.observe(12_500_000, 1.0)  # 100 Mbit/s
    assert link.mbps == pytest.approx(100.0)
    link.observe(12_500_000, 0.5)  # 200 Mbit/s
    assert link.mbps == pytest.approx(150.0)
