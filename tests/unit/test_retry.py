"""Tests of `swarmnet.pipeline.retry.RetryPolicy` with a fake clock (no sleeping, no network)."""

from __future__ import annotations

import asyncio
import random

import pytest

from swarmnet.config import RetryConfig
from swarmnet.errors import (
    BadRequestError,
    ConfigError,
    ManifestError,
    PeerBusyError,
    PeerUnavailableError,
    ProtocolError,
    RemoteError,
    SwarmError,
    UnknownMicrobatchError,
    UnknownRunError,
)
from swarmnet.pipeline.retry import RetryPolicy

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(clock: FakeClock | None = None, **overrides) -> RetryPolicy:
    return RetryPolicy(RetryConfig(**overrides), clock=clock or FakeClock())


# --- bans -----------------------------------------------------------------------------------------


def test_ban_expires_after_ban_seconds():
    clock = FakeClock()
    p = policy(clock, ban_seconds=10.0)
    p.ban("a")
    assert p.is_banned("a") and p.banned() == {"a"}
    clock.now += 9.9
    assert p.is_banned("a")
    clock.now += 0.1
    assert not p.is_banned("a")
    assert p.banned() == set()


def test_expired_bans_are_dropped_others_kept():
    clock = FakeClock()
    p = policy(clock, ban_seconds=5.0)
    p.ban("old")
    clock.now += 3
    p.ban("new")
    clock.now += 3
    assert p.banned() == {"new"}
    assert "old" not in p._banned_until  # dropped, not just hidden


def test_reban_extends_never_shortens():
    clock = FakeClock()
    p = policy(clock, ban_seconds=10.0)
    p.ban("a")
    clock.now += 8
    p.ban("a")
    clock.now += 8  # 16 s after the first ban, 8 s after the second
    assert p.is_banned("a")
    clock.now += 2
    assert not p.is_banned("a")


def test_unban_and_unknown_peers():
    p = policy()
    assert not p.is_banned("nobody")
    p.unban("nobody")
    p.ban("a")
    p.unban("a")
    assert not p.is_banned("a")


def test_banned_returns_a_copy():
    p = policy()
    p.ban("a")
    p.banned().add("b")
    assert p.banned() == {"a"}


# --- backoff --------------------------------------------------------------------------------------


def test_backoff_doubles_from_base_and_caps():
    p = policy(base_delay=0.1, max_delay=1.0)
    delays = [p.backoff(a) for a in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert p.backoff(10_000) == 1.0


def test_backoff_jitter_stays_within_half_to_full():
    p = policy(base_delay=0.1, max_delay=2.0)
    rng = random.Random(0)
    for attempt in range(8):
        full = p.backoff(attempt)
        samples = [p.backoff(attempt, rng) for _ in range(200)]
        assert all(0.5 * full <= s <= full for s in samples)
        assert max(samples) - min(samples) > 0.1 * full  # it does vary


def test_backoff_jitter_is_deterministic_given_rng():
    p = policy()
    assert [p.backoff(a, random.Random(3)) for a in range(5)] == [
        p.backoff(a, random.Random(3)) for a in range(5)
    ]


def test_backoff_rejects_negative_attempt():
    with pytest.raises(ValueError):
        policy().backoff(-1)


# --- should_retry / should_ban --------------------------------------------------------------------

ERRORS = {
    # name: (error, retryable, ban-worthy)
    "timeout": (TimeoutError(), True, True),
    "asyncio timeout": (asyncio.TimeoutError(), True, True),
    "connection reset": (ConnectionResetError(), True, True),
    "connection refused": (ConnectionRefusedError(), True, True),
    "broken pipe": (BrokenPipeError(), True, True),
    "os error": (OSError("no route"), True, False),
    "incomplete read": (asyncio.IncompleteReadError(b"ab", 10), True, True),
    "protocol": (ProtocolError("bad frame"), True, True),
    "unavailable": (PeerUnavailableError("gone", peer="p"), True, True),
    "busy": (PeerBusyError("full", peer="p"), True, False),
    "unknown microbatch": (UnknownMicrobatchError("evicted", peer="p"), True, False),
    "bad request": (BadRequestError("shape", peer="p"), False, False),
    "unknown run": (UnknownRunError("run?", peer="p"), False, False),
    "remote (untyped)": (RemoteError("?", peer="p"), False, False),
    "config": (ConfigError("bad"), False, False),
    "manifest": (ManifestError("none"), False, False),
    "swarm": (SwarmError("no peers"), False, False),
    "assertion": (AssertionError("bug"), False, False),
    "bare exception": (Exception("?"), False, False),
    "value error": (ValueError("?"), False, False),
    "cancelled": (asyncio.CancelledError(), False, False),
    "keyboard interrupt": (KeyboardInterrupt(), False, False),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_should_retry_table(name):
    error, retryable, _ = ERRORS[name]
    assert policy(max_attempts=5).should_retry(error, 0) is retryable


@pytest.mark.parametrize("name", list(ERRORS))
def test_should_ban_table(name):
    error, _, ban_worthy = ERRORS[name]
    assert policy().should_ban(error) is ban_worthy


def test_attempts_are_finite():
    p = policy(max_attempts=3)
    error = PeerUnavailableError("gone")
    assert [p.should_retry(error, a) for a in range(5)] == [True, True, False, False, False]


def test_single_attempt_never_retries():
    assert not policy(max_attempts=1).should_retry(TimeoutError(), 0)


def test_retry_loop_terminates_with_exactly_max_attempts():
    p = policy(max_attempts=4)
    tries = 0
    attempt = 0
    while True:
        tries += 1
        if not p.should_retry(ConnectionResetError(), attempt):
            break
        attempt += 1
    assert tries == 4


@pytest.mark.parametrize(
    "overrides", [dict(max_attempts=0), dict(base_delay=-1.0), dict(max_delay=-1.0), dict(ban_seconds=-1.0)]
)
def test_invalid_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        policy(**overrides)


def test_exposes_config_values():
    p = policy(max_attempts=7, call_timeout=3.5)
    assert p.max_attempts == 7
    assert p.call_timeout == 3.5
