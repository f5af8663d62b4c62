"""A client flooding a stage peer with valid work does not stop an honest trainer: the peer caps
each client's share of its compute queue and input cache, serves clients fairly, and answers the
flood's excess with a retryable busy error."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter

import pytest
import torch

from swarmnet.dht.identity import Identity
from swarmnet.dht.node import SwarmDHT
from swarmnet.errors import PeerBusyError, SwarmnetError
from swarmnet.protocols.stage import StageStub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STEPS = 10
FLOOD_CONCURRENCY = 96


def test_a_flooding_client_does_not_stop_an_honest_trainer(swarm, manifest):
    stage0, _ = swarm.start_peers([0, 1])
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    flooding = threading.Event()
    flooder = threading.Thread(target=lambda: asyncio.run(_flood(stage0.ready, manifest, outcomes, stop, flooding)))
    flooder.start()
    try:
        assert flooding.wait(60), "the flood did not start"
        trainer = swarm.start_trainer("--max-steps", str(STEPS))
        summary = trainer.wait_event("summary", 180)
    finally:
        stop.set()
        flooder.join(60)
    assert not flooder.is_alive()
    print(outcomes, summary)
    assert summary["steps"] == STEPS and summary["dropped"] == 0, summary
    # The flood ran the whole time, got served within its share, and its excess was refused.
    assert outcomes["served"] > 0 and outcomes["busy"] > 0, outcomes
    assert set(outcomes) <= {"served", "busy"}, outcomes
    assert stage0.alive


async def _flood(ready: dict, manifest, outcomes: Counter, stop: threading.Event, flooding: threading.Event) -> None:
    B, T = manifest.training.microbatch_size, manifest.training.seq_len
    identity = Identity.ephemeral()
    try:
        async with await SwarmDHT.create(identity=identity, client_mode=True) as client:
            stub = StageStub(client.p2p, ready["peer_id"], ready["maddrs"])
            tokens = torch.randint(0, 256, (B, T))
            counter = 0

            async def worker() -> None:
                nonlocal counter
                while not stop.is_set():
                    counter += 1
                    try:
                        await asyncio.wait_for(stub.forward(manifest.run_id, f"flood-{counter}", 0, tokens), 30)
                        outcomes["served"] += 1
                        flooding.set()
                    except PeerBusyError:
                        outcomes["busy"] += 1
                    except (SwarmnetError, TimeoutError, OSError) as e:
                        outcomes[type(e).__name__] += 1

            await asyncio.gather(*(worker() for _ in range(FLOOD_CONCURRENCY)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            identity.path.unlink()
