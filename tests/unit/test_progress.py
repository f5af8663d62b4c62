"""Tests of `swarmnet.averaging.progress` (pure, no network)."""

from __future__ import annotations

import pytest

from swarmnet.averaging.progress import (
    ProgressInfo,
    is_behind,
    lagging_peers,
    ready_to_step,
    round_members,
    stage_samples,
)

pytestmark = pytest.mark.timeout(30)


def rec(peer_id: str, epoch: int, samples: int = 0, *, joining: bool = False, expires_at: float = 0.0):
    return ProgressInfo(peer_id=peer_id, epoch=epoch, samples=samples, joining=joining, expires_at=expires_at)


STAGE = (
    rec("a", 5, 100),
    rec("b", 5, 60),
    rec("c", 4, 80),  # lagging: still accumulating for the previous step
    rec("new", 5, 0, joining=True),  # downloading state
)


# --- ProgressInfo ---------------------------------------------------------------------------------


def test_progress_info_is_frozen_and_keyword_only():
    info = rec("a", 1, 2)
    with pytest.raises(AttributeError):
        info.epoch = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ProgressInfo("a", 1, 2)  # type: ignore[misc]
    assert (info.joining, info.expires_at) == (False, 0.0)


@pytest.mark.parametrize("kwargs", [dict(epoch=-1, samples=0), dict(epoch=0, samples=-1)])
def test_progress_info_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        ProgressInfo(peer_id="x", **kwargs)


# --- counting samples -----------------------------------------------------------------------------


def test_stage_samples_counts_non_joining_peers_at_the_epoch():
    assert stage_samples(STAGE, 5) == 160
    assert stage_samples(STAGE, 4) == 80
    assert stage_samples(STAGE, 6) == 0


def test_joining_peer_samples_are_not_counted():
    assert stage_samples([rec("new", 5, 1000, joining=True)], 5) == 0


def test_empty_progress():
    assert stage_samples([], 0) == 0
    assert not ready_to_step([], 0, 1)
    assert round_members([], 0, "me") == ["me"]
    assert lagging_peers([], 3) == []
    assert not is_behind([], 0, "me")


def test_ready_to_step_at_and_above_target():
    assert ready_to_step(STAGE, 5, 160)
    assert ready_to_step(STAGE, 5, 100)
    assert not ready_to_step(STAGE, 5, 161)
    # Lagging peers' samples belong to their own epoch.
    assert not ready_to_step(STAGE, 5, 240)


@pytest.mark.parametrize("target", [0, -5])
def test_ready_to_step_rejects_non_positive_target(target):
    with pytest.raises(ValueError):
        ready_to_step(STAGE, 5, target)


# --- round members --------------------------------------------------------------------------------


def test_round_members_are_sorted_non_joining_peers_at_the_epoch():
    assert round_members(STAGE, 5, "a") == ["a", "b"]


def test_round_members_always_include_me():
    # My own record may be stale, missing or joining: I still average with myself.
    assert round_members(STAGE, 5, "zed") == ["a", "b", "zed"]
    assert round_members(STAGE, 5, "c") == ["a", "b", "c"]
    assert round_members(STAGE, 5, "new") == ["a", "b", "new"]


def test_excluded_peers_are_removed_but_never_me():
    assert round_members(STAGE, 5, "a", excluded={"b"}) == ["a"]
    assert round_members(STAGE, 5, "a", excluded=["a", "b"]) == ["a"]
    assert round_members(STAGE, 5, "a", excluded=("unknown",)) == ["a", "b"]


def test_single_peer_round():
    assert round_members([rec("solo", 0, 10)], 0, "solo") == ["solo"]
    assert ready_to_step([rec("solo", 0, 10)], 0, 10)


# --- lagging and behind ---------------------------------------------------------------------------


def test_lagging_peers_include_joining_ones():
    progress = STAGE + (rec("slow-joiner", 3, 0, joining=True),)
    assert lagging_peers(progress, 5) == ["c", "slow-joiner"]


def test_joining_peer_at_the_epoch_is_not_lagging():
    assert "new" not in lagging_peers(STAGE, 5)


def test_no_one_lags_behind_the_oldest_epoch():
    assert lagging_peers(STAGE, 4) == []


def test_is_behind_when_another_peer_is_ahead():
    assert is_behind(STAGE, 4, "c")
    assert not is_behind(STAGE, 5, "a")


def test_my_own_newer_record_does_not_make_me_behind():
    assert not is_behind([rec("me", 7, 10), rec("a", 5)], 5, "me")


def test_joining_peer_ahead_does_not_make_me_behind():
    # A joining peer holds no trained state: there is nothing to resync from it.
    assert not is_behind([rec("a", 5), rec("new", 9, joining=True)], 5, "a")


# --- duplicate peer ids ---------------------------------------------------------------------------


def test_duplicate_ids_greatest_epoch_wins():
    progress = [rec("a", 6, 5), rec("a", 5, 100), rec("b", 5, 10)]
    assert stage_samples(progress, 5) == 10
    assert stage_samples(progress, 6) == 5
    assert round_members(progress, 5, "b") == ["b"]
    assert lagging_peers(progress, 6) == ["b"]  # "a" is not lagging: its newest record is at 6
    assert is_behind(progress, 5, "b")


def test_duplicate_ids_at_same_epoch_fresher_record_wins():
    progress = [rec("a", 5, 80, expires_at=200.0), rec("a", 5, 30, expires_at=100.0)]
    assert stage_samples(progress, 5) == 80
    progress = [rec("a", 5, 30), rec("a", 5, 80)]  # same expiry: more samples is newer
    assert stage_samples(progress, 5) == 80


def test_duplicate_ids_never_counted_twice():
    progress = [rec("a", 5, 40), rec("a", 5, 40), rec("b", 5, 1)]
    assert stage_samples(progress, 5) == 41
    assert round_members(progress, 5, "b") == ["a", "b"]


def test_stale_joining_record_does_not_hide_a_newer_active_one():
    progress = [rec("a", 4, 0, joining=True), rec("a", 5, 50)]
    assert stage_samples(progress, 5) == 50
    assert lagging_peers(progress, 5) == []


def test_accepts_any_sequence():
    assert stage_samples(tuple(STAGE), 5) == stage_samples(list(STAGE), 5) == 160
