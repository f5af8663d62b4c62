"""Splitting a flat tensor among the members of an all-reduce group (pure).

Member `i` of `n` owns part `i`: it sums everyone's contribution to that part and sends the sum back
to everyone. Parts are contiguous and differ in size by at most one element, the larger ones first,
so every member derives the same parts from `(total, n)` alone.
"""

from __future__ import annotations


def part_bounds(total: int, n: int) -> list[tuple[int, int]]:
    """`n` contiguous `[start, end)` ranges covering `0..total`, near-equal, larger ones first.

    Parts are empty when `total < n`: `part_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]`.
    """
    if n < 1:
        raise ValueError(f"a group needs at least one member, got n={n}")
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    base, extra = divmod(total, n)
    bounds = []
    start = 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
