"""The chaos kit itself, on tiny child processes and real sockets (no swarmnet peers needed).

Processes bind 127.0.0.1 or the namespace's private veth addresses, on ephemeral ports. Every child
is SIGKILLed by process group and every namespace deleted at teardown, whatever the outcome.
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from swarmnet.testing import chaos
from swarmnet.testing.processes import ManagedProcess
from swarmnet.testing.waiting import wait_until

NETNS_UNAVAILABLE = chaos.netns_unavailable()
TC_UNAVAILABLE = chaos.tc_unavailable()
needs_netns = pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"netns: {NETNS_UNAVAILABLE}")
needs_tc = pytest.mark.skipif(TC_UNAVAILABLE is not None, reason=f"tc: {TC_UNAVAILABLE}")

# A TCP server: echoes lines; `sink N` reads N bytes then answers `done`; `source N` sends N bytes.
# With `with-child` it first starts an idle grandchild in its process group.
SERVER = r"""
import signal, socket, subprocess, sys, threading
if sys.argv[2:] == ["with-child"]:
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    print("child", child.pid, flush=True)
server = socket.create_server((sys.argv[1], 0))
print("port", server.getsockname()[1], flush=True)

def serve(conn):
    with conn, conn.makefile("rb") as reader:
        for line in reader:
            words = line.split()
            if words[:1] == [b"sink"]:
                received = len(reader.read(int(words[1])))
                conn.sendall(b"done %d\n" % received)
            elif words[:1] == [b"source"]:
                conn.sendall(bytes(int(words[1])))
            else:
                conn.sendall(line)

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Waits for SIGTERM next to an idle grandchild; exits 0 on it, or ignores it when `stubborn`.
GRACEFUL = r"""
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
stubborn = sys.argv[1:] == ["stubborn"]
signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else (lambda *_: sys.exit(0)))
print("ready", child.pid, flush=True)
while True:
    signal.pause()
"""

# Run inside the namespace: one echo round trip; prints the reply or the exception's class name.
CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.sendall(b"from inside\n")
        print(s.makefile("rb").readline().decode().strip())
except OSError as e:
    print(type(e).__name__)
"""


def python(*args: str) -> list[str]:
    return [sys.executable, "-c", *args]


def state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def printed(process: ManagedProcess, word: str, timeout: float = 20.0) -> list[str]:
    """The words after `word` on the first stdout line starting with it."""

    def line() -> list[str] | None:
        found = next((line for line in list(process.output) if line.split()[:1] == [word]), None)
        if found is None and not process.alive:
            raise AssertionError(f"{process.name} exited\n{process.describe()}")
        return found.split()[1:] if found else None

    return wait_until(line, timeout, interval=0.02, what=f"{process.name} to print {word!r}")


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def request(addr: str, port: int, line: bytes = b"ping\n", timeout: float = 5.0) -> bytes:
    with socket.create_connection((addr, port), timeout=timeout) as sock:
        sock.sendall(line)
        return recv_line(sock)


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[[Sequence[str]], ManagedProcess]]:
    """Starts children in their own session; SIGKILLs each one's process group at teardown."""
    started: list[ManagedProcess] = []

    def start(argv: Sequence[str]) -> ManagedProcess:
        started.append(ManagedProcess(f"child{len(started)}", argv, log_dir=tmp_path))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            chaos.kill(process)


@pytest.fixture
def ns() -> Iterator[chaos.NetNamespace]:
    """A fresh namespace (after removing those a killed earlier run left); deleted at teardown."""
    chaos.cleanup_stale_namespaces()
    with chaos.NetNamespace() as namespace:
        yield namespace
    assert namespace.name not in chaos.namespaces()
    assert namespace.host_veth not in chaos.links()


# ------------------------------------------------------------------------------------ processes


def test_frozen_server_times_out_and_answers_once_thawed(spawn):
    server = spawn(python(SERVER, "127.0.0.1", "with-child"))
    port = int(printed(server, "port")[0])
    grandchild = int(printed(server, "child")[0])
    assert request("127.0.0.1", port) == b"ping\n"
    assert sorted(chaos.group_pids(server.pid)) == sorted([server.pid, grandchild])

    with chaos.frozen(server):
        assert state(server.pid) == "T" and state(grandchild) == "T"
        pending = socket.create_connection(("127.0.0.1", port), timeout=1.0)  # the kernel still accepts
        pending.sendall(b"are you there?\n")
        with pytest.raises(TimeoutError):
            recv_line(pending)
    assert state(server.pid) != "T" and state(grandchild) != "T"
    with pending:
        pending.settimeout(10)
        assert recv_line(pending) == b"are you there?\n"
    assert request("127.0.0.1", port, b"again\n") == b"again\n"


def test_frozen_always_thaws(spawn):
    server = spawn(python(SERVER, "127.0.0.1"))
    port = int(printed(server, "port")[0])
    with pytest.raises(RuntimeError, match="boom"):
        with chaos.frozen(server):
            raise RuntimeError("boom")
    assert request("127.0.0.1", port) == b"ping\n"


def test_kill_takes_the_whole_group_even_frozen(spawn):
    server = spawn(python(SERVER, "127.0.0.1", "with-child"))
    grandchild = int(printed(server, "child")[0])
    chaos.freeze(server)
    assert chaos.kill(server) == -9
    assert not server.alive
    wait_until(lambda: not chaos.group_pids(server.pid), 10, what="the grandchild to die")
    assert grandchild not in chaos.group_pids(server.pid)
    with pytest.raises(chaos.ChaosError, match="gone"):
        chaos.freeze(server)
    chaos.thaw(server)  # a no-op on a dead group


def test_signals_work_on_a_bare_popen():
    child = subprocess.Popen(python("import signal; signal.pause()"), start_new_session=True)
    try:
        chaos.freeze(child)
        assert state(child.pid) == "T"
        chaos.thaw(child)
        assert state(child.pid) != "T"
        assert chaos.kill(child) == -9
    finally:
        chaos.kill(child)


def test_leave_sends_sigterm_to_the_main_pid_only(spawn):
    peer = spawn(python(GRACEFUL))
    grandchild = int(printed(peer, "ready")[0])
    assert chaos.leave(peer, timeout=10) == 0
    assert chaos.group_pids(peer.pid) == [grandchild]  # the rest of the group is the caller's business


def test_leave_raises_when_the_process_stays(spawn):
    peer = spawn(python(GRACEFUL, "stubborn"))
    printed(peer, "ready")
    with pytest.raises(chaos.ChaosError, match="did not exit within 0.5 s"):
        chaos.leave(peer, timeout=0.5)
    assert peer.alive


# -------------------------------------------------------------------------------------- network


@needs_netns
def test_namespace_is_created_and_fully_removed():
    namespace = chaos.NetNamespace()
    with namespace:
        assert namespace.name in chaos.namespaces()
        assert namespace.host_veth in chaos.links()
        assert namespace.network is not None and namespace.network.subnet_of(chaos.NETWORK)
        assert namespace.network.prefixlen == 30
        assert {namespace.host_addr, namespace.ns_addr} == {str(a) for a in namespace.network.hosts()}
        inside = subprocess.run(namespace.command(["ip", "-o", "-4", "addr", "show"]),
                                capture_output=True, text=True, timeout=30, check=True)
        assert f"inet {namespace.ns_addr}/30" in inside.stdout
        assert "inet 127.0.0.1/8" in inside.stdout
        assert namespace.host_addr not in inside.stdout
    assert namespace.name not in chaos.namespaces()
    assert namespace.host_veth not in chaos.links()
    namespace.close()  # idempotent


@needs_netns
def test_half_created_namespace_is_removed(monkeypatch):
    real_run = chaos._run

    def failing_run(argv, **kwargs):
        if "neigh" in argv:  # after the namespace, the veth pair and the addresses exist
            raise chaos.ChaosError("injected failure")
        return real_run(argv, **kwargs)

    monkeypatch.setattr(chaos, "_run", failing_run)
    namespace = chaos.NetNamespace()
    with pytest.raises(chaos.ChaosError, match="injected failure"):
        namespace.open()
    monkeypatch.undo()
    assert namespace.name not in chaos.namespaces()
    assert namespace.host_veth not in chaos.links()


@needs_netns
def test_cleanup_removes_only_namespaces_of_dead_creators():
    dead = subprocess.Popen(python("pass"))
    dead.wait()
    stale, live = chaos.NetNamespace(), chaos.NetNamespace()
    stale.name = f"{chaos.PREFIX}-{dead.pid}-{stale.token}"  # as if created by a killed test run
    orphan = f"{chaos.PREFIX}-{chaos.NetNamespace().token}-h"
    try:
        stale.open()
        live.open()
        subprocess.run(["ip", "link", "add", orphan, "type", "veth", "peer", "name", orphan[:-1] + "n"],
                       check=True, timeout=30)
        removed = chaos.cleanup_stale_namespaces()
        assert stale.name in removed and orphan in removed
        assert live.name not in removed and live.host_veth not in removed
        assert stale.name not in chaos.namespaces() and stale.host_veth not in chaos.links()
        assert orphan not in chaos.links()
        assert live.name in chaos.namespaces() and live.host_veth in chaos.links()
    finally:
        subprocess.run(["ip", "link", "del", orphan], capture_output=True, timeout=30)
        stale.close()
        live.close()


@needs_tc
def test_partition_is_silent_and_heal_restores(ns, spawn):
    server = spawn(ns.command(python(SERVER, ns.ns_addr)))
    port = int(printed(server, "port")[0])
    assert request(ns.ns_addr, port, b"hello\n") == b"hello\n"
    established = socket.create_connection((ns.ns_addr, port), timeout=5)
    with established:
        with ns.partitioned():
            assert ns.is_partitioned
            with pytest.raises(TimeoutError):  # dropped, not refused: a ConnectionRefusedError fails here
                socket.create_connection((ns.ns_addr, port), timeout=1.0).close()
            established.settimeout(1.0)
            established.sendall(b"lost?\n")
            with pytest.raises(TimeoutError):
                recv_line(established)
        assert not ns.is_partitioned
        established.settimeout(20)  # TCP retransmits with backoff; the reply comes at the next try
        assert recv_line(established) == b"lost?\n"
    assert request(ns.ns_addr, port, b"back\n") == b"back\n"


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


@needs_tc
def test_server_outside_is_reachable_from_inside_unless_partitioned(ns):
    server = socketserver.ThreadingTCPServer((ns.host_addr, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])

    def from_inside(timeout: float) -> str:
        argv = ns.command(python(CLIENT, ns.host_addr, port, str(timeout)))
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        assert from_inside(5.0) == "from inside"
        ns.partition()
        assert from_inside(1.0) == "TimeoutError"
        ns.heal()
        assert from_inside(5.0) == "from inside"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@needs_tc
@pytest.mark.timeout(60)
def test_bandwidth_limit_applies_both_ways(ns, spawn):
    server = spawn(ns.command(python(SERVER, ns.ns_addr)))
    port = int(printed(server, "port")[0])

    def upload(size: int) -> float:
        with socket.create_connection((ns.ns_addr, port), timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(b"sink %d\n" % size + bytes(size))
            assert recv_line(sock) == b"done %d\n" % size
            return time.monotonic() - started

    def download(size: int) -> float:
        with socket.create_connection((ns.ns_addr, port), timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(b"source %d\n" % size)
            received = 0
            while received < size:
                chunk = sock.recv(1 << 20)
                assert chunk, "closed early"
                received += len(chunk)
            return time.monotonic() - started

    up_size, down_size = 8 << 20, 2 << 20
    up_free, down_free = upload(up_size), download(down_size)
    ns.limit_bandwidth(20)  # Mbit/s: 8 MiB take 3.4 s, 2 MiB 0.84 s
    up_limited, down_limited = upload(up_size), download(down_size)
    ns.clear_limits()
    up_again = upload(up_size)
    print(f"8 MiB up: {up_free:.3f} s free, {up_limited:.3f} s at 20 Mbit/s, {up_again:.3f} s cleared; "
          f"2 MiB down: {down_free:.3f} s free, {down_limited:.3f} s limited")
    assert up_limited >= 2.5 and up_limited >= 3 * up_free
    assert down_limited >= 0.6 and down_limited >= 3 * down_free
    assert up_again * 3 <= up_limited
