"""Tensor stream benchmark: one float32 tensor from one peer to another over swarmnet's direct
data plane and over a libp2p stream (`FramedStream` through p2pd), against the same bytes over a
plain asyncio TCP socket, same run.

    python benchmarks/stream.py [--size-mib 64] [--repeats 5] [--smoke]
                                [--out benchmarks/results/stream.json]

One asyncio process holds two `SwarmDHT` hosts (each with its own p2pd on 127.0.0.1, ephemeral
identities), the receiver's data port (an `AllReduceServer` with a `DirectEndpoint`, as on a peer)
and a raw TCP server. Every transfer is timed from opening the stream (or the TCP connection) to
the receiver's small reply, which it sends once the whole tensor has arrived:

- `direct`: `PeerDialer.open` with the receiver's data address, as a trainer calls a peer: a
  stream over an authenticated direct TCP connection (the first one does the handshake, later
  ones reuse the pooled connection), a `BenchRequest` message with the `TensorHeader`,
  `send_tensor` (4 MiB CHUNK frames from the tensor's memory); the receiver reads it with
  `receive_message` + `receive_tensor` (straight into the tensor's buffer);
- `direct_int8`: the same with `compression="int8"` (blockwise 8-bit: 0.254x the bytes, the
  quantization on both sides included); reported as effective tensor MB/s (float32 size / time);
- `p2p`: the same call as a libp2p stream through both p2pds (1 MiB frames), the NAT fallback;
- `p2p_fp16`: that with `compression="fp16"`;
- `tcp`: `asyncio.open_connection`, `writer.write` of 4 MiB memoryview slices + `drain`, the
  receiver's `reader.readexactly` of the whole size, a 1-byte reply. No framing, no encryption.
  The goal's baseline ("plain asyncio TCP"); the ratios are against it;
- `tcp_sock`: a stricter baseline, the same bytes with asyncio's socket calls
  (`loop.sock_sendall` of the whole tensor, `loop.sock_recv_into` straight into a fresh buffer): what the direct data plane does, minus framing, handshake and headers
  (`ratio_direct_to_tcp_sock`).

One warm-up repetition (the first also connects the two hosts), then the median of `--repeats`,
methods in a rotating order. MB = 10^6 bytes. `--smoke`: a 4 MiB tensor, 2 repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swarmnet.averaging.allreduce import AllReduceServer
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.protocols.dial import PeerDialer
from swarmnet.protocols.direct import DirectEndpoint
from swarmnet.protocols.framing import FramedStream, TensorHeader, header_for, serve_stream

PROTOCOL = "/swarmnet/bench-stream/1"
METHODS = ("direct", "direct_int8", "p2p", "p2p_fp16", "tcp", "tcp_sock")
COMPRESSION = {"direct": "none", "direct_int8": "int8", "p2p": "none", "p2p_fp16": "fp16"}
TCP_SLICE_BYTES = 4 * 1024 * 1024
TRANSFER_TIMEOUT = 120.0


@dataclass(frozen=True, kw_only=True)
class BenchRequest:
    tensor: TensorHeader


@dataclass(frozen=True, kw_only=True)
class BenchReply:
    received_bytes: int


class Receiver:
    """The receiving peer's handler: reads one message + tensor, answers with its byte count."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, peer=str(info.peer_id))
        await serve_stream(stream, lambda: self.serve(stream.peer, stream), what="bench-stream")

    async def serve(self, client: str, stream: FramedStream) -> None:
        request = await stream.receive_message(BenchRequest)
        tensor = await stream.receive_tensor(request.tensor, self.max_bytes)
        await stream.send_message(BenchReply(received_bytes=request.tensor.nbytes))
        del tensor


async def send_swarmnet(dialer: PeerDialer, tensor: torch.Tensor, compression: str) -> int:
    header = header_for(tensor, compression)
    stream = await dialer.open(PROTOCOL)
    try:
        await stream.send_message(BenchRequest(tensor=header))
        await stream.send_tensor(tensor, header)
        reply = await stream.receive_message(BenchReply)
        stream.completed()
    finally:
        await stream.close()
    assert reply.received_bytes == header.nbytes, (reply, header.nbytes)
    return reply.received_bytes


async def serve_sock(total: int) -> socket.socket:
    """The lowest-level asyncio baseline: one non-blocking socket per transfer, the whole tensor
    received with `loop.sock_recv_into` straight into a fresh buffer (as a received tensor is),
    a 1-byte reply."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            buffer = memoryview(bytearray(total))
            with conn:
                got = 0
                while got < total:
                    count = await loop.sock_recv_into(conn, buffer[got:])
                    if not count:
                        break
                    got += count
                await loop.sock_sendall(conn, b"\x01")

    return listener, asyncio.create_task(accept())


async def send_sock(port: int, data: memoryview) -> int:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        assert await loop.sock_recv(sock, 1) == b"\x01"
    return len(data)


async def serve_tcp(total: int):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(total)
            writer.write(b"\x01")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def send_tcp(port: int, data: memoryview) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for offset in range(0, len(data), TCP_SLICE_BYTES):
            writer.write(data[offset : offset + TCP_SLICE_BYTES])
            await writer.drain()
        assert await reader.readexactly(1) == b"\x01"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return len(data)


async def run(size_bytes: int, repeats: int) -> dict:
    tensor = torch.randn(size_bytes // 4, generator=torch.Generator().manual_seed(0))
    raw = memoryview(tensor.numpy()).cast("B")
    identities = [Identity.ephemeral(), Identity.ephemeral()]
    hosts: list[SwarmDHT] = []
    tcp = data_port = sock_task = sock_listener = None
    try:
        started = time.perf_counter()
        receiver = await SwarmDHT.create(identity=identities[0], host="127.0.0.1")
        hosts.append(receiver)
        maddrs = await receiver.visible_maddrs()
        sender = await SwarmDHT.create(identity=identities[1], initial_peers=maddrs, host="127.0.0.1")
        hosts.append(sender)
        setup_s = time.perf_counter() - started
        bench = Receiver(size_bytes)
        await receiver.p2p.add_binary_stream_handler(PROTOCOL, bench.handle)
        data_port = await AllReduceServer.create()
        data_port.direct = DirectEndpoint(identities[0])
        data_port.direct.add(PROTOCOL, FramedStream, bench.serve, what="bench-stream")
        dialers = {
            "direct": PeerDialer(
                sender.p2p, receiver.peer_id, maddrs, data_addr=f"127.0.0.1:{data_port.port}", direct=sender.direct
            ),
            "p2p": PeerDialer(sender.p2p, receiver.peer_id, maddrs),
        }
        tcp = await serve_tcp(size_bytes)
        port = tcp.sockets[0].getsockname()[1]
        sock_listener, sock_task = await serve_sock(size_bytes)
        sock_port = sock_listener.getsockname()[1]

        async def transfer(method: str) -> int:
            if method == "tcp_sock":
                return await send_sock(sock_port, raw)
            if method == "tcp":
                return await send_tcp(port, raw)
            return await send_swarmnet(dialers[method.split("_")[0]], tensor, COMPRESSION[method])

        times: dict[str, list[float]] = {m: [] for m in METHODS}
        wire: dict[str, int] = {}
        order = []
        for rep in range(repeats + 1):
            rotation = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]
            order.append(list(rotation))
            for method in rotation:
                start = time.perf_counter()
                async with asyncio.timeout(TRANSFER_TIMEOUT):
                    wire[method] = await transfer(method)
                times[method].append(time.perf_counter() - start)
        return {"times": times, "wire_bytes": wire, "order": order, "setup_s": setup_s}
    finally:
        if tcp is not None:
            tcp.close()
            await tcp.wait_closed()
        if data_port is not None:
            await data_port.close()
        if sock_task is not None:
            sock_task.cancel()
            await asyncio.wait([sock_task])
        if sock_listener is not None:
            sock_listener.close()
        for host in reversed(hosts):
            with contextlib.suppress(Exception):
                await host.shutdown()
        for identity in identities:
            with contextlib.suppress(FileNotFoundError):
                identity.path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a 4 MiB tensor, 2 repetitions")
    parser.add_argument("--out", default="benchmarks/results/stream.json")
    args = parser.parse_args()
    if args.smoke:
        args.size_mib, args.repeats = 4.0, 2
    if args.repeats < 1 or args.size_mib <= 0:
        parser.error("--repeats must be at least 1 and --size-mib positive")

    load = os.getloadavg()
    size_bytes = int(args.size_mib * (1 << 20)) // 4 * 4
    started = time.perf_counter()
    report = asyncio.run(run(size_bytes, args.repeats))
    medians = {m: statistics.median(report["times"][m][1:]) for m in METHODS}
    mb_s = {m: size_bytes / 1e6 / medians[m] for m in METHODS}  # tensor (float32) bytes per second
    result = {
        "benchmark": "stream",
        "smoke": args.smoke,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} usable cores",
        "load_average_at_start": [round(x, 2) for x in load],
        "size_mib": args.size_mib,
        "size_mb": round(size_bytes / 1e6, 3),
        "repeats": args.repeats,
        "warm_up": "one repetition of every method, excluded from the medians",
        "tcp_mb_s": round(mb_s["tcp"], 1),
        **{f"{m}_mb_s": round(mb_s[m], 1) for m in METHODS if m != "tcp"},
        "ratio": round(mb_s["direct"] / mb_s["tcp"], 3),
        **{f"ratio_{m}": round(mb_s[m] / mb_s["tcp"], 3) for m in METHODS if m not in ("tcp", "direct")},
        "ratio_direct_to_tcp_sock": round(mb_s["direct"] / mb_s["tcp_sock"], 3),
        "note": "MB = 10^6 bytes of the float32 tensor per second; int8/fp16 send fewer (effective rate)",
        "goal_ratio": 0.8,
        "median_s": {m: round(medians[m], 4) for m in METHODS},
        "wire_payload_bytes": report["wire_bytes"],
        "per_repeat_s (first is warm-up)": {m: [round(t, 4) for t in report["times"][m]] for m in METHODS},
        "order_per_repeat": report["order"],
        "hosts_setup_s": round(report["setup_s"], 2),
        "total_wall_s": round(time.perf_counter() - started, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
