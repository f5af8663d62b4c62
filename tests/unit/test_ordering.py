"""The peer's gradient-call order (`swarmnet.peer.ordering`): calls that arrive out of order are
handed to compute in the trainer's order, a lost predecessor delays its successor only boundedly,
and the bookkeeping stays bounded."""

from __future__ import annotations

import asyncio

import pytest

from swarmnet.peer import ordering
from swarmnet.peer.ordering import CallOrder


async def _call(order: CallOrder, log: list[int], seq: int, after: int, *, client: str = "c", key: str = "k") -> None:
    await order.wait_for(client, key, after)
    log.append(seq)
    order.handed_over(client, key, seq)


@pytest.mark.timeout(10)
def test_calls_arriving_out_of_order_are_handed_over_in_order():
    async def main() -> list[int]:
        order, log = CallOrder(), []
        # Arrival order 3, 1, 2, 0: each names the call sent before it to this peer.
        tasks = [asyncio.create_task(_call(order, log, seq, seq - 1)) for seq in (3, 1, 2)]
        await asyncio.sleep(0)
        assert log == []
        await _call(order, log, 0, -1)
        await asyncio.gather(*tasks)
        return log

    assert asyncio.run(main()) == [0, 1, 2, 3]


@pytest.mark.timeout(10)
def test_other_clients_and_keys_do_not_wait_for_each_other():
    async def main() -> list[int]:
        order, log = CallOrder(wait=60), []
        order.handed_over("a", "k", 4)
        async with asyncio.timeout(1):
            await _call(order, log, 5, 4, client="a")  # its predecessor was handed over
        waiting = asyncio.create_task(_call(order, log, 5, 4, client="b"))  # b's call 4 never was
        await _call(order, log, 9, -1, client="a", key="other")
        await asyncio.sleep(0)
        assert not waiting.done()
        order.handed_over("b", "k", 4)
        await waiting
        return log

    assert asyncio.run(main()) == [5, 9, 5]


@pytest.mark.timeout(10)
def test_a_lost_predecessor_delays_only_boundedly_and_leaves_no_waiter():
    async def main() -> None:
        order = CallOrder(wait=0.05)
        log: list[int] = []
        await _call(order, log, 1, 0)
        assert log == [1]
        assert all(not s.waiters for s in order._sequences.values())

    asyncio.run(main())


def test_bookkeeping_is_bounded():
    order = CallOrder()
    for i in range(ordering.MAX_SEQUENCES + 10):
        order.handed_over(f"client{i}", "k", 0)
    assert len(order._sequences) == ordering.MAX_SEQUENCES
    for seq in range(ordering.MAX_DONE * 3):
        order.handed_over("c", "k", seq)
    sequence = order._sequences[("c", "k")]
    assert len(sequence.done) == ordering.MAX_DONE == len(sequence.order)


def test_calls_without_an_order_never_wait():
    async def main() -> None:
        order = CallOrder(wait=60)
        async with asyncio.timeout(1):
            await order.wait_for("c", "", 3)
            await order.wait_for("c", "k", -1)

    asyncio.run(main())
