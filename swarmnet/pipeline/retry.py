"""The one retry/backoff/ban policy used by every client of the swarm.

`RetryPolicy` decides; it never sleeps or calls anything. The async retry loops live in the callers,
which follow this shape:

    for attempt in itertools.count():
        peer = choose_peer(stage_peers, banned=policy.banned(), rng=rng)
        if peer is None: raise SwarmError(...)
        try:
            async with asyncio.timeout(policy.call_timeout):
                return await call(peer)
        except Exception as e:
            if policy.should_ban(e): policy.ban(peer.peer_id)
            if not policy.should_retry(e, attempt): raise
            await asyncio.sleep(policy.backoff(attempt, rng))

Retries are finite by construction: `should_retry` is False once `max_attempts` tries are spent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from swarmnet.config import RetryConfig
from swarmnet.errors import (
    PeerUnavailableError,
    ProtocolError,
    SwarmnetError,
)

# asyncio.TimeoutError is the builtin TimeoutError since 3.11; both are named for clarity.
_RETRYABLE = (TimeoutError, asyncio.TimeoutError, OSError, asyncio.IncompleteReadError)
"""Non-swarmnet errors that another try may fix (ConnectionError is an OSError)."""
_BAN_WORTHY = (TimeoutError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError)
"""Non-swarmnet errors that mean the peer is dead, frozen or dropped the stream."""


class RetryPolicy:
    """Finite retries with capped exponential backoff, and a time-limited ban list of peers.

    `clock` returns seconds on a monotonic scale; tests inject a fake one instead of sleeping.
    """

    def __init__(self, config: RetryConfig, *, clock: Callable[[], float] = time.monotonic):
        if config.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {config.max_attempts}")
        if config.base_delay < 0 or config.max_delay < 0 or config.ban_seconds < 0:
            raise ValueError("base_delay, max_delay and ban_seconds must be >= 0")
        self.config = config
        self._clock = clock
        self._banned_until: dict[str, float] = {}

    @property
    def max_attempts(self) -> int:
        """Tries per call, the first included."""
        return self.config.max_attempts

    @property
    def call_timeout(self) -> float:
        """Deadline in seconds of one forward or backward call."""
        return self.config.call_timeout

    # --- ban list -------------------------------------------------------------------------------

    def ban(self, peer_id: str) -> None:
        """Avoids `peer_id` for `ban_seconds` from now (extends an active ban, never shortens it)."""
        until = self._clock() + self.config.ban_seconds
        self._banned_until[peer_id] = max(until, self._banned_until.get(peer_id, until))

    def unban(self, peer_id: str) -> None:
        """Lifts a ban early (e.g. the peer answered a later call); no-op if it was not banned."""
        self._banned_until.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        """Whether `peer_id` is banned now."""
        return peer_id in self.banned()

    def banned(self) -> set[str]:
        """Peer ids whose ban is still active; expired bans are dropped."""
        now = self._clock()
        expired = [p for p, until in self._banned_until.items() if until <= now]
        for peer_id in expired:
            del self._banned_until[peer_id]
        return set(self._banned_until)

    # --- retries --------------------------------------------------------------------------------

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry).

        `base_delay * 2**attempt`, capped at `max_delay`; with `rng`, scaled by a uniform factor in
        [0.5, 1.0] so that clients that failed together do not retry in lockstep.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt}")
        base, cap = self.config.base_delay, self.config.max_delay
        # Beyond 2**64 the cap has long been reached; bounding the exponent avoids huge ints.
        delay = min(cap, base * 2.0 ** min(attempt, 64))
        if rng is not None:
            delay *= rng.uniform(0.5, 1.0)
        return delay

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether to try again after try number `attempt` (0-based) failed with `error`.

        True only if a try is left and the error is one another try (usually on another peer) can
        fix: a retryable `SwarmnetError`, a timeout, a connection or OS error, or a truncated stream.
        Never for programming errors (`AssertionError`, bare `Exception`) nor for our own bad
        requests (`BadRequestError`).
        """
        return attempt + 1 < self.config.max_attempts and is_retryable(error)

    def should_ban(self, error: BaseException) -> bool:
        """Whether the peer that raised `error` should be avoided for a while.

        Yes when the peer looks dead or broken: a timeout, a dropped connection or truncated
        stream, a protocol violation, or an unavailable reply. No when it is merely busy
        (`PeerBusyError` is transient), when it lost a cached microbatch (`UnknownMicrobatchError`:
        replay the forward), or when the request was ours to blame (`BadRequestError`).
        """
        if isinstance(error, SwarmnetError):
            return isinstance(error, (ProtocolError, PeerUnavailableError))
        return isinstance(error, _BAN_WORTHY)


def is_retryable(error: BaseException) -> bool:
    """Whether `error` is of a kind that another try may fix (attempt count aside)."""
    if isinstance(error, SwarmnetError):
        return error.retryable
    return isinstance(error, _RETRYABLE)
