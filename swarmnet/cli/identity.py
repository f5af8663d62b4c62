"""`swarmnet identity KEYFILE`: print the peer id of a key file (created on first use).

A private run's allowlist names peer ids, which are useful only if they outlive a restart: give
each allowlisted process a key file (`--identity KEYFILE`) and put the id printed here in the
manifest's `[access] allowlist` (or pass it to `swarmnet coordinator --allow`).
"""

from __future__ import annotations

import argparse
import sys

from swarmnet.errors import SwarmnetError


def add_parser(commands) -> None:
    p = commands.add_parser(
        "identity", help="print a key file's peer id (creating the key if it does not exist)"
    )
    p.add_argument("path", metavar="KEYFILE", help="libp2p Ed25519 key file, as used by --identity")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from swarmnet.dht.identity import Identity

    try:
        print(Identity.load_or_create(args.path).peer_id, flush=True)
    except (SwarmnetError, OSError) as e:
        print(f"swarmnet identity: {e}", file=sys.stderr)
        return 2
    return 0
