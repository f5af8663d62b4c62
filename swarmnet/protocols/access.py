"""Private runs: who may take part, and the one check every serving path makes.

A run is private when its manifest's `[access]` table names an allowlist of peer ids, or the sha256
of a join token, or both (`config.AccessConfig`). A member is a process whose peer id is on the
allowlist, or that holds the token. Members are told apart from outsiders by their peer id, which
every transport authenticates (libp2p streams by p2pd's secure channel, direct connections by the
`DirectOpen` handshake, DHT records by their signature), plus, for token holders, a *credential*:

    credential = hex(HMAC-SHA256(key = token, "swarmnet-access/1\\n" + run name + "\\n" + peer id))

A credential names the one peer id it was made for, so it may travel in the clear: whoever copies
it from a stream or a DHT record cannot use it under any other id. Only token holders can make or
check credentials; the manifest holds the token's hash, never the token. The credential is bound
to the run's *name*, not its id, because the run id hashes the manifest, `token_sha256` included.

Where the check is made (each refusal is an `AccessDeniedError` reply and a count in
`swarmnet_access_denied_total{protocol}`; the server goes on serving everyone else):

- libp2p streams through p2pd: in a private run a client's first frame on every stream is
  `AccessHello{run_id, credential}`; `add_stream_handler` wraps every stream handler with the check,
  so a servicer registered through it cannot forget it. The hello rides in the stream itself (no
  extra round trip, no per-server session that a restart or an eviction could invalidate).
- the direct data plane: `DirectOpen.credential`, checked by `DirectEndpoint` once the client has
  proved its id.
- DHT records: `SwarmDHT.get` drops members' kinds of records (`records.MEMBER_KINDS`) signed by
  non-members, so an outsider sharing the DHT cannot pose as a stage server, trainer or archive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from swarmnet.config import AccessConfig, RunManifest
from swarmnet.errors import AccessDeniedError, ConfigError, SwarmnetError, UnknownRunError
from swarmnet.protocols.framing import FramedStream, quietly
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
"""Seconds a server waits for a client's `AccessHello` on a new stream."""
CACHE_SIZE = 4096
CACHE_TTL = 600.0
_CONTEXT = b"swarmnet-access/1\n"


@dataclass(frozen=True, kw_only=True)
class AccessHello:
    """First frame of every libp2p stream in a private run."""

    run_id: str
    credential: str = ""
    """Empty for a peer admitted by the allowlist alone."""


def token_sha256(token: str) -> str:
    """What `[access] token_sha256` holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def make_credential(token: str, run_name: str, peer_id: str) -> str:
    return hmac.new(token.encode(), _CONTEXT + f"{run_name}\n{peer_id}".encode(), hashlib.sha256).hexdigest()


class AccessPolicy:
    """Who a process of one run admits, and its own credential. Pure: no I/O, an injectable clock.

    `token` is this process's join token (None: none given). A token that does not hash to the
    manifest's `token_sha256` is never used: `check_self` says so."""

    def __init__(
        self,
        access: AccessConfig,
        token: str | None,
        own_peer_id: str,
        *,
        run_name: str,
        run_id: str,
        cache_size: int = CACHE_SIZE,
        cache_ttl: float = CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.access = access
        self.own_peer_id = own_peer_id
        self.run_name = run_name
        self.run_id = run_id
        self._given_token = token or None
        valid = (
            bool(token)
            and bool(access.token_sha256)
            and hmac.compare_digest(token_sha256(token), access.token_sha256)
        )
        self._token = token if valid else None
        self._allowed = frozenset(access.allowlist) | {own_peer_id}
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._admitted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """peer id → (its verified credential, when the entry expires): saves an HMAC per record
        of every DHT read and per stream. Only valid credentials enter, so outsiders cannot fill it."""
        self.own_credential = self.credential_for(own_peer_id) if self._token else ""

    @classmethod
    def for_run(
        cls, manifest: RunManifest, token: str | None, own_peer_id: str, **kwargs: Any
    ) -> AccessPolicy:
        return cls(
            manifest.access, token, own_peer_id, run_name=manifest.name, run_id=manifest.run_id, **kwargs
        )

    @property
    def private(self) -> bool:
        return self.access.private

    @property
    def can_verify(self) -> bool:
        """Whether this process holds the run's token (else it admits the allowlist only)."""
        return self._token is not None

    def credential_for(self, peer_id: str) -> str:
        if self._token is None:
            raise AccessDeniedError(f"no valid join token for run {self.run_name}: cannot make credentials")
        return make_credential(self._token, self.run_name, peer_id)

    def admits(self, peer_id: str, credential: str = "") -> bool:
        """Whether `peer_id` (authenticated by the transport) may take part."""
        if not self.private or peer_id in self._allowed:
            return True
        if self._token is None or not credential or not credential.isascii():
            return False  # `hmac.compare_digest` raises TypeError on non-ASCII str: no credential has any
        now = self._clock()
        known = self._admitted.get(peer_id)
        if known is not None and known[1] > now and hmac.compare_digest(known[0], credential):
            self._admitted.move_to_end(peer_id)
            return True
        if not hmac.compare_digest(credential, self.credential_for(peer_id)):
            return False
        self._admitted[peer_id] = (credential, now + self._cache_ttl)
        self._admitted.move_to_end(peer_id)
        while len(self._admitted) > self._cache_size:
            self._admitted.popitem(last=False)
        return True

    @property
    def cached(self) -> int:
        """Entries in the admitted-peers cache (bounded by `cache_size`)."""
        return len(self._admitted)

    def denial(self, peer_id: str) -> str:
        return (
            f"run {self.run_name} is private: peer {peer_id} is not on its allowlist "
            "and presented no valid join credential"
        )

    def check(self, peer_id: str, credential: str, *, protocol: str) -> None:
        """Raises (and counts) `AccessDeniedError` unless `peer_id` is admitted."""
        if not self.admits(peer_id, credential):
            metrics.ACCESS_DENIED.labels(protocol).inc()
            logger.info("refused %s access to %s", protocol, peer_id)
            raise AccessDeniedError(self.denial(peer_id))

    def admits_record(self, peer_id: str, record: Any) -> bool:
        """Whether a signed DHT record of a member kind comes from a member (counted if not)."""
        if self.admits(peer_id, getattr(record, "credential", "")):
            return True
        metrics.ACCESS_DENIED.labels("dht").inc()
        return False

    def hello(self) -> AccessHello:
        return AccessHello(run_id=self.run_id, credential=self.own_credential)

    def check_self(self) -> None:
        """Raises `AccessDeniedError` with what to do when this process cannot take part, so that a
        refused peer or trainer stops at once with one clear line instead of being refused by
        every member; warns when an allowlisted process cannot check others' credentials."""
        if not self.private:
            return
        run = f"run {self.run_name} ({self.run_id})"
        if self._given_token and self.access.token_sha256 and self._token is None:
            raise AccessDeniedError(
                f"{run} is private and the join token given is not its token "
                "(its sha256 differs from the manifest's access.token_sha256)"
            )
        if self.own_peer_id in self.access.allowlist:
            if self.access.token_sha256 and self._token is None:
                logger.warning(
                    "%s has a join token and none was given: admitting allowlisted peers only", run
                )
            return
        if self._token is not None:
            return
        if self.access.token_sha256:
            raise AccessDeniedError(
                f"{run} is private: this process ({self.own_peer_id}) is not on its allowlist and has no "
                "join token (give it with --join-token-file or SWARMNET_JOIN_TOKEN)"
            )
        raise AccessDeniedError(
            f"{run} is private: this process ({self.own_peer_id}) is not on its allowlist; ask the run's "
            "operator to add it (`swarmnet identity KEYFILE` prints a key file's peer id; "
            "pass that key with --identity)"
        )


# --- the policy of a libp2p host ----------------------------------------------------------------

_POLICIES: weakref.WeakKeyDictionary[Any, AccessPolicy] = weakref.WeakKeyDictionary()
"""The policy each libp2p host (hivemind `P2P`) serves and dials under. It belongs to the host
because every stub and servicer is handed the host, including those built by code that knows
nothing about access (state downloads, expert calls)."""


def attach(p2p: Any, policy: AccessPolicy) -> None:
    _POLICIES[p2p] = policy


def policy_for(p2p: Any) -> AccessPolicy | None:
    return _POLICIES.get(p2p)


StreamHandler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def add_stream_handler(p2p: Any, protocol: str, handler: StreamHandler, *, what: str) -> None:
    """Registers a libp2p stream handler behind the access check; every servicer registers
    through here. The policy is looked up per stream, so the order of registration and
    `attach` does not matter."""
    await p2p.add_binary_stream_handler(protocol, guarded(p2p, handler, what=what))


def guarded(p2p: Any, handler: StreamHandler, *, what: str) -> StreamHandler:
    async def guarded_handler(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        policy = policy_for(p2p)
        if (
            policy is not None
            and policy.private
            and not await _admit_stream(policy, info, reader, writer, what)
        ):
            return
        await handler(info, reader, writer)

    return guarded_handler


async def _admit_stream(
    policy: AccessPolicy, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, what: str
) -> bool:
    """Reads the stream's `AccessHello` and checks the client; on refusal answers the typed error,
    drains what the client still sends (so it reads the error, not a reset) and closes."""
    client = str(info.peer_id)
    stream = FramedStream(reader, writer, peer=client)
    try:
        async with asyncio.timeout(HELLO_TIMEOUT):
            hello: AccessHello | None = await stream.receive_message(AccessHello)
    except SwarmnetError:  # another message first (ProtocolError), or an error frame
        hello = None  # a request without a hello: a client that does not know the run is private
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        await quietly(stream.close())
        return False
    try:
        if hello is not None and hello.run_id != policy.run_id:
            raise UnknownRunError(f"this peer serves run {policy.run_id}, not {hello.run_id[:80]!r}")
        if hello is None and policy.admits(client):
            metrics.ACCESS_DENIED.labels(what).inc()
            raise AccessDeniedError(
                f"run {policy.run_name} is private: every stream must open with AccessHello"
            )
        policy.check(client, hello.credential if hello is not None else "", protocol=what)
        return True
    except SwarmnetError as e:
        await quietly(stream.send_error(e))
        await quietly(stream.finish())
        await quietly(stream.close())
        return False


# --- making a run private (the coordinator) -----------------------------------------------------

MIN_TOKEN_CHARS = 16
"""The manifest publishes the token's sha256, so a short token could be guessed offline."""


def with_access(
    manifest: RunManifest, *, allow: list[str], token: str | None, coordinator: str
) -> RunManifest:
    """`manifest` with its `[access]` table completed from the coordinator's flags: `allow` added to
    the allowlist, the token's hash set (or checked against the one the manifest holds), and the
    coordinator's own id on the allowlist whenever there is one, so members always admit the
    node that archives and observes the run."""
    current = manifest.access
    digest = current.token_sha256
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"the join token must have at least {MIN_TOKEN_CHARS} characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if digest and not hmac.compare_digest(digest, token_sha256(token)):
            raise ConfigError("the join token given does not match the manifest's access.token_sha256")
        digest = token_sha256(token)
    elif digest:
        raise ConfigError(
            "the manifest's run needs its join token (--join-token-file or SWARMNET_JOIN_TOKEN): "
            "the coordinator checks members' credentials with it"
        )
    allowlist = set(current.allowlist) | set(allow)
    if allowlist:
        allowlist.add(coordinator)
    updated = AccessConfig(allowlist=tuple(allowlist), token_sha256=digest)
    return manifest if updated == current else dataclasses.replace(manifest, access=updated)


def describe(access_config: AccessConfig) -> str:
    """One line for operators (never the token)."""
    if not access_config.private:
        return "public"
    parts = []
    if access_config.allowlist:
        parts.append(f"{len(access_config.allowlist)} allowlisted peer id(s)")
    if access_config.token_sha256:
        parts.append("join token holders")
    return "private: admits " + " and ".join(parts)
