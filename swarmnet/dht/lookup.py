"""A DHT read that stops once enough of a key's replicas have answered.

hivemind's `DHTNode.get(key, latest=True)` cannot stop early: "latest" means "keep looking for a
newer copy", so it visits its whole beam even when the first nodes it asks all hold the record.
swarmnet's records are stored on the `num_replicas` (5) nodes nearest their key and refreshed by
heartbeats, and every subkey of a key is written to the same replicas; so once `enough` replicas
(3 by default: a majority of 5) have answered, their merged view holds every subkey that any
successful store left on a majority, each at the newest copy those replicas hold.

The traversal is Kademlia's: ask the `parallel` nearest unvisited nodes among the `beam` nearest
known, learn closer nodes from the answers, repeat; it ends when `enough` answers carried the key,
or when the `beam` nearest known nodes have all been asked (then it has read exactly what the
full-beam search would have). Every answer is validated by hivemind's `DHTProtocol.call_find` (our
`SwarmnetRecordValidator`) before it is merged.

Built on hivemind 1.1.12 internals (`protocol.storage`, `routing_table`, `call_find`), which the
pinned version keeps stable.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.utils import ValueWithExpiration

ENOUGH_REPLICAS = 3


class _Merged:
    """The subkeys of every answer, each at its latest expiration (what `latest=True` returns)."""

    def __init__(self) -> None:
        self.entries = DictionaryDHTValue()

    def add(self, found: ValueWithExpiration | None) -> bool:
        """Merges one answer; whether it carried a dictionary value for the key."""
        if found is None or not isinstance(found.value, DictionaryDHTValue):
            return False  # swarmnet stores every record under a subkey; a plain value is not ours
        for subkey, (value, expiration) in found.value.items():
            self.entries.store(subkey, value, expiration)
        return True

    def result(self, key_id: DHTID, protocol: DHTProtocol) -> dict[Any, ValueWithExpiration] | None:
        """Deserialized like hivemind's own search result: subkey -> (value, expiration); expired
        subkeys were never stored or are dropped by `items()` (hivemind's `TimedStorage`)."""
        out = {}
        for subkey, (value_bytes, expiration) in self.entries.items():
            if protocol.record_validator is not None:
                record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), value_bytes, expiration)
                value_bytes = protocol.record_validator.strip_value(record)
            out[subkey] = ValueWithExpiration(protocol.serializer.loads(value_bytes), expiration)
        return out or None


async def read_latest(
    node: DHTNode, key: str, *, beam: int, parallel: int, enough: int = ENOUGH_REPLICAS
) -> dict[Any, ValueWithExpiration] | None:
    """The live subkeys of `key` (subkey -> value with expiration), or None if no node holds any."""
    protocol = node.protocol
    key_id = DHTID.generate(source=key)
    merged = _Merged()
    replicas = int(merged.add(protocol.storage.get(key_id)))  # we may be one of the nearest ourselves
    known = dict(protocol.routing_table.get_nearest_neighbors(key_id, protocol.bucket_size, exclude=node.node_id))
    visited: set[DHTID] = set()
    while replicas < enough:
        nearest = heapq.nsmallest(beam, known, key=key_id.xor_distance)
        todo = [n for n in nearest if n not in visited][:parallel]
        if not todo:
            break  # the beam's nodes have all answered (or failed)
        visited.update(todo)
        answers = await asyncio.gather(*(node._call_find_with_blacklist(known[n], [key_id]) for n in todo))
        for asked, answer in zip(todo, answers):
            if not answer or key_id not in answer:
                del known[asked]  # no answer (or blacklisted): the next nearest takes its place
                continue
            found, neighbours = answer[key_id]
            known.update((n, peer) for n, peer in neighbours.items() if n != node.node_id)
            replicas += merged.add(found)
    return merged.result(key_id, protocol)
