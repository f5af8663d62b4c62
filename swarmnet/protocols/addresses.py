"""The address to announce for a server, given the interface it is bound to."""

from __future__ import annotations

from collections.abc import Sequence

WILDCARDS = ("", "0.0.0.0", "::")


def announced_host(host: str, maddrs: Sequence[str]) -> str:
    """Where others reach a server bound to `host`: `host` itself, or for a wildcard interface the
    first non-loopback IPv4 among the process's libp2p multiaddrs (127.0.0.1 if it has none)."""
    if host not in WILDCARDS:
        return host
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and not parts[2].startswith("127.") and parts[2] != "0.0.0.0":
            return parts[2]
    return "127.0.0.1"
