"""The all-reduce data plane over real sockets on 127.0.0.1: exact identical sums, and failures that
reach every member within the timeout (absent member, crash mid-round, SIGKILLed process,
disagreeing member lists), with bad connections refused without disturbing other rounds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

import msgpack
import pytest
import torch

import swarmnet.averaging.rounds as rnd
from swarmnet.averaging import wire
from swarmnet.averaging.allreduce import AllReduceServer, AveragingError, Member, all_reduce
from swarmnet.averaging.wire import Hello, group_digest, hello_transcript
from swarmnet.protocols.codec import to_body
from swarmnet.protocols.framing import ERROR, MESSAGE
from swarmnet.testing.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 3.0
SLACK = 2.0


def run(main):
    """Runs `main()` on a fresh loop; fails on anything the loop reports as unhandled (a task
    destroyed while pending, a future whose exception nobody retrieved)."""
    problems = []
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda loop, context: problems.append(context["message"]))
        result = runner.run(main())
        gc.collect()
        runner.run(asyncio.sleep(0))
    assert not problems, problems
    assert not [t for t in threading.enumerate() if t.name.startswith("swarmnet-allreduce")], (
        "threads outlived rounds"
    )
    return result


@contextlib.asynccontextmanager
async def servers(n: int, **kwargs):
    started = []
    try:
        for _ in range(n):
            started.append(await AllReduceServer.create(**kwargs))
        yield started
    finally:
        for server in started:
            await server.close()


def group(started: list[AllReduceServer]) -> list[Member]:
    return [Member(peer_id=f"peer{i}", host=s.host, port=s.port) for i, s in enumerate(started)]


def reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total + t  # member order, as the owners sum
    return total


def reduce(server, members, index, tensor, *, weight=1.0, timeout=TIMEOUT, round_id="r", out=None):
    return all_reduce(
        server,
        round_id=round_id,
        members=members,
        my_index=index,
        tensor=tensor,
        weight=weight,
        timeout=timeout,
        out=out,
    )


async def timed(coro) -> tuple[object, float]:
    """(result or exception, seconds it took)."""
    start = time.monotonic()
    try:
        return await coro, time.monotonic() - start
    except Exception as e:  # noqa: BLE001 - the outcome under test
        return e, time.monotonic() - start


# --- correct rounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 1001, 2 * wire.CHUNK_ELEMENTS + 3])
def test_sums_are_exact_and_identical_on_every_member(n, numel):
    tensors = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(n)]
    copies = [t.clone() for t in tensors]

    async def main():
        async with servers(n) as started:
            members = group(started)
            return await asyncio.gather(
                *(
                    reduce(started[i], members, i, tensors[i], weight=0.1 * (i + 1), timeout=30)
                    for i in range(n)
                )
            )

    results = run(main)
    expected = reference(tensors)
    expected_weight = 0.1
    for i in range(1, n):
        expected_weight += 0.1 * (i + 1)
    for total, weight in results:
        assert torch.equal(total, expected)
        assert weight == expected_weight
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies)), "an input tensor was modified"


def test_shape_is_kept_and_out_buffer_is_filled():
    tensors = [torch.randn(5, 7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    outs = [torch.full((5, 7), float("nan")) for _ in range(3)]

    async def main():
        async with servers(3) as started:
            members = group(started)
            plain = await asyncio.gather(
                *(reduce(started[i], members, i, tensors[i], round_id="plain") for i in range(3))
            )
            into = await asyncio.gather(
                *(reduce(started[i], members, i, tensors[i], round_id="out", out=outs[i]) for i in range(3))
            )
            return plain, into

    plain, into = run(main)
    expected = reference(tensors)
    for (total, weight), (filled, _), out in zip(plain, into, outs):
        assert total.shape == (5, 7) and torch.equal(total, expected) and weight == 3.0
        assert filled is out and torch.equal(out, expected)


def test_a_round_opened_late_on_one_member_still_completes():
    tensors = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def main():
        async with servers(3) as started:
            members = group(started)

            async def late():
                await asyncio.sleep(0.5)  # the others connect first; the server holds them
                return await reduce(started[2], members, 2, tensors[2])

            return await asyncio.gather(
                *(reduce(started[i], members, i, tensors[i]) for i in range(2)),
                late(),
            )

    for total, weight in run(main):
        assert torch.equal(total, reference(tensors)) and weight == 3.0


def test_invalid_calls_are_refused_before_any_network():
    async def main():
        async with servers(1) as (server,):
            me = [Member(peer_id="a", host=server.host, port=server.port)]
            two = me + [Member(peer_id="b", host=server.host, port=1)]
            call = {"round_id": "r", "weight": 1.0, "timeout": TIMEOUT}
            with pytest.raises(ValueError):
                await all_reduce(server, members=two, my_index=2, tensor=torch.zeros(3), **call)
            with pytest.raises(ValueError):
                await all_reduce(server, members=me + me, my_index=0, tensor=torch.zeros(3), **call)
            with pytest.raises(ValueError):
                await all_reduce(
                    server, members=two, my_index=0, tensor=torch.zeros(3, dtype=torch.float64), **call
                )
            x = torch.zeros(4)
            with pytest.raises(ValueError):
                await all_reduce(server, members=two, my_index=0, tensor=x, out=x, **call)

    run(main)


# --- failures reach every member ---------------------------------------------------------------


def test_member_that_never_shows_up_fails_everyone_within_the_timeout():
    async def main():
        async with servers(3) as started:
            members = group(started)  # member 2's server runs, but it never joins the round
            return await asyncio.gather(
                *(timed(reduce(started[i], members, i, torch.ones(1000))) for i in range(2))
            )

    for outcome, seconds in run(main):
        assert isinstance(outcome, AveragingError), outcome
        assert seconds < TIMEOUT + SLACK


def test_member_without_a_server_fails_everyone_quickly():
    async def main():
        async with servers(2) as started:
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))
                dead_port = unused.getsockname()[1]  # nobody listens there once closed
            members = group(started) + [Member(peer_id="gone", host="127.0.0.1", port=dead_port)]
            return await asyncio.gather(
                *(timed(reduce(started[i], members, i, torch.ones(1000), timeout=10.0)) for i in range(2))
            )

    for outcome, seconds in run(main):
        assert isinstance(outcome, AveragingError), outcome
        assert seconds < 5.0  # a refused connection fails the round at once, not at the timeout


def test_member_crashing_mid_round_fails_everyone_and_nobody_returns_a_partial_sum(monkeypatch):
    victim = 1
    sent_half = threading.Event()
    original = rnd.Round._send_data

    def send_half_then_hang(self, sock, j):  # worker thread of the victim's round
        if self.me != victim:
            return original(self, sock, j)
        start, end = self.bounds[j]
        view = wire.tensor_view(self.flat[start:end])
        sock.sendall(view[: len(view) // 2])
        sent_half.set()
        self._wait(threading.Event())  # until the crash stops this round

    monkeypatch.setattr(rnd.Round, "_send_data", send_half_then_hang)
    numel = 3 * wire.CHUNK_ELEMENTS

    async def main():
        async with servers(3) as started:
            members = group(started)
            calls = [
                asyncio.create_task(timed(reduce(started[i], members, i, torch.ones(numel), timeout=20.0)))
                for i in range(3)
            ]
            try:
                async with asyncio.timeout(10):
                    while not sent_half.is_set():
                        await asyncio.sleep(0.01)
                crash = time.monotonic()
                calls[victim].cancel()  # the victim dies: its task and its server go away
                await started[victim].close()
                survivors = [await calls[i] for i in range(3) if i != victim]
                return survivors, time.monotonic() - crash
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)

    survivors, after_crash = run(main)
    for outcome, _ in survivors:
        assert isinstance(outcome, AveragingError), outcome
    assert after_crash < 5.0  # lost connections fail the round long before its 20 s timeout


def test_different_member_lists_fail_everyone():
    async def main():
        async with servers(3) as started:
            members = group(started)
            other = list(members)
            other[1] = Member(peer_id="someone-else", host=members[1].host, port=members[1].port)
            views = [members, members, other]
            return await asyncio.gather(
                *(timed(reduce(started[i], views[i], i, torch.ones(50))) for i in range(3))
            )

    for outcome, seconds in run(main):
        assert isinstance(outcome, AveragingError), outcome
        assert seconds < TIMEOUT + SLACK


def test_a_server_closed_mid_round_fails_its_round():
    async def main():
        async with servers(2) as started:
            members = group(started)
            call = asyncio.create_task(timed(reduce(started[0], members, 0, torch.ones(10), timeout=30.0)))
            await asyncio.sleep(0.2)
            await started[0].close()
            return await call

    outcome, seconds = run(main)
    assert isinstance(outcome, AveragingError) and seconds < 5.0


# --- the server refuses bad connections without disturbing other rounds ------------------------


async def _raw_hello(
    server: AllReduceServer, hello: Hello
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    payload = msgpack.packb(["Hello", to_body(hello)], use_bin_type=True)
    writer.write(bytes([MESSAGE]) + len(payload).to_bytes(4, "big") + payload)
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> str:
    """'welcome', 'refused: <reason>' or 'closed'."""
    try:
        head = await reader.readexactly(5)
        payload = msgpack.unpackb(await reader.readexactly(int.from_bytes(head[1:], "big")), raw=False)
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    return f"refused: {payload[1]}" if head[0] == ERROR else "welcome"


def test_connections_for_unknown_rounds_are_dropped_while_a_valid_round_succeeds():
    tensors = [torch.randn(5000, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def main():
        async with servers(3, pending_timeout=0.5) as started:
            members = group(started)
            ghost = Hello(round_id="ghost", group=group_digest(members), sender=1, numel=5000, weight=1.0)
            reader, writer = await _raw_hello(started[0], ghost)
            junk_reader, junk_writer = await asyncio.open_connection(started[0].host, started[0].port)
            junk_writer.write(b"\xff" * 64)
            results = await asyncio.gather(*(reduce(started[i], members, i, tensors[i]) for i in range(3)))
            async with asyncio.timeout(5):
                answers = await _answer(reader), await _answer(junk_reader)
            for w in (writer, junk_writer):
                w.close()
            return results, answers

    results, (ghost_answer, junk_answer) = run(main)
    for total, weight in results:
        assert torch.equal(total, reference(tensors)) and weight == 3.0
    assert ghost_answer.startswith("refused") and "round" in ghost_answer
    assert junk_answer in ("closed",) or junk_answer.startswith("refused")


def test_bad_hellos_for_an_open_round_are_refused_one_by_one():
    async def main():
        async with servers(1) as (server,):
            silent = socket.create_server(("127.0.0.1", 0))  # accepts (in the kernel), never answers
            members = [
                Member(peer_id="me", host=server.host, port=server.port),
                Member(peer_id="fake", host="127.0.0.1", port=silent.getsockname()[1]),
            ]
            digest = group_digest(members)
            call = asyncio.create_task(timed(reduce(server, members, 0, torch.ones(10))))
            good = {"round_id": "r", "group": digest, "numel": 10, "weight": 1.0}
            answers = {}
            for name, hello in {
                "self index": Hello(**{**good, "sender": 0}),
                "index out of range": Hello(**{**good, "sender": 7}),
                "wrong size": Hello(**{**good, "sender": 1, "numel": 11}),
                "other group": Hello(**{**good, "sender": 1, "group": "0" * 64}),
                "valid": Hello(**{**good, "sender": 1}),
                "duplicate": Hello(**{**good, "sender": 1}),
            }.items():
                reader, writer = await _raw_hello(server, hello)
                async with asyncio.timeout(5):
                    answers[name] = await _answer(reader)
                if name != "valid":
                    writer.close()
                else:
                    kept = writer
            kept.close()  # the only admitted sender goes away: the round fails
            outcome = await call
            silent.close()
            return answers, outcome

    answers, (outcome, seconds) = run(main)
    assert answers.pop("valid") == "welcome"
    assert all(answer.startswith("refused") for answer in answers.values()), answers
    assert isinstance(outcome, AveragingError) and seconds < TIMEOUT + SLACK


# --- a SIGKILLed process -----------------------------------------------------------------------


def _process_member(index: int, victim: int, numel: int, pipe, results, sent_half) -> None:
    """One member in its own process; the victim stalls after half its first contribution."""
    if index == victim:

        def send_half_then_hang(self, sock, j):
            start, end = self.bounds[j]
            view = wire.tensor_view(self.flat[start:end])
            sock.sendall(view[: len(view) // 2])
            sent_half.set()
            threading.Event().wait()  # stalls until the test SIGKILLs this process

        rnd.Round._send_data = send_half_then_hang

    async def main():
        async with await AllReduceServer.create() as server:
            pipe.send((server.host, server.port))
            members = [Member(peer_id=f"p{i}", host=h, port=p) for i, (h, p) in enumerate(pipe.recv())]
            tensor = torch.full((numel,), float(index))
            start = time.monotonic()
            try:
                await reduce(server, members, index, tensor, round_id="killed", timeout=TIMEOUT_PROCESS)
                results.put((index, "returned", time.monotonic() - start))
            except AveragingError as e:
                results.put((index, f"AveragingError: {e}", time.monotonic() - start))

    asyncio.run(main())


TIMEOUT_PROCESS = 15.0


def test_sigkilled_member_process_fails_the_survivors_within_the_timeout():
    ctx = mp.get_context("spawn")
    victim, numel = 2, 12_500_000  # 50 MB per member
    results, sent_half = ctx.Queue(), ctx.Event()
    pipes, processes = [], []
    try:
        for index in range(3):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_process_member, args=(index, victim, numel, child, results, sent_half), daemon=True
            )
            process.start()
            pipes.append(parent)
            processes.append(process)
        addresses = []
        for pipe in pipes:
            assert pipe.poll(30), "a member process did not start"
            addresses.append(pipe.recv())
        for pipe in pipes:
            pipe.send(addresses)
        assert sent_half.wait(30), "the victim never started sending"
        os.kill(processes[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        outcomes = [results.get(timeout=TIMEOUT_PROCESS + 10) for _ in range(2)]
        after_kill = time.monotonic() - killed
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    wait_until(lambda: not any(p.is_alive() for p in processes), 10, what="member processes to exit")
    assert sorted(index for index, _, _ in outcomes) == [0, 1]
    for _, outcome, seconds in outcomes:
        assert outcome.startswith("AveragingError"), outcome
        assert seconds < TIMEOUT_PROCESS + SLACK
    assert after_kill < TIMEOUT_PROCESS


def test_with_identities_hellos_are_signed_and_an_impersonator_is_refused():
    """Real peers' servers carry their keys: rounds complete with signed hellos, and a hello that
    claims a member's index without that member's signature is refused (the member list and round
    id are public in the DHT, so they prove nothing)."""
    from swarmnet.dht.identity import Identity

    identities = [Identity.ephemeral() for _ in range(3)]
    tensors = [torch.randn(3000, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def main():
        async with servers(3) as started:
            for server, identity in zip(started, identities):
                server.identity = identity
            members = [Member(peer_id=i.peer_id, host=s.host, port=s.port) for i, s in zip(identities, started)]
            forged = Hello(round_id="signed", group=group_digest(members), sender=1, numel=3000, weight=1.0)
            forged = dataclasses.replace(forged, signature=Identity.ephemeral().sign(hello_transcript(forged)))
            reader, writer = await _raw_hello(started[0], forged)  # held until the round opens
            rounds = asyncio.gather(*(reduce(started[i], members, i, tensors[i], round_id="signed") for i in range(3)))
            async with asyncio.timeout(10):
                answer = await _answer(reader)
            writer.close()
            return answer, await rounds

    try:
        answer, results = run(main)
    finally:
        for identity in identities:
            with contextlib.suppress(FileNotFoundError, AttributeError, TypeError):
                identity.path.unlink()
    assert answer.startswith("refused") and "not signed" in answer, answer
    for total, weight in results:
        assert torch.equal(total, reference(tensors)) and weight == 3.0
