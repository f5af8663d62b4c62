"""Async facade over hivemind's in-process `DHTNode` and `P2P`, on the caller's own event loop.

One `SwarmDHT` per process: it owns the process's p2pd (libp2p host), the DHT node running
swarmnet's record validator, and the identity that signs every record it stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarmnet.dht.identity import Identity
from swarmnet.dht.lookup import read_latest
from swarmnet.dht.records import MEMBER_KINDS, RecordError, SignedRecord, decode_record, encode_record
from swarmnet.dht.validator import SwarmnetRecordValidator
from swarmnet.errors import ConfigError, SwarmError
from swarmnet.protocols import access
from swarmnet.protocols.direct import DirectClient
from swarmnet.telemetry import events, metrics

logger = logging.getLogger(__name__)


DHT_OP_TIMEOUT = 10.0
"""Bound on one store or get: after a network partition heals, hivemind's traversal can wait on
a dead connection indefinitely; callers treat a TimeoutError like any failed DHT operation."""


DHT_BEAM = 6
"""Nodes a store or get traversal considers nearest to its key. hivemind's default is its bucket
size, 20, and its `latest=True` get cannot stop at the first copy it finds, so each get visited 20+
nodes, a sixth of a 128-node swarm. Records are stored on the 5 nodes nearest their key
(`num_replicas`), which a beam of 6 still covers (a dead node is skipped and the next nearest
taken); our get (`swarmnet.dht.lookup`) also stops once 3 replicas answered. At 128 peers on one
host: p50 get 60 -> 18 ms, burst success 57-94 % -> 100 % (DHT section of docs/benchmarks.md)."""
DHT_WORKERS = 4
"""Concurrent RPCs of one traversal (8 measured slower: more RPCs per get on a busy host)."""
P2PD_STARTUP_TIMEOUT = 30.0
P2PD_START_ATTEMPTS = 3
"""p2pd that does not come up in time (an overloaded host) is stopped and started again, this many
times in all, before the process gives up."""
BOOTSTRAP_ATTEMPTS = 3
"""Starts of the DHT node (each with a fresh p2pd) when none of the initial peers answered its
ping: `SwarmError` after the last."""

ROUTING_WATCH_PERIOD = 5.0
ROUTING_MIN_NODES = 3
"""The watchdog reconnects while the routing table holds fewer nodes than this (or than we know)."""
ROUTING_MAX_PINGS = 8
ROUTING_FORGET_AFTER = 24
"""Failed re-pings in a row (about two minutes) after which a node is taken for gone."""


async def _start_p2pd(identity: Identity, initial_peers: list[str], host: str, port: int) -> P2P:
    for attempt in range(P2PD_START_ATTEMPTS):
        try:
            return await P2P.create(
                initial_peers=initial_peers,
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                identity_path=str(identity.path),
                # hivemind's "is this identity taken" probe only reads RSA keys, and a restarted
                # coordinator re-attaching under its own identity is exactly what we want.
                check_if_identity_free=False,
                # Local swarms and LANs: no UPnP probing or relays unless asked for.
                nat_port_map=False,
                use_relay=False,
                auto_nat=False,
                startup_timeout=P2PD_STARTUP_TIMEOUT,
            )
        except P2PDaemonError as e:
            # hivemind stops a daemon that missed its start-up deadline; anything else (a missing
            # binary, a taken port) will not get better by trying again.
            if "failed to start in" not in str(e) or attempt + 1 == P2PD_START_ATTEMPTS:
                raise ConfigError(f"could not start the libp2p host: {e}") from e
            logger.warning("p2pd did not start in %.0f s (a busy host?); trying again", P2PD_STARTUP_TIMEOUT)
        except Exception as e:  # hivemind raises ValueError, OSError...
            raise ConfigError(f"could not start the libp2p host: {e}") from e
    raise AssertionError("unreachable")


class SwarmDHT:
    """A libp2p host plus a DHT node that stores and reads swarmnet's signed records."""

    def __init__(self, identity: Identity, p2p: P2P, node: DHTNode, initial_peers: Sequence[str] = ()):
        self.identity = identity
        self.p2p = p2p
        self.node = node
        self.direct: DirectClient | None = DirectClient(identity)
        """Direct data-plane connections this process opens (None: libp2p streams only)."""
        self.access: access.AccessPolicy | None = None
        """The run's access policy once known (`use_access`): in a private run, records of
        non-members are ignored and our own carry our credential."""
        self._known: dict[PeerID, int] = {}
        """Every DHT node we have had in our routing table (or bootstrapped from), with how many
        re-pings in a row failed: the watchdog's candidates to reconnect to."""
        for maddr in initial_peers:
            with contextlib.suppress(Exception):
                self._known[PeerID.from_base58(Multiaddr(maddr)["p2p"])] = 0
        self._watchdog = asyncio.create_task(self._watch_routing_table(), name="dht-watchdog")
        table = node.protocol.routing_table
        metrics.DHT_KNOWN_PEERS.set_function(lambda: len(table.peer_id_to_uid))  # read at scrape time

    @classmethod
    async def create(
        cls,
        *,
        identity: Identity,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
    ) -> "SwarmDHT":
        """Starts p2pd and the DHT node; `initial_peers` empty starts a new swarm."""
        initial_peers = list(initial_peers)
        for attempt in range(BOOTSTRAP_ATTEMPTS):
            p2p = await _start_p2pd(identity, initial_peers, host, port)
            try:
                node = await DHTNode.create(
                    p2p=p2p,
                    initial_peers=initial_peers,
                    record_validator=SwarmnetRecordValidator(),
                    client_mode=client_mode,
                    num_workers=DHT_WORKERS,
                )
                break
            except RuntimeError as e:
                await p2p.shutdown()
                # hivemind pings the initial peers with a 3 s deadline, which an overloaded host
                # (or one whose bootstrap peer is busy) can miss; anything else is a bug.
                if "bootstrap failed" not in str(e):
                    raise
                if attempt + 1 == BOOTSTRAP_ATTEMPTS:
                    raise SwarmError(f"none of the initial peers answered ({', '.join(initial_peers)})") from e
                logger.warning("no initial peer answered the DHT's ping; trying again")
            except BaseException:
                await p2p.shutdown()
                raise
        dht = cls(identity, p2p, node, initial_peers)
        # As early as possible, for a supervisor that may SIGKILL us before we are ready.
        events.emit("p2pd", sockets=dht.p2pd_sockets())
        return dht

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def use_access(self, policy: access.AccessPolicy) -> None:
        """Takes part in a run under `policy`: its checks guard our stream handlers and DHT reads,
        and our streams, direct connections and records carry our credential."""
        self.access = policy
        access.attach(self.p2p, policy)
        if self.direct is not None:
            self.direct.credential = policy.own_credential

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.p2p.get_visible_maddrs()]

    def p2pd_sockets(self) -> list[str]:
        """Unix sockets of our p2pd, so a supervisor can remove them if this process is killed."""
        paths = []
        for maddr in (self.p2p._daemon_listen_maddr, self.p2p._client_listen_maddr):
            try:
                paths.append(maddr["unix"])
            except Exception:  # not a unix multiaddr
                continue
        return paths

    async def put(self, key: str, record: Any, ttl: float) -> bool:
        """Signs `record` and stores it under `key`, subkey = our peer id, for `ttl` seconds."""
        expiration = get_dht_time() + ttl
        if self.access is not None and self.access.own_credential and hasattr(record, "credential"):
            record = dataclasses.replace(record, credential=self.access.own_credential)
        blob = encode_record(self.identity, key, record, expiration)
        with _timed("put"):
            async with asyncio.timeout(DHT_OP_TIMEOUT):
                return bool(await self.node.store(key, blob, expiration, subkey=self.peer_id, beam_size=DHT_BEAM))

    async def replicate(self, signed: SignedRecord) -> bool:
        """Stores someone else's signed record again, unchanged (same owner, same expiration), so
        that it outlives the nodes that held it; the signature still proves who wrote it."""
        if signed.blob is None or signed.expiration <= get_dht_time():
            return False
        with _timed("replicate"):
            async with asyncio.timeout(DHT_OP_TIMEOUT):
                return bool(
                    await self.node.store(
                        signed.key, signed.blob, signed.expiration, subkey=signed.peer_id, beam_size=DHT_BEAM
                    )
                )

    async def get(self, key: str) -> list[SignedRecord]:
        """Every live, verified record under `key` (invalid ones are already dropped by the DHT); in a
        private run, without the records of non-members."""
        with _timed("get"):
            async with asyncio.timeout(DHT_OP_TIMEOUT):
                found = await read_latest(self.node, key, beam=DHT_BEAM, parallel=DHT_WORKERS)
        if not found:
            return []
        records = []
        for subkey, item in found.items():
            try:
                signed = decode_record(item.value)
            except RecordError as e:  # our own cache may hold what a validator never saw
                logger.debug("skipping record %s/%s: %s", key, subkey, e)
                continue
            if signed.key != key or signed.peer_id != subkey:
                continue
            if self.access is not None and type(signed.record).KIND in MEMBER_KINDS:
                if not self.access.admits_record(signed.peer_id, signed.record):
                    logger.debug("ignoring %s/%s: not a member of the private run", key, subkey)
                    continue
            records.append(signed)
        return records

    async def _watch_routing_table(self) -> None:
        """Reconnects to the DHT after losing it. hivemind drops nodes from the routing table when
        their RPCs fail and never looks for them again, so a node cut off for a while (network
        partition, frozen process, suspended laptop) would stay alone with its own stale records.
        Every few seconds, if the table holds fewer nodes than we know of, ping the missing ones
        (a node that answers is added back) and look up our neighbourhood again."""
        while True:
            await asyncio.sleep(ROUTING_WATCH_PERIOD)
            try:
                await self._reconnect()
            except Exception as e:  # noqa: BLE001 - best effort, retried at the next period
                logger.debug("routing table watchdog: %s", e)

    async def _reconnect(self) -> None:
        table = self.node.protocol.routing_table
        present = set(table.peer_id_to_uid)
        for peer in present:
            self._known[peer] = 0
        missing = [p for p in self._known if p not in present and p != self.node.peer_id]
        if not missing or len(present) >= min(len(self._known), ROUTING_MIN_NODES):
            return
        targets = missing[:ROUTING_MAX_PINGS]
        async with asyncio.timeout(DHT_OP_TIMEOUT):
            answers = await asyncio.gather(*(self.node.protocol.call_ping(p) for p in targets))
        for peer, answer in zip(targets, answers):
            if answer is None:
                self._known[peer] += 1
                if self._known[peer] >= ROUTING_FORGET_AFTER:
                    del self._known[peer]
            else:
                self._known[peer] = 0
        if any(answer is not None for answer in answers):
            logger.info("DHT: reconnected to %d node(s) after losing them", sum(a is not None for a in answers))
            async with asyncio.timeout(DHT_OP_TIMEOUT):
                await self.node.find_nearest_nodes([self.node.node_id])

    async def shutdown(self) -> None:
        """Stops the DHT node, then p2pd; safe to call twice."""
        self._watchdog.cancel()
        if self.direct is not None:
            self.direct.close()
        try:
            await self.node.shutdown()
        finally:
            await self.p2p.shutdown()

    async def __aenter__(self) -> "SwarmDHT":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


@contextlib.contextmanager
def _timed(operation: str) -> Iterator[None]:
    """Observes one DHT operation's duration in `swarmnet_dht_operation_seconds`, by outcome."""
    start = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    except TimeoutError:
        outcome = "timeout"
        raise
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        metrics.DHT_SECONDS.labels(operation, outcome).observe(time.perf_counter() - start)
