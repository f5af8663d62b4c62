"""Publishing and finding the run manifest.

A manifest is accepted only if its record verifies (signature by the peer id it is stored under)
and its content hashes to the run id it claims. Which run to follow, when several are published:
the one named by `run_id` if given; else one signed by an initial peer (usually the coordinator we
bootstrapped from); else the only one there is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

from swarmnet.config import RunManifest
from swarmnet.dht import keys
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import ManifestRecord, RecordError
from swarmnet.errors import ManifestError

logger = logging.getLogger(__name__)

MANIFEST_TTL = 6 * 3600.0
"""Lifetime of a signed manifest record: the run outlives its coordinator this long. The
coordinator re-signs it every `MANIFEST_REFRESH`; peers replicate the signed record unchanged
every `MANIFEST_REPLICATE`, so it stays stored on live nodes when the coordinator is gone."""
MANIFEST_REFRESH = 60.0
MANIFEST_REPLICATE = 30.0


async def publish_manifest(dht: SwarmDHT, manifest: RunManifest, ttl: float = MANIFEST_TTL) -> bool:
    record = ManifestRecord(run_id=manifest.run_id, manifest=manifest.to_dict())
    return await dht.put(keys.MANIFESTS, record, ttl)


async def replicate_manifest(dht: SwarmDHT, run_id: str) -> int:
    """Stores again every verified manifest record of `run_id` found in the DHT (see MANIFEST_TTL);
    returns how many were stored."""
    stored = 0
    for signed in await dht.get(keys.MANIFESTS):
        try:
            if signed.record.verified_manifest().run_id != run_id:
                continue
        except RecordError:
            continue
        stored += await dht.replicate(signed)
    return stored


async def keep_manifest(dht: SwarmDHT, run_id: str, period: float = MANIFEST_REPLICATE) -> None:
    """Replicates the run's manifest now and every `period` seconds until cancelled (peers run
    this: a coordinator that dies right after the first peers joined has stored it only on itself)."""
    while True:
        try:
            await replicate_manifest(dht, run_id)
        except Exception as e:  # noqa: BLE001 - best effort; retried at the next period
            logger.debug("could not replicate the manifest: %s", e)
        await asyncio.sleep(period)


def select_manifest(
    candidates: dict[str, RunManifest], *, run_id: str | None, preferred_signers: Collection[str]
) -> RunManifest | None:
    """Pure choice among verified manifests keyed by signer peer id (see module docstring)."""
    if run_id is not None:
        matching = [m for m in candidates.values() if m.run_id == run_id]
        return matching[0] if matching else None
    preferred = [m for signer, m in candidates.items() if signer in preferred_signers]
    if preferred:
        return preferred[0]
    runs = {m.run_id: m for m in candidates.values()}
    if len(runs) > 1:
        raise ManifestError(f"several runs are published ({sorted(runs)}): choose one with --run-id")
    return next(iter(runs.values()), None)


async def fetch_manifest(
    dht: SwarmDHT,
    *,
    run_id: str | None = None,
    preferred_signers: Collection[str] = (),
    timeout: float = 30.0,
) -> RunManifest:
    """Polls the DHT until a verified manifest for the chosen run appears, or raises `ManifestError`."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        candidates: dict[str, RunManifest] = {}
        try:
            found = await dht.get(keys.MANIFESTS)
        except TimeoutError:
            found = []
        for signed in found:
            try:
                candidates[signed.peer_id] = signed.record.verified_manifest()
            except RecordError as e:
                logger.warning("refusing manifest signed by %s: %s", signed.peer_id, e)
        chosen = select_manifest(candidates, run_id=run_id, preferred_signers=preferred_signers)
        if chosen is not None:
            return chosen
        if time.monotonic() + delay > deadline:
            what = f"run {run_id}" if run_id else "any run"
            raise ManifestError(f"no verified manifest for {what} found in the DHT within {timeout:.0f} s")
        await asyncio.sleep(delay)  # backoff between polls of the DHT, not a readiness wait
        delay = min(delay * 2, 2.0)


def peer_ids_of(maddrs: Collection[str]) -> set[str]:
    """Peer ids named by `/p2p/<id>` components of multiaddrs."""
    return {m.rsplit("/p2p/", 1)[1] for m in maddrs if "/p2p/" in m}
