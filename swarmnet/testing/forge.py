"""Fault injection: try to publish forged run manifests into a live swarm (a hostile process).

    python -m swarmnet.testing.forge --initial-peers MADDR --victim PEER_ID

Prints one JSON line: whether each forgery was accepted by the DHT, and the run id it claims.
- `foreign_subkey`: a manifest signed by us but stored under the victim's (coordinator's) subkey;
  every honest DHT node refuses it, since the signature is not the subkey owner's.
- `hash_mismatch`: a validly signed record under our own subkey whose content does not hash to
  the run id it claims; DHT nodes store it, and peers refuse it when they verify the manifest.
- `replayed`: a validly signed trainer record of ours stored again after a newer one replaced it
  (what a thief of old records would try); DHT nodes refuse the stale copy, and a read returns
  the newest.
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
from swarmnet.dht.records import ManifestRecord, TrainerRecord, encode_record


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
            # 3. A replay: an older, validly signed copy of a record stored after a newer one.
            key = keys.trainer_key(manifest.run_id)
            old_expiration, new_expiration = get_dht_time() + 30, get_dht_time() + 60
            old = encode_record(identity, key, TrainerRecord(step=1, loss=5.0, samples_per_s=1.0), old_expiration)
            new = encode_record(identity, key, TrainerRecord(step=2, loss=4.0, samples_per_s=1.0), new_expiration)
            first_ok = await dht.node.store(key, old, old_expiration, subkey=identity.peer_id)
            newer_ok = await dht.node.store(key, new, new_expiration, subkey=identity.peer_id)
            replay_ok = await dht.node.store(key, old, old_expiration, subkey=identity.peer_id)
            steps = [r.record.step for r in await dht.get(key)]
            return {
                "foreign_subkey_stored": bool(foreign_ok),
                "hash_mismatch_stored": bool(mismatch_ok),
                "claimed_run_id": claimed,
                "original_stored": bool(first_ok and newer_ok),
                "replay_stored": bool(replay_ok),
                "steps_read_after_replay": steps,
            }
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
