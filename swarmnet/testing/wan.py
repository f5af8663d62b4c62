"""WAN emulation kit: hosts in their own network namespaces, joined through links of limited rate
and added delay, so that a swarm on one machine talks as if across the Internet.

Topology of `EmulatedWan(hosts=n)`; every box is a network namespace created here:

    host 0: wan0 ═tbf═══ veth ═══tbf═ h0 ┐
    host 1: wan0 ═tbf═══ veth ═══tbf═ h1 ├ router ── TUN ── delay forwarder (a process)
    …                                    ┘

* Each host has one link, a veth pair to the router, shaped with `tc tbf` at `rate_mbit` on both
  ends: the host's upload (its `wan0` egress) and download (the router's `h<i>` egress).
* The router forwards between links through a TUN device. Policy routing sends every packet that
  arrives from a host link to the TUN; the forwarder process (`python -m swarmnet.testing.wan
  forward`) holds each for `delay_ms` and writes it back into the TUN, and the main table then
  delivers it to the destination's link. A packet from host a to host b thus crosses a's uplink,
  the delay once, b's downlink: RTT = 2 × delay, and one TCP connection runs end to end.
* Why a user-space delay: this kernel has no netem (`CONFIG_NET_SCH_NETEM` is not set and there
  are no modules to load). The forwarder opens the TUN with a virtio-net header and TSO/checksum
  offload (`offload=True`), so the kernel hands it segmentation-offload packets of up to 64 KiB,
  passed back byte for byte: far fewer packets per second to hold than at 1500 bytes each. It keeps
  them in a deque in arrival order (one delay for all: release order = arrival order), reads and
  writes in batches, and never releases a packet early. It runs at real-time priority (SCHED_FIFO,
  when allowed: it mostly sleeps in poll) so that a busy machine stretches the delay less; SIGUSR1
  makes it report its counters (`EmulatedWan.stats()`).

Nothing of this namespace (the caller's) is touched: the hosts and the router connect only to each
other. Namespaces are named `swn-<pid>-<token>` like `chaos.NetNamespace`'s, so
`chaos.cleanup_stale_namespaces()` also removes those of a killed run. `close()` (or leaving the
`with` block) SIGTERMs the forwarder by pid, SIGKILLs whatever still runs inside, and deletes every
namespace, also when `open()` failed half-way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import functools
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from swarmnet.testing import chaos

COMMAND_TIMEOUT = 15.0
FORWARDER_START_TIMEOUT = 20.0
DELAY_TABLE = 100
"""Router routing table that sends everything to the TUN."""
TUN_NAME = "delay0"
_TUNSETIFF, _TUNSETOFFLOAD = 0x400454CA, 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_READ_SIZE = 65536 + 64
"""Largest packet the TUN can hand over: a 64 KiB offload packet and its virtio-net header."""
_BATCH = 256


class WanError(RuntimeError):
    """The emulated network could not be built, checked or torn down (our environment's fault)."""


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """What every host's link looks like."""

    rate_mbit: float | None = 100.0
    """tbf rate of each direction of each link, Mbit/s; none: no shaping."""
    delay_ms: float = 25.0
    """One-way delay the forwarder adds to every packet between two hosts (RTT = twice this)."""
    burst_kb: int = 64
    """tbf bucket size, KiB: at least one offload packet, so that tbf does not cut them up."""
    queue_ms: float = 50.0
    """tbf queue: packets waiting longer than this are dropped (one bandwidth-delay product at
    50 ms RTT, so a single TCP flow can fill the link)."""
    offload: bool = True
    """Let the forwarder take segmentation-offload packets (else 1500-byte packets only)."""


@dataclass(frozen=True)
class WanHost:
    """One emulated machine: a namespace with one address on the WAN."""

    index: int
    netns: str
    addr: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this host (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WanError(f"`{shlex.join(argv)}`: {e}") from e
    if check and done.returncode != 0:
        raise WanError(f"`{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _netns_name() -> str:
    return f"{chaos.PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"


def _read_line(process: subprocess.Popen, timeout: float, what: str) -> dict:
    """The next stdout line of `process`, parsed as JSON; WanError on exit or timeout."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    if not line:
        err = process.stderr.read().decode(errors="replace")[-2000:] if process.poll() is not None and process.stderr else ""
        raise WanError(f"{what}: no answer within {timeout:g} s (exit {process.poll()}) {err}")
    return json.loads(line)


class EmulatedWan:
    """`hosts` namespaces behind `link`-shaped links to a router with a delay forwarder."""

    def __init__(self, hosts: int, link: LinkSpec | None = None):
        if not 1 <= hosts <= 250:
            raise ValueError("hosts must be 1..250")
        self.link = link or LinkSpec()
        self.router = _netns_name()
        self.hosts = [WanHost(i, _netns_name(), f"10.99.{i}.2") for i in range(hosts)]
        self.forwarder: subprocess.Popen | None = None
        self.forwarder_stats: dict | None = None
        """What the forwarder reported when it stopped (packets, bytes, lateness, CPU)."""
        self._created: list[str] = []

    def __repr__(self) -> str:
        return f"EmulatedWan(router={self.router!r}, hosts={[h.addr for h in self.hosts]})"

    def open(self) -> Self:
        try:
            self._build()
        except BaseException as e:
            try:
                self.close()
            except WanError as cleanup:
                e.add_note(f"and cleaning up failed too: {cleanup}")
            raise
        return self

    def _build(self) -> None:
        router = ["ip", "-n", self.router]
        self._add_netns(self.router)
        for key in ("all", "default"):  # before the links: new interfaces inherit `default`
            _run(["ip", "netns", "exec", self.router, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0",
                  f"net.ipv4.conf.{key}.forwarding=1", f"net.ipv4.conf.{key}.send_redirects=0"])
        _run(["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for host in self.hosts:
            self._add_netns(host.netns)
            inside = ["ip", "-n", host.netns]
            gateway = f"10.99.{host.index}.1"
            _run(["ip", "link", "add", "wan0", "netns", host.netns, "type", "veth",
                  "peer", "name", f"h{host.index}", "netns", self.router])
            _run([*inside, "addr", "add", f"{host.addr}/30", "dev", "wan0"])
            _run([*router, "addr", "add", f"{gateway}/30", "dev", f"h{host.index}"])
            for cmd in ([*inside, "link", "set", "lo", "up"], [*inside, "link", "set", "wan0", "up"],
                        [*router, "link", "set", f"h{host.index}", "up"],
                        [*inside, "route", "add", "default", "via", gateway],
                        [*router, "rule", "add", "iif", f"h{host.index}", "lookup", str(DELAY_TABLE)]):
                _run(cmd)
            if self.link.rate_mbit is not None:
                self._shape(host.netns, "wan0")
                self._shape(self.router, f"h{host.index}")
        self.forwarder = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "swarmnet.testing.wan", "forward",
             "--tun", TUN_NAME, "--delay-ms", str(self.link.delay_ms), *([] if self.link.offload else ["--no-offload"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        _read_line(self.forwarder, FORWARDER_START_TIMEOUT, "the delay forwarder")
        _run([*router, "link", "set", TUN_NAME, "up"])
        _run([*router, "route", "add", "default", "dev", TUN_NAME, "table", str(DELAY_TABLE)])

    def _add_netns(self, name: str) -> None:
        self._created.append(name)
        _run(["ip", "netns", "add", name])

    def _shape(self, netns: str, dev: str) -> None:
        link = self.link
        _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{link.rate_mbit:g}mbit",
              "burst", f"{link.burst_kb}kb", "latency", f"{link.queue_ms:g}ms"])

    def close(self) -> None:
        """Stops the forwarder (SIGTERM by pid, then SIGKILL), deletes every namespace (idempotent)."""
        errors = []
        if self.forwarder is not None:
            forwarder, self.forwarder = self.forwarder, None
            with contextlib.suppress(ProcessLookupError):
                os.kill(forwarder.pid, signal.SIGTERM)
            try:
                out, _ = forwarder.communicate(timeout=5)
                lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
                self.forwarder_stats = json.loads(lines[-1]) if lines else None
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(forwarder.pid, signal.SIGKILL)
                forwarder.communicate(timeout=10)
        for name in reversed(self._created):
            listed = _run(["ip", "netns", "pids", name], check=False)
            for pid in listed.stdout.split() if listed.returncode == 0 else []:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            if _run(["ip", "netns", "del", name], check=False).returncode != 0 and name in chaos.namespaces():
                errors.append(name)
        self._created = [n for n in self._created if n in errors]
        if errors:
            raise WanError(f"could not remove namespaces {', '.join(errors)}")

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict:
        """The forwarder's counters so far (packets, bytes, lateness, CPU seconds)."""
        if self.forwarder is None:
            raise WanError("the emulated WAN is not open")
        os.kill(self.forwarder.pid, signal.SIGUSR1)
        return _read_line(self.forwarder, 5.0, "the delay forwarder's counters")

    # checks

    def measure(self, src: int, dst: int, *, seconds: float = 3.0, pings: int = 20) -> dict:
        """RTT (1-byte TCP echoes) and bulk TCP throughput from host `src` to host `dst`:
        {"rtt_ms": median, "rtt_min_ms", "connect_ms", "mbit_s": steady rate (first third left out),
        "mbit_s_overall"}."""
        server = subprocess.Popen(
            self.hosts[dst].command([sys.executable, "-m", "swarmnet.testing.wan", "serve", self.hosts[dst].addr]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            port = _read_line(server, FORWARDER_START_TIMEOUT, "the probe server")["port"]
            argv = [sys.executable, "-m", "swarmnet.testing.wan", "probe", self.hosts[dst].addr, str(port),
                    "--seconds", str(seconds), "--pings", str(pings)]
            done = subprocess.run(self.hosts[src].command(argv), capture_output=True, text=True,
                                  timeout=seconds + pings + 30, stdin=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise WanError(f"probe failed ({done.returncode}): {done.stderr[-2000:]}")
            return json.loads(done.stdout.splitlines()[-1])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.communicate(timeout=10)


@functools.cache
def unavailable() -> str | None:
    """Why `EmulatedWan` cannot be used here (None if it can); probed once per process by building
    a small one (nothing is created in this namespace)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support)"
    try:
        with EmulatedWan(2, LinkSpec(delay_ms=1.0)):
            pass
    except (WanError, OSError) as e:
        return f"cannot build an emulated WAN: {e}"
    return None


# ------------------------------------------------------------------ processes run inside namespaces


def forward(tun: str, delay_ms: float, offload: bool) -> None:
    """The delay forwarder: every packet read from the TUN is written back `delay_ms` later.
    SIGUSR1 prints its counters so far as a JSON line; SIGTERM prints them and ends it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tun.encode(), flags))
    if offload:
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
    realtime = True
    try:  # a real link's delay does not grow when the machine's CPUs are busy; it mostly sleeps in poll
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        realtime = False
    requests: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: requests.append("stop"))
    signal.signal(signal.SIGUSR1, lambda *_: requests.append("report"))
    delay = int(delay_ms * 1e6)
    held: collections.deque[tuple[int, bytes]] = collections.deque()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    now, read, write = time.monotonic_ns, os.read, os.write
    packets = nbytes = dropped = max_held = late_max = late_sum = late_1ms = late_10ms = 0
    print(json.dumps({"ready": tun, "realtime": realtime}), flush=True)
    started = now()
    while True:
        if requests:
            usage = os.times()
            print(json.dumps({
                "packets": packets, "bytes": nbytes, "dropped": dropped, "max_held_packets": max_held,
                "mean_late_ms": round(late_sum / max(packets, 1) / 1e6, 3), "max_late_ms": round(late_max / 1e6, 3),
                "late_over_1ms": late_1ms, "late_over_10ms": late_10ms, "seconds": round((now() - started) / 1e9, 3),
                "cpu_s": round(usage.user + usage.system, 3), "realtime": realtime,
            }), flush=True)
            if "stop" in requests:
                return
            requests.clear()
        wait_ms = 100 if not held else max(0, -(-(held[0][0] - now()) // 1_000_000))
        if poller.poll(wait_ms):
            for _ in range(_BATCH):
                try:
                    packet = read(fd, _READ_SIZE)
                except BlockingIOError:
                    break
                held.append((now() + delay, packet))
            max_held = max(max_held, len(held))
        t = now()
        while held and held[0][0] <= t:
            due, packet = held.popleft()
            try:
                write(fd, packet)
            except OSError:  # malformed or no route: dropped, as a router would
                dropped += 1
                continue
            packets += 1
            nbytes += len(packet)
            late_max = max(late_max, t - due)
            late_sum += t - due
            late_1ms += t - due > 1_000_000
            late_10ms += t - due > 10_000_000


def serve(host: str) -> None:
    """Probe server: per connection, `e` then 1-byte echoes, or `s` then a sink that answers its
    receive timeline's rates as JSON after EOF."""
    server = socket.create_server((host, 0))
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"e":
                while byte := conn.recv(1):
                    conn.sendall(byte)
            elif mode == b"s":
                marks, total = [], 0
                while chunk := conn.recv(1 << 20):
                    total += len(chunk)
                    marks.append((time.monotonic(), total))
                first, last = marks[0], marks[-1]
                warm = next(m for m in marks if m[0] >= first[0] + (last[0] - first[0]) / 3)
                conn.sendall(json.dumps({"mbit_s": _mbit_s(warm, last), "mbit_s_overall": _mbit_s(first, last),
                                         "bytes": total}).encode())


def _mbit_s(a: tuple[float, int], b: tuple[float, int]) -> float:
    """Rate between two (time, bytes received so far) marks."""
    return (b[1] - a[1]) * 8 / 1e6 / max(b[0] - a[0], 1e-9)


def probe(host: str, port: int, seconds: float, pings: int) -> None:
    started = time.perf_counter()
    echo = socket.create_connection((host, port), timeout=30)
    connect_ms = (time.perf_counter() - started) * 1e3
    rtts = []
    with echo:
        echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        echo.sendall(b"e")
        for _ in range(pings):
            t = time.perf_counter()
            echo.sendall(b"x")
            echo.recv(1)
            rtts.append((time.perf_counter() - t) * 1e3)
    with socket.create_connection((host, port), timeout=30) as bulk:
        bulk.sendall(b"s")
        block, end = bytes(1 << 18), time.monotonic() + seconds
        while time.monotonic() < end:
            bulk.sendall(block)
        bulk.shutdown(socket.SHUT_WR)
        answer = json.loads(bulk.makefile("rb").read())
    print(json.dumps({"rtt_ms": statistics.median(rtts), "rtt_min_ms": min(rtts), "connect_ms": connect_ms, **answer}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarmnet.testing.wan")
    commands = parser.add_subparsers(dest="command", required=True)
    fwd = commands.add_parser("forward", help="the delay forwarder (run inside the router namespace)")
    fwd.add_argument("--tun", default=TUN_NAME)
    fwd.add_argument("--delay-ms", type=float, required=True)
    fwd.add_argument("--no-offload", action="store_true")
    srv = commands.add_parser("serve", help="probe server")
    srv.add_argument("host")
    prb = commands.add_parser("probe", help="RTT and throughput against a probe server")
    prb.add_argument("host")
    prb.add_argument("port", type=int)
    prb.add_argument("--seconds", type=float, default=3.0)
    prb.add_argument("--pings", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "forward":
        forward(args.tun, args.delay_ms, not args.no_offload)
    elif args.command == "serve":
        serve(args.host)
    else:
        probe(args.host, args.port, args.seconds, args.pings)


if __name__ == "__main__":
    main()
