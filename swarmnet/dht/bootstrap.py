"""Where a process finds the DHT: `--initial-peers`, else `SWARMNET_INITIAL_PEERS`, else its profile.

An entry is a libp2p multiaddr (`/ip4/…/tcp/…/p2p/<peer id>`, `/dns4/…`) or a coordinator's HTTP
address (`http://coordinator.example.org:8470`): the process asks that coordinator's `/bootstrap`
endpoint for its current multiaddrs, peer id included. Deployments then need only a host name
(a compose service, a Kubernetes Service), not the coordinator's peer id.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import Iterable, Sequence

from swarmnet.errors import ConfigError

ENV = "SWARMNET_INITIAL_PEERS"
BOOTSTRAP_PATH = "/bootstrap"
MAX_BOOTSTRAP_BYTES = 64 * 1024
BOOTSTRAP_TIMEOUT = 10.0
BOOTSTRAP_ATTEMPTS = 30
"""Tries (one every 2 s) while the coordinator is not up yet, as when a whole swarm starts at once."""


def choose_initial_peers(cli: Sequence[str] | None, profile: Iterable[str] = (), env: str | None = None) -> tuple[list[str], str]:
    """The initial peers and where they came from (`--initial-peers`, the environment variable,
    the profile). Raises `ConfigError` when none is given anywhere."""
    if cli:
        return list(cli), "--initial-peers"
    text = os.environ.get(ENV, "") if env is None else env
    entries = [e for e in re.split(r"[\s,]+", text) if e]
    if entries:
        return entries, ENV
    if profile := list(profile):
        return profile, "the profile's initial_peers"
    raise ConfigError(
        f"no initial peers: pass --initial-peers, set {ENV}, or list initial_peers in the profile "
        "(a multiaddr of any live peer, or a coordinator's http://host:8470)"
    )


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


async def resolve_initial_peers(entries: Sequence[str], *, attempts: int = BOOTSTRAP_ATTEMPTS) -> list[str]:
    """Multiaddrs for `entries`: multiaddrs as they are, coordinator URLs expanded through their
    `/bootstrap` endpoint (retried while the coordinator starts). Raises `ConfigError` for an entry
    that is neither, or a URL that never answers with multiaddrs."""
    resolved: list[str] = []
    for entry in entries:
        if entry.startswith("/"):
            resolved.append(entry)
        elif is_url(entry):
            resolved.extend(await _fetch(entry, attempts))
        else:
            raise ConfigError(f"initial peer {entry!r} is neither a multiaddr (/ip4/…) nor an http(s):// coordinator URL")
    return resolved


async def _fetch(url: str, attempts: int) -> list[str]:
    endpoint = url.rstrip("/") + BOOTSTRAP_PATH
    error: Exception | None = None
    for attempt in range(max(attempts, 1)):
        try:
            return await asyncio.to_thread(_get_maddrs, endpoint)
        except (OSError, ValueError) as e:  # URLError is an OSError; bad JSON is a ValueError
            error = e
        if attempt + 1 < attempts:
            await asyncio.sleep(2.0)
    raise ConfigError(f"could not bootstrap from {endpoint}: {error}")


def _get_maddrs(endpoint: str) -> list[str]:
    with urllib.request.urlopen(endpoint, timeout=BOOTSTRAP_TIMEOUT) as response:
        body = response.read(MAX_BOOTSTRAP_BYTES + 1)
    if len(body) > MAX_BOOTSTRAP_BYTES:
        raise ValueError("bootstrap answer too large")
    return parse_bootstrap(json.loads(body))


def parse_bootstrap(answer: object) -> list[str]:
    """The multiaddrs in a `/bootstrap` answer (`{"maddrs": [...], ...}`); ValueError if malformed."""
    maddrs = answer.get("maddrs") if isinstance(answer, dict) else None
    if not isinstance(maddrs, list) or not maddrs or not all(isinstance(m, str) and m.startswith("/") for m in maddrs):
        raise ValueError(f"not a bootstrap answer: {str(answer)[:200]}")
    return maddrs[:32]
