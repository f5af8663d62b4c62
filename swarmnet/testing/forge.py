"""Fault injection: try to publish forged run manifests into a live swarm (a hostile process).

    python -m swarmnet.testing.forge --initial-peers MADDR --victim PEER_ID

Prints one JSON line: whether each forgery was accepted by the DHT, and the run id it claims.
- `foreign_subkey`: a manifest signed by us but stored under the victim's (coordinator's) subkey;
  every honest DHT node refuses it, since the signature is not the subkey owner's.
- `hash_mismatch`: a validly signed record under our own subkey whose content does not hash to
  the run id it claims; DHT nodes store it, and peers refuse it when they verify the manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import msgpack
from hivemind.utils import get_dht_time

from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import ManifestRecord, encode_record


async def forge(initial_peers: list[str], victim: str) -> dict:
    identity = Identity.ephemeral()
    try:
        async with await SwarmDHT.create(identity=identity, initial_peers=initial_peers, client_mode=True) as dht:
            manifest = RunManifest(name="forged")
            expiration = get_dht_time() + 60
            # 1. Our signature, the victim's slot.
            fields = msgpack.unpackb(
                encode_record(identity, keys.MANIFESTS, ManifestRecord(run_id=manifest.run_id, manifest=manifest.to_dict()), expiration)
            )
            fields[3] = victim
            foreign = msgpack.packb(fields, use_bin_type=True)
            foreign_ok = await dht.node.store(keys.MANIFESTS, foreign, expiration, subkey=victim)
            # 2. A valid signature over content that does not hash to the claimed run id.
            claimed = "f" * 16
            mismatch = ManifestRecord(run_id=claimed, manifest=manifest.to_dict())
            mismatch_ok = await dht.put(keys.MANIFESTS, mismatch, 60)
            return {"foreign_subkey_stored": bool(foreign_ok), "hash_mismatch_stored": bool(mismatch_ok), "claimed_run_id": claimed}
    finally:
        with contextlib.suppress(FileNotFoundError):
            identity.path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--victim", required=True, help="peer id whose manifest slot to forge")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(forge(args.initial_peers, args.victim))), flush=True)


if __name__ == "__main__":
    main()
