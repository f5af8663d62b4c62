"""Chaos kit: the faults the chaos tests inflict on real processes and on the network.

Processes (a `ManagedProcess`, or a bare `subprocess.Popen` started with `start_new_session=True`):

* `kill(p)`: SIGKILL the whole process group (the peer and its p2pd) and reap it — a crash.
* `freeze(p)` / `thaw(p)` / `with frozen(p):` SIGSTOP / SIGCONT the whole process group — a peer
  that hangs (GC pause, swapped-out host) while its sockets stay open. `freeze` returns once every
  member of the group is stopped.
* `leave(p, timeout)`: SIGTERM to the main pid only — a graceful leave — and its exit code.

Network (Linux, root, iproute2; see `netns_unavailable()` / `tc_unavailable()` for skip reasons):

* `NetNamespace`: a network namespace `swn-<pid>-<token>` joined to this one by a veth pair with a
  private /30 from 10.213.0.0/16 (`host_addr` outside, `ns_addr` inside). Run a process inside with
  `ns.command(argv)`; `partition()` / `heal()` silently cut and restore all traffic between the two
  sides; `limit_bandwidth()` / `clear_limits()` shape it with a token bucket (tbf).
* `cleanup_stale_namespaces()`: removes `swn-*` namespaces (and veths) left by a killed test run.

Everything here acts immediately and synchronously; nothing waits with a bare sleep.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence

from swarmnet.testing.processes import ManagedProcess
from swarmnet.testing.waiting import wait_until

Target = ManagedProcess | subprocess.Popen
"""What the signal helpers act on: a process started in its own session (process group)."""

NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
"""The private range the namespaces' /30 links are drawn from."""

PREFIX = "swn"
_NS_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{6}})$")
_VETH_NAME = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-[hn]$")
SIGNAL_TIMEOUT = 5.0
COMMAND_TIMEOUT = 15.0


class ChaosError(RuntimeError):
    """A fault could not be injected or undone (or a process did not react to it in time)."""


# --------------------------------------------------------------------------------------- processes


def _popen(process: Target) -> subprocess.Popen:
    return process.popen if isinstance(process, ManagedProcess) else process


def _name(process: Target) -> str:
    return process.name if isinstance(process, ManagedProcess) else f"pid {process.pid}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in "ZX":
                pids.append(int(entry.name))
    return pids


def _wait_group(process: Target, stopped: bool, timeout: float) -> None:
    def settled() -> bool:
        states = [(_proc_stat(pid) or ("X", 0))[0] for pid in group_pids(process.pid)]
        return all((s in "Tt") == stopped for s in states if s not in "ZX")

    try:
        wait_until(settled, timeout, interval=0.01, what="the process group to settle")
    except AssertionError as e:
        state = "stop" if stopped else "continue"
        raise ChaosError(f"{_name(process)}: its process group did not {state} within {timeout:.0f} s") from e


def kill(process: Target) -> int | None:
    """SIGKILL the process and its whole group, reap it; returns its exit status."""
    if isinstance(process, ManagedProcess):
        process.kill()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    return _popen(process).returncode


def freeze(process: Target, timeout: float = SIGNAL_TIMEOUT) -> None:
    """SIGSTOP the whole process group; returns once every member is stopped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGSTOP)
    if not group_pids(process.pid):  # killpg succeeds on a group of zombies
        raise ChaosError(f"cannot freeze {_name(process)}: its process group is gone")
    _wait_group(process, stopped=True, timeout=timeout)


def thaw(process: Target, timeout: float = SIGNAL_TIMEOUT) -> None:
    """SIGCONT the whole process group (no-op if it is gone); returns once none is stopped."""
    try:
        os.killpg(process.pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    _wait_group(process, stopped=False, timeout=timeout)


@contextlib.contextmanager
def frozen(process: Target) -> Iterator[None]:
    """The process group is stopped inside the block and continued after it, whatever happens."""
    try:
        freeze(process)
        yield
    finally:
        thaw(process)


def leave(process: Target, timeout: float = 20.0) -> int:
    """Graceful leave: SIGTERM to the main pid only, wait up to `timeout` s; returns the exit code.

    Raises `ChaosError` if it is still running then; the process is left for the caller's cleanup.
    """
    popen = _popen(process)
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    try:
        return popen.wait(timeout)
    except subprocess.TimeoutExpired as e:
        raise ChaosError(f"{_name(process)} did not exit within {timeout:g} s of SIGTERM") from e


# ----------------------------------------------------------------------------------------- network


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ChaosError(f"`{shlex.join(argv)}`: {e}") from e
    if check and result.returncode != 0:
        raise ChaosError(f"`{shlex.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """Names of the network namespaces (`ip netns list`)."""
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def links() -> list[str]:
    """Names of the network interfaces of this namespace."""
    result = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in result.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            names.append(parts[1].strip().split("@")[0])
    return names


def _pick_network() -> ipaddress.IPv4Network:
    """A random /30 in `NETWORK` that no address of this namespace is in."""
    result = _run(["ip", "-o", "-4", "addr", "show"], check=False)
    used = {ipaddress.IPv4Interface(m).network for m in re.findall(r"\binet (\S+)", result.stdout)}
    rng = random.SystemRandom()
    for _ in range(100):
        base = NETWORK.network_address + 4 * rng.randrange(NETWORK.num_addresses // 4)
        candidate = ipaddress.IPv4Network(f"{base}/30")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise ChaosError(f"no free /30 in {NETWORK}")


class NetNamespace:
    """A network namespace joined to this one by a veth pair: a separate host on a private link.

    Partition mechanism: `partition()` replaces the root qdisc of *both* veth ends with
    `pfifo limit 0`, a queue that drops every packet handed to it. The drop happens in the sender's
    own egress queue, so no RST and no ICMP error is generated (TCP treats the local drop as
    congestion and retransmits), and the other side simply hears nothing: connects and requests
    time out, like a real partition, and established connections resume after `heal()`. Chosen
    because it needs only `sch_fifo` (tc's `action drop` needs `act_gact`, absent from this kernel),
    and checked empirically against the alternative: `ip link set ... down` is not silent — with
    the outside end down the connected route disappears and outside connects are rerouted (here:
    refused); with the inside end down, inside senders get ENETUNREACH at once.
    Both sides get permanent neighbour (ARP) entries, otherwise a failed ARP during a partition
    makes the kernel report EHOSTUNREACH to local senders after ~3 s instead of a timeout.

    `partition()` takes precedence over `limit_bandwidth()`; `heal()` restores the limits.
    On exit (or `close()`, idempotent) any process left inside is SIGKILLed and the namespace and
    the veth pair are deleted, also when `open()` failed half-way.
    """

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.token = token
        self.name = f"{PREFIX}-{os.getpid()}-{token}"
        self.host_veth = f"{PREFIX}-{token}-h"
        self.ns_veth = f"{PREFIX}-{token}-n"
        self._host_mac = f"02:53:{token[0:2]}:{token[2:4]}:{token[4:6]}:01"
        self._ns_mac = f"02:53:{token[0:2]}:{token[2:4]}:{token[4:6]}:02"
        self.network: ipaddress.IPv4Network | None = None
        self.host_addr = ""
        self.ns_addr = ""
        self._created = False
        self._partitioned = False
        self._limits: tuple[float, int, float] | None = None
        self._shaped = False

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r}, host_addr={self.host_addr!r}, ns_addr={self.ns_addr!r})"

    # lifecycle

    def open(self) -> NetNamespace:
        """Creates the namespace, the veth pair, the addresses; on any failure, undoes it all."""
        if self._created:
            raise ChaosError(f"{self.name} is already open")
        self.network = _pick_network()
        self.host_addr, self.ns_addr = str(self.network[1]), str(self.network[2])
        self._created = True
        prefixlen = self.network.prefixlen
        inside = ["ip", "-n", self.name]
        try:
            _run(["ip", "netns", "add", self.name])
            _run(["ip", "link", "add", self.host_veth, "address", self._host_mac, "type", "veth",
                  "peer", "name", self.ns_veth, "address", self._ns_mac, "netns", self.name])
            _run(["ip", "addr", "add", f"{self.host_addr}/{prefixlen}", "dev", self.host_veth])
            _run([*inside, "addr", "add", f"{self.ns_addr}/{prefixlen}", "dev", self.ns_veth])
            _run(["ip", "neigh", "replace", self.ns_addr, "lladdr", self._ns_mac,
                  "dev", self.host_veth, "nud", "permanent"])
            _run([*inside, "neigh", "replace", self.host_addr, "lladdr", self._host_mac,
                  "dev", self.ns_veth, "nud", "permanent"])
            _run(["ip", "link", "set", self.host_veth, "up"])
            _run([*inside, "link", "set", self.ns_veth, "up"])
            _run([*inside, "link", "set", "lo", "up"])
        except BaseException as e:
            try:
                self.close()
            except ChaosError as cleanup:
                e.add_note(f"and cleaning up failed too: {cleanup}")
            raise
        return self

    def pids(self) -> list[int]:
        """The processes running inside the namespace."""
        result = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in result.stdout.split() if p.isdigit()] if result.returncode == 0 else []

    def close(self) -> None:
        """SIGKILLs what still runs inside, deletes the veth pair and the namespace (idempotent)."""
        if not self._created:
            return
        _destroy(self.name, self.host_veth)
        self._created = False
        self._partitioned = False
        self._limits = None
        self._shaped = False

    def __enter__(self) -> NetNamespace:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # use

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside the namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    @property
    def is_partitioned(self) -> bool:
        return self._partitioned

    def partition(self) -> None:
        """Silently drops every packet between the namespace and the outside, both ways."""
        self._partitioned = True
        self._apply()

    def heal(self) -> None:
        """Ends a partition (bandwidth limits, if any, apply again)."""
        self._partitioned = False
        self._apply()

    @contextlib.contextmanager
    def partitioned(self) -> Iterator[None]:
        """Partitioned inside the block, healed after it whatever happens."""
        self.partition()
        try:
            yield
        finally:
            self.heal()

    def limit_bandwidth(self, rate_mbit: float, burst_kbit: int = 64, latency_ms: float = 50.0) -> None:
        """Token-bucket (tbf) shaping of both directions to `rate_mbit` Mbit/s each."""
        if rate_mbit <= 0 or burst_kbit <= 0 or latency_ms <= 0:
            raise ValueError("rate, burst and latency must be positive")
        self._limits = (rate_mbit, burst_kbit, latency_ms)
        self._apply()

    def clear_limits(self) -> None:
        """Removes the bandwidth limits."""
        self._limits = None
        self._apply()

    def _apply(self) -> None:
        """Installs the root qdisc the current state calls for on both veth ends."""
        if not self._created:
            raise ChaosError(f"{self.name} is not open")
        if self._partitioned:
            spec = ["pfifo", "limit", "0"]
        elif self._limits is not None:
            rate, burst, latency = self._limits
            spec = ["tbf", "rate", f"{rate:g}mbit", "burst", f"{burst}kbit", "latency", f"{latency:g}ms"]
        else:
            spec = []
        for tc, dev in ((["tc"], self.host_veth), (["tc", "-n", self.name], self.ns_veth)):
            if spec:
                _run([*tc, "qdisc", "replace", "dev", dev, "root", *spec])
            elif self._shaped:
                _run([*tc, "qdisc", "del", "dev", dev, "root"])
        self._shaped = bool(spec)


def _destroy(name: str, host_veth: str) -> None:
    """Kills the processes inside namespace `name`, deletes `host_veth` (and its peer) and `name`."""
    listed = _run(["ip", "netns", "pids", name], check=False)
    for pid in listed.stdout.split() if listed.returncode == 0 else []:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "link", "del", host_veth], check=False)
    _run(["ip", "netns", "del", name], check=False)
    left = [n for n in (name,) if n in namespaces()] + [v for v in (host_veth,) if v in links()]
    if left:
        raise ChaosError(f"could not remove {', '.join(left)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_namespaces() -> list[str]:
    """Removes `swn-<pid>-<token>` namespaces whose creating pid is dead, and veths left without
    their namespace; returns what it removed. Namespaces of live processes are left alone."""
    removed: list[str] = []
    veths = [v for v in links() if _VETH_NAME.match(v)]  # listed before the namespaces: see below
    live_tokens = set()
    for name in namespaces():
        match = _NS_NAME.match(name)
        if match is None:
            continue
        if _pid_alive(int(match[1])):
            live_tokens.add(match[2])
        else:
            _destroy(name, f"{PREFIX}-{match[2]}-h")
            removed.append(name)
    # A namespace is created before its veth, so a veth listed earlier whose token has no live
    # namespace now is an orphan (creation failed half-way, or its namespace was just destroyed).
    orphans = sorted({m[1] for m in map(_VETH_NAME.match, veths) if m is not None} - live_tokens)
    for token in orphans:
        for veth in (f"{PREFIX}-{token}-h", f"{PREFIX}-{token}-n"):
            if veth in links():  # deleting one end removes the pair
                _run(["ip", "link", "del", veth], check=False)
                removed.append(veth)
    return removed


@functools.cache
def netns_unavailable() -> str | None:
    """Why `NetNamespace` cannot be used here (None if it can); probed once per process."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    try:
        with NetNamespace():
            pass
    except ChaosError as e:
        return f"cannot create a network namespace with a veth pair: {e}"
    return None


@functools.cache
def tc_unavailable() -> str | None:
    """Why `partition()` / `limit_bandwidth()` cannot be used here (None if they can); probed once."""
    reason = netns_unavailable()
    if reason is not None:
        return reason
    if shutil.which("tc") is None:
        return "`tc` (iproute2) is not installed"
    try:
        with NetNamespace() as ns:
            ns.limit_bandwidth(10)
            ns.partition()
            ns.heal()
            ns.clear_limits()
    except ChaosError as e:
        return f"tc qdiscs (pfifo, tbf) unavailable on a veth: {e}"
    return None
