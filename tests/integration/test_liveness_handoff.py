"""Ping and handoff on the all-reduce data plane over real sockets on 127.0.0.1: a live server
answers, a gone one refuses, a stopped one is silent; handoffs are checked before their data is
read, refused with a reason, and the server keeps serving rounds afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from swarmnet.averaging.allreduce import AllReduceServer, Member, all_reduce, hand_off, ping
from swarmnet.averaging.wire import Handoff, send_all, send_message, tune

from .test_allreduce import run, servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NUMEL = 1000


class Target:
    """A stand-in for a stage's averager: takes handoffs of NUMEL values for (run, stage 0, epoch 3)."""

    def __init__(self) -> None:
        self.taken: list[tuple[Handoff, torch.Tensor]] = []

    def check_handoff(self, handoff: Handoff) -> str | None:
        if (handoff.run_id, handoff.stage, handoff.epoch) != ("run", 0, 3):
            return "wrong run, stage or step"
        if handoff.numel != NUMEL:
            return "wrong size"
        return None

    async def accept_handoff(self, handoff: Handoff, tensor: torch.Tensor) -> str | None:
        if not bool(torch.isfinite(tensor).all()):
            return "not finite"
        self.taken.append((handoff, tensor.clone()))
        return None


def handoff(**changes) -> Handoff:
    return Handoff(**{"run_id": "run", "stage": 0, "epoch": 3, "numel": NUMEL, "weight": 8.0, **changes})


def test_ping_tells_live_gone_and_stopped_servers_apart():
    async def main():
        async with servers(1) as (server,):
            assert await ping(server.host, server.port) is None
        assert await ping(server.host, server.port) == "refused"  # closed: nothing listens there

    run(main)

    # A stopped process whose kernel still accepts connections: silent, not refused.
    child = subprocess.Popen(
        [sys.executable, "-c", "import socket,sys,time\ns=socket.create_server(('127.0.0.1',0))\n"
         "print(s.getsockname()[1],flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    try:
        port = int(child.stdout.readline())
        os.killpg(child.pid, signal.SIGSTOP)
        assert run(lambda: ping("127.0.0.1", port, timeout=1.0)) == "silent"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)


def test_handoffs_are_taken_or_refused_with_a_reason_and_rounds_go_on():
    async def main():
        async with servers(2) as pair:
            receiver = pair[0]
            data = torch.arange(NUMEL, dtype=torch.float32)
            assert "no handoffs" in await hand_off(receiver.host, receiver.port, handoff(), data)
            target = Target()
            receiver.handoff_target = target
            assert await hand_off(receiver.host, receiver.port, handoff(), data) is None
            (taken, tensor), = target.taken
            assert taken.weight == 8.0 and torch.equal(tensor, data)
            assert "wrong run" in await hand_off(receiver.host, receiver.port, handoff(epoch=4), data)
            # A huge announced size is refused before a byte of it is read.
            assert "wrong size" in await hand_off(receiver.host, receiver.port, handoff(numel=1 << 40), data)
            bad = data.clone()
            bad[5] = float("nan")
            assert "not finite" in await hand_off(receiver.host, receiver.port, handoff(), bad)
            # A sender that announces the data and dies half-way costs the receiver nothing.
            with socket.create_connection((receiver.host, receiver.port)) as raw:
                tune(raw)
                await send_message(raw, handoff())
                await send_all(raw, data.numpy().tobytes()[:100])
            assert len(target.taken) == 1
            # The server still serves rounds.
            members = [Member(peer_id=f"p{i}", host=s.host, port=s.port) for i, s in enumerate(pair)]
            sums = await asyncio.gather(
                *(all_reduce(s, round_id="r", members=members, my_index=i, tensor=torch.ones(10), weight=1.0, timeout=5.0)
                  for i, s in enumerate(pair))
            )
            assert all(torch.equal(total, torch.full((10,), 2.0)) for total, _ in sums)
            async with asyncio.timeout(10):  # the half-sent handoff is dropped
                while receiver._pending:
                    await asyncio.sleep(0.05)
            assert len(target.taken) == 1

    run(main)


def test_server_without_target_refuses_handoffs_but_answers_pings():
    async def main():
        server = await AllReduceServer.create()
        try:
            assert await ping(server.host, server.port) is None
            assert await hand_off(server.host, server.port, handoff(), torch.zeros(NUMEL)) is not None
        finally:
            await server.close()

    run(main)
