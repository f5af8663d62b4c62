"""Robust aggregation (`swarmnet.averaging.robust`, pure, no sockets) and its manifest options."""

from __future__ import annotations

import dataclasses
import math
import tomllib

import pytest
import torch

import swarmnet.averaging.robust as robust
from swarmnet.averaging.robust import ClipOptions, OutlierStreaks, centered_clip, coordinate_median, sum_into
from swarmnet.config import AveragingConfig, RunManifest
from swarmnet.errors import ConfigError
from swarmnet.testing.toml import dump_toml

pytestmark = pytest.mark.timeout(30)

DIM = 4096


def _honest(n: int, seed: int = 0, dim: int = DIM) -> torch.Tensor:
    """n honest means (n, dim): a shared signal plus per-member noise of similar size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)


def _spread(means: torch.Tensor) -> float:
    """Mean distance of honest means to their mean: the scale 'close' is measured in."""
    return float(torch.linalg.vector_norm(means - means.mean(0), dim=1).mean())


def _aggregate(contributions: torch.Tensor, weights, **kwargs):
    result = centered_clip(contributions, weights, **kwargs)
    assert not torch.isnan(result.total).any() and not torch.isnan(result.center).any()
    return result, result.total / sum(weights)


# --- the mean path is the old code ------------------------------------------------------------------


def _old_reduce(terms: list[torch.Tensor]) -> torch.Tensor:
    """The reduction loop of `rounds.Round._reduce_data` before `sum_into` replaced it."""
    total = torch.empty_like(terms[0])
    for k in range(len(terms)):
        if k == 0:
            total.copy_(terms[k])
        else:
            total.add_(terms[k])
    return total


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sum_into_is_bit_identical_to_the_old_reduction_and_to_left_to_right_addition(n):
    terms = [torch.randn(1001, generator=torch.Generator().manual_seed(k)) * 10**k for k in range(n)]
    expected = terms[0].clone()
    for t in terms[1:]:
        expected = expected + t
    out = torch.full((1001,), float("nan"))
    assert sum_into(out, terms) is out
    assert torch.equal(out, _old_reduce(terms)) and torch.equal(out, expected)


def test_mean_aggregation_has_no_clip_options():
    assert ClipOptions.from_config(AveragingConfig()) is None
    config = AveragingConfig(aggregation="centered_clip", clip_multiplier=1.5, clip_iterations=5)
    options = ClipOptions.from_config(config)
    assert options == ClipOptions(multiplier=1.5, iterations=5, outlier_ratio=3.0)


# --- centered clipping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_honest_contributions_give_the_weighted_mean(n):
    means = _honest(n)
    weights = [8.0 * (k + 1) for k in range(n)]
    contributions = means * torch.tensor(weights)[:, None]  # sums over the samples
    result, mean = _aggregate(contributions, weights)
    expected = contributions.sum(0) / sum(weights)
    assert torch.allclose(mean, expected, atol=1e-5, rtol=1e-5)
    assert result.outliers(ClipOptions().outlier_ratio) == []
    assert all(result.used)


@pytest.mark.parametrize("attack", ["scaled", "random", "negated_large"])
def test_one_poisoned_contribution_among_four_ruins_the_mean_but_not_centered_clip(attack):
    honest = _honest(3, seed=1)
    honest_mean = honest.mean(0)
    g = torch.Generator().manual_seed(2)
    bad = {
        "scaled": honest[0] * 1e3,
        "random": 1e3 * torch.randn(DIM, generator=g),
        "negated_large": -100 * honest_mean,
    }[attack]
    contributions = torch.cat([honest[:2], bad[None], honest[2:]])  # the liar is member 2
    plain = contributions.mean(0)
    result, robust_mean = _aggregate(contributions, [1.0] * 4)
    spread = _spread(honest)
    assert float(torch.linalg.vector_norm(plain - honest_mean)) > 20 * spread  # ruined
    assert float(torch.linalg.vector_norm(robust_mean - honest_mean)) < spread  # within the honest spread
    assert result.outliers(ClipOptions().outlier_ratio) == [2]
    assert result.ratios[2] > 10 and max(result.ratios[k] for k in (0, 1, 3)) < 1


def test_the_median_start_resists_even_with_three_members():
    honest = _honest(2, seed=3)
    contributions = torch.stack([honest[0], 1e6 * torch.ones(DIM), honest[1]])
    result, robust_mean = _aggregate(contributions, [1.0, 1.0, 1.0])
    assert float(torch.linalg.vector_norm(robust_mean - honest.mean(0))) < _spread(honest) * 1.5
    assert result.outliers(3.0) == [1]


def test_weights_are_respected_and_sums_become_means():
    means = _honest(4, seed=4)
    for weights in ([1.0, 1.0, 1.0, 1.0], [20.0, 8.0, 12.0, 16.0], [0.5, 3.0, 5.0, 7.0]):
        contributions = means * torch.tensor(weights)[:, None]
        result, mean = _aggregate(contributions, weights)
        expected = (means * torch.tensor(weights)[:, None]).sum(0) / sum(weights)
        assert torch.allclose(mean, expected, atol=1e-5), weights
        # the result has the form of the plain sum: mean × total weight
        assert torch.allclose(result.total, result.center * sum(weights))


def test_a_weight_counts_at_most_twice_the_median_weight_in_the_clipping():
    means = _honest(3, seed=9)
    weights = [1.0, 1.0, 100.0]  # member 2's weight counts as 2
    result, mean = _aggregate(means * torch.tensor(weights)[:, None], weights)
    assert robust.WEIGHT_CAP == 2.0
    assert torch.allclose(mean, (means[0] + means[1] + 2 * means[2]) / 4, atol=1e-5)
    assert torch.allclose(result.total, mean * 102)  # scaled by the weight as claimed


def test_a_poisoned_member_claiming_a_huge_weight_still_moves_the_result_a_bounded_amount():
    honest = _honest(3, seed=5)
    contributions = torch.cat([honest, (1e3 * honest[0])[None] * 1e6])
    weights = [1.0, 1.0, 1.0, 1e6]
    options = ClipOptions()
    result, mean = _aggregate(contributions, weights, options=options)
    # the capped weight (2 of 5) moves the center by at most 0.4 tau per iteration from the median
    start = coordinate_median(contributions / torch.tensor(weights)[:, None])
    assert float(torch.linalg.vector_norm(mean - start)) <= options.iterations * 0.4 * result.tau * (1 + 1e-4)
    plain = contributions.sum(0) / sum(weights)
    assert float(torch.linalg.vector_norm(plain - honest.mean(0))) > 1e3 * _spread(honest)
    assert float(torch.linalg.vector_norm(mean - honest.mean(0))) < 2 * _spread(honest)
    assert result.outliers(options.outlier_ratio) == [3]  # the honest members are not flagged


def test_ignored_members_get_no_weight_but_are_still_judged():
    means = _honest(4, seed=6)
    means[3] += 100.0
    result, mean = _aggregate(means.clone(), [1.0] * 4, ignore={3})
    assert torch.allclose(mean, means[:3].mean(0), atol=1e-5)  # scaled by all 4 weights: the center
    assert result.used == (True, True, True, False)
    assert result.outliers(3.0) == [3]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda d: torch.full((d,), float("nan")), id="nan"),
        pytest.param(lambda d: torch.full((d,), float("inf")), id="inf"),
        pytest.param(lambda d: torch.cat([torch.zeros(d - 1), torch.tensor([float("-inf")])]), id="one-inf"),
        pytest.param(lambda d: torch.full((d,), 3e38), id="float32-max"),
        pytest.param(lambda d: torch.full((d,), -3e38), id="float32-min"),
    ],
)
def test_non_finite_and_huge_contributions_never_produce_nan(bad):
    honest = _honest(3, seed=7, dim=257)
    contributions = torch.cat([honest, bad(257)[None]])
    result, mean = _aggregate(contributions, [1.0] * 4)
    assert torch.isfinite(result.total).all()
    assert float(torch.linalg.vector_norm(mean - honest.mean(0))) < _spread(honest)
    assert result.outliers(3.0) == [3]


def test_degenerate_inputs_stay_finite():
    # a zero-weight member that sends a non-zero sum lies; one that sends zeros is just empty
    honest = _honest(2, seed=8, dim=64)
    contributions = torch.cat([honest, torch.zeros(1, 64), torch.ones(1, 64)])
    result, mean = _aggregate(contributions, [1.0, 1.0, 0.0, 0.0])
    assert result.ratios[2] == 0.0 and result.ratios[3] == math.inf
    assert torch.allclose(mean, honest.mean(0), atol=1e-6)
    # nothing usable: a zero step
    result, _ = _aggregate(torch.full((2, 5), float("nan")), [1.0, 1.0])
    assert torch.equal(result.total, torch.zeros(5)) and result.ratios == (math.inf, math.inf)
    # identical contributions: tau is 0, the result is that value, a different one is an outlier
    same = torch.arange(6.0).repeat(3, 1)
    result, mean = _aggregate(same, [1.0, 1.0, 1.0])
    assert result.tau == 0.0 and torch.equal(mean, same[0]) and result.ratios == (0.0, 0.0, 0.0)
    result, _ = _aggregate(torch.cat([same, same[:1] + 1]), [1.0] * 4)
    assert result.outliers(3.0) == [3]
    # an empty part
    result, _ = _aggregate(torch.zeros(3, 0), [1.0, 2.0, 3.0])
    assert result.total.shape == (0,) and result.ratios == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        centered_clip(torch.zeros(2, 3), [1.0, float("nan")])
    with pytest.raises(ValueError):
        centered_clip(torch.zeros(2, 3), [1.0])


@pytest.mark.parametrize("network", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_coordinate_median_matches_a_sort_across_column_blocks(k, network, monkeypatch):
    monkeypatch.setattr(robust, "MEDIAN_BLOCK", 7)
    monkeypatch.setattr(robust, "SORTING_NETWORK_ROWS", 32 if network else 0)
    rows = torch.randn(k, 30, generator=torch.Generator().manual_seed(k))
    ordered = rows.sort(dim=0).values
    expected = (ordered[(k - 1) // 2] + ordered[k // 2]) / 2
    assert torch.allclose(coordinate_median(rows), expected)


def test_clip_options_are_checked():
    for bad in ({"multiplier": 0.0}, {"iterations": 0}, {"outlier_ratio": -1.0}):
        with pytest.raises(ValueError):
            ClipOptions(**bad)


# --- bans --------------------------------------------------------------------------------------------


def test_a_member_is_banned_after_k_consecutive_outlier_rounds():
    streaks = OutlierStreaks(ban_after=3)
    members = ["a", "b", "c"]
    assert streaks.update(members, {"c"}) == set()
    assert streaks.update(members, {"c"}) == set()
    assert streaks.update(members, set()) == set()  # a clean round resets the streak
    assert streaks.update(members, {"c"}) == set()
    assert streaks.update(["a", "b"], set()) == set()  # a round without c leaves its streak alone
    assert streaks.update(members, {"c"}) == set()
    assert streaks.update(members, {"c", "b"}) == {"c"}
    assert streaks.update(members, {"c"}) == set() and streaks.banned == {"c"}
    never = OutlierStreaks(ban_after=0)
    for _ in range(10):
        assert never.update(members, {"c"}) == set()
    assert never.banned == set()


# --- the manifest options ---------------------------------------------------------------------------


def test_default_aggregation_keeps_the_run_id_and_other_values_change_it():
    plain = RunManifest(name="r")
    assert not {"aggregation", "clip_multiplier", "clip_iterations", "outlier_ratio", "ban_after"} & set(
        plain.to_dict()["averaging"]
    )
    # an explicit default is the same manifest, with the same id
    explicit = RunManifest(name="r", averaging=AveragingConfig(aggregation="mean", clip_multiplier=2.0))
    assert explicit == plain and explicit.run_id == plain.run_id
    ids = {plain.run_id}
    for change in (
        {"aggregation": "centered_clip"},
        {"clip_multiplier": 1.5},
        {"clip_iterations": 5},
        {"outlier_ratio": 4.0},
        {"ban_after": 0},
    ):
        manifest = dataclasses.replace(plain, averaging=dataclasses.replace(plain.averaging, **change))
        loaded = RunManifest.from_dict(tomllib.loads(dump_toml(manifest.to_dict())))
        assert loaded == manifest and loaded.run_id == manifest.run_id
        ids.add(manifest.run_id)
    assert len(ids) == 6


@pytest.mark.parametrize(
    "bad",
    [
        {"aggregation": "median"},
        {"clip_multiplier": 0.0},
        {"clip_iterations": 0},
        {"outlier_ratio": 0.0},
        {"ban_after": -1},
    ],
)
def test_bad_aggregation_options_are_refused(bad):
    with pytest.raises(ConfigError):
        AveragingConfig(**bad)
    with pytest.raises(ConfigError):
        RunManifest.from_dict({"name": "r", "averaging": bad})
