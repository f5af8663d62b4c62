"""Centered clipping in real all-reduce rounds over sockets on 127.0.0.1: one member of the group
contributes a poisoned vector; the result stays near the honest mean, identical on every member,
and every other member reports the poisoned one as an outlier."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import REGISTRY

from swarmnet.averaging import wire
from swarmnet.averaging.allreduce import Member, all_reduce_round
from swarmnet.averaging.robust import ClipOptions
from swarmnet.averaging.wire import AveragingError, Hello, group_digest
from tests.integration.test_allreduce import _answer, _raw_hello, group, run, servers, timed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _outliers_counted(peer: str) -> float:
    return REGISTRY.get_sample_value("swarmnet_averaging_outliers_total", {"peer": peer}) or 0.0


@pytest.mark.parametrize(
    ("n", "numel"),
    [
        pytest.param(4, 10_007, id="4-members"),
        pytest.param(3, 3 * wire.CHUNK_ELEMENTS + 7, id="parts-of-2-chunks"),
    ],
)
def test_centered_clip_resists_a_poisoned_member_and_reports_it(n, numel):
    liar = 1
    g = torch.Generator().manual_seed(n)
    signal = torch.randn(numel, generator=g)
    means = [signal + 0.5 * torch.randn(numel, generator=g) for _ in range(n)]
    weights = [8.0 + 4 * k for k in range(n)]  # sample counts (within 2x of their median)
    sums = [m * w for m, w in zip(means, weights)]
    sums[liar] = 1e3 * torch.randn(numel, generator=g) * weights[liar]
    honest = [k for k in range(n) if k != liar]
    honest_mean = sum(sums[k] for k in honest) / sum(weights[k] for k in honest)
    spread = max(float(torch.linalg.vector_norm(means[k] - honest_mean)) for k in honest)
    options = ClipOptions()

    async def main():
        async with servers(n) as started:
            members = group(started)

            def rounds(round_id, **kwargs):
                return asyncio.gather(
                    *(
                        all_reduce_round(
                            started[i], round_id=round_id, members=members, my_index=i, tensor=sums[i],
                            weight=weights[i], timeout=30, **kwargs,
                        )
                        for i in range(n)
                    )
                )

            plain = await rounds("plain")
            clipped = await rounds("clip", robust=options)
            banned = await rounds("banned", robust=options, ignore={members[liar].peer_id})
            return members, plain, clipped, banned

    liar_id = f"peer{liar}"
    counted = _outliers_counted(liar_id)
    members, plain, clipped, banned = run(main)
    total_weight = sum(weights)
    for results in (plain, clipped, banned):
        assert all(torch.equal(r.total, results[0].total) for r in results)  # identical everywhere
        assert all(r.total_weight == total_weight for r in results)

    def distance(result) -> float:
        return float(torch.linalg.vector_norm(result.total / total_weight - honest_mean))

    assert distance(plain[0]) > 50 * spread  # the mean is ruined
    assert all(r.outliers == {} for r in plain)
    # centered clipping stays among the honest contributions (one liar of three weighs 1/3: a wider margin)
    assert distance(clipped[0]) < spread * (1.0 if n > 3 else 1.5)
    for i, result in enumerate(clipped):
        assert set(result.outliers) == (set() if i == liar else {liar_id})
        assert all(ratio > 10 * options.outlier_ratio for ratio in result.outliers.values())
    # a banned member's contributions get no weight: the honest weighted mean, up to rounding
    assert distance(banned[0]) < 1e-5 * spread * numel**0.5
    assert _outliers_counted(liar_id) - counted == 2 * (n - 1)  # both robust rounds, every other owner


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_hello_with_a_non_finite_weight_is_dropped(weight):
    async def main():
        async with servers(1) as (server,):
            me = Member(peer_id="me", host=server.host, port=server.port)
            members = [me, Member(peer_id="x", host="127.0.0.1", port=1)]
            call = asyncio.create_task(
                timed(
                    all_reduce_round(
                        server, round_id="r", members=members, my_index=0, tensor=torch.ones(10), weight=1.0,
                        timeout=2.0, robust=ClipOptions(),
                    )
                )
            )
            hello = Hello(round_id="r", group=group_digest(members), sender=1, numel=10, weight=weight)
            reader, writer = await _raw_hello(server, hello)
            async with asyncio.timeout(5):
                answer = await _answer(reader)
            writer.close()
            return answer, await call

    answer, (outcome, _) = run(main)
    assert answer == "closed"  # the codec refuses non-finite floats: centered_clip's weights are finite
    assert isinstance(outcome, AveragingError)
