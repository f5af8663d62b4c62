"""The compute queue (`swarmnet.peer.executor`): per-client order, fairness against a flooding
client, per-client and total caps, and the peer's own calls never refused."""

from __future__ import annotations

import asyncio
import threading

import pytest

from swarmnet.errors import PeerBusyError
from swarmnet.peer.executor import ComputeExecutor


@pytest.mark.timeout(20)
def test_a_flooding_client_does_not_delay_a_newcomer_and_order_per_client_holds():
    async def main() -> list[str]:
        executor = ComputeExecutor(max_queue=64, max_per_client=32)
        gate = threading.Event()
        ran: list[str] = []

        def work(name: str) -> None:
            gate.wait(5)
            ran.append(name)

        try:
            flood = [asyncio.create_task(executor.run(work, f"flood{i}", client="flood")) for i in range(20)]
            await asyncio.sleep(0.05)  # flood0 is running, 19 queued behind it
            honest = [asyncio.create_task(executor.run(work, f"honest{i}", client="honest")) for i in range(2)]
            await asyncio.sleep(0.01)
            gate.set()
            await asyncio.gather(*flood, *honest)
        finally:
            executor.shutdown()
        return ran

    ran = asyncio.run(main())
    assert ran.index("honest0") <= 2 and ran.index("honest1") <= 4, ran  # interleaved, not after 19 floods
    assert [r for r in ran if r.startswith("flood")] == [f"flood{i}" for i in range(20)]
    assert [r for r in ran if r.startswith("honest")] == ["honest0", "honest1"]


@pytest.mark.timeout(20)
def test_caps_refuse_clients_but_never_the_peer_itself():
    async def main() -> None:
        executor = ComputeExecutor(max_queue=6, max_per_client=3)
        gate = threading.Event()
        try:
            held = [asyncio.create_task(executor.run(gate.wait, 5, client="a")) for _ in range(3)]
            await asyncio.sleep(0.02)
            with pytest.raises(PeerBusyError, match="already has 3"):
                await executor.run(gate.wait, 5, client="a")
            held += [asyncio.create_task(executor.run(gate.wait, 5, client=c)) for c in ("b", "b", "c")]
            await asyncio.sleep(0.02)
            with pytest.raises(PeerBusyError, match="queue is full"):
                await executor.run(gate.wait, 5, client="d")
            own = asyncio.create_task(executor.run(lambda: "own"))  # the peer's own call
            await asyncio.sleep(0.02)
            gate.set()
            assert await own == "own"
            await asyncio.gather(*held)
            assert executor.pending == 0 and not executor._per_client
        finally:
            executor.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_a_cancelled_waiting_call_is_skipped_and_errors_propagate():
    async def main() -> None:
        executor = ComputeExecutor(max_queue=8)
        gate = threading.Event()
        try:
            first = asyncio.create_task(executor.run(gate.wait, 5, client="a"))
            second = asyncio.create_task(executor.run(lambda: pytest.fail("cancelled call ran"), client="a"))
            await asyncio.sleep(0.02)
            second.cancel()
            gate.set()
            await first
            with pytest.raises(ZeroDivisionError):
                await executor.run(lambda: 1 / 0, client="a")
            assert await executor.run(lambda: 5) == 5
        finally:
            executor.shutdown()

    asyncio.run(main())
