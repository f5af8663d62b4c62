"""Parts of an all-reduce: contiguous, covering, near-equal, deterministic."""

from __future__ import annotations

import itertools

import pytest

from swarmnet.averaging.partition import part_bounds

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 10, 11, 1000, 25_000_001])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16])
def test_parts_are_contiguous_cover_everything_and_are_near_equal(total, n):
    bounds = part_bounds(total, n)
    assert len(bounds) == n
    assert bounds[0][0] == 0
    assert bounds[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert all(size >= 0 for size in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_fewer_elements_than_members_leaves_empty_parts():
    assert part_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert part_bounds(0, 3) == [(0, 0), (0, 0), (0, 0)]


def test_examples():
    assert part_bounds(10, 1) == [(0, 10)]
    assert part_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert part_bounds(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]


@pytest.mark.parametrize("total, n", [(10, 0), (10, -1), (-1, 2)])
def test_invalid_arguments_are_refused(total, n):
    with pytest.raises(ValueError):
        part_bounds(total, n)
