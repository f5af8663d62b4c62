"""The DHT record validator every swarmnet node runs.

hivemind calls `validate` when another node asks us to store a record and when a node returns a
record to our query. A swarmnet DHT holds only swarmnet records: a value is accepted only if it is a
signed record (`records.py`) whose key, subkey (= signer's peer id) and expiration are exactly the
ones it was signed for, and whose kind is the one its key holds.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarmnet.dht.keys import record_kind_for_key
from swarmnet.dht.records import RecordError, decode_record
from swarmnet.telemetry import metrics

logger = logging.getLogger(__name__)


STALE_MEMORY = 16384
"""(key, subkey) pairs whose newest expiration this node remembers, to refuse replayed old copies."""


class SwarmnetRecordValidator(RecordValidatorBase):
    """Also refuses *replays*: a record older (by its signed expiration, which every refresh moves
    forward) than one this node already validated for the same key and signer. A replayed copy
    carries a valid signature, so only its age gives it away; hivemind keeps the newest value per
    subkey in storage, this also keeps stale copies out of query answers."""

    def __init__(self) -> None:
        super().__init__()
        self._newest: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()
        self._lock = threading.Lock()

    def validate(self, record: DHTRecord) -> bool:
        try:
            check_dht_record(record)
            self._check_fresh(record)
            return True
        except RecordError as e:
            metrics.RECORDS_REJECTED.labels(reason=e.reason).inc()
            logger.debug("refused DHT record (%s): %s", e.reason, e)
            return False

    def _check_fresh(self, record: DHTRecord) -> None:
        if record.expiration_time < get_dht_time():
            raise RecordError("record has expired (a replayed old copy?)", reason="replayed")
        slot = (record.key, record.subkey)
        with self._lock:
            newest = self._newest.get(slot, -math.inf)
            if record.expiration_time < newest:
                raise RecordError(
                    f"stale record: a newer one (expiring {newest:.1f}) was already seen", reason="replayed"
                )
            self._newest[slot] = record.expiration_time
            self._newest.move_to_end(slot)
            while len(self._newest) > STALE_MEMORY:
                self._newest.popitem(last=False)

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmnetRecordValidator)


def check_dht_record(record: DHTRecord) -> None:
    """Raises `RecordError` unless `record` is a well-formed, correctly placed, signed record."""
    try:
        blob = msgpack.unpackb(record.value, raw=False)
        subkey = msgpack.unpackb(record.subkey, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise RecordError("value or subkey is not msgpack") from e
    if not isinstance(blob, bytes):
        raise RecordError("value is not a signed swarmnet record")
    signed = decode_record(blob)
    if record_kind_for_key(signed.key) != type(signed.record).KIND:
        raise RecordError(f"a {type(signed.record).KIND} record cannot live under {signed.key!r}", reason="misplaced")
    if DHTID.generate(source=signed.key).to_bytes() != record.key:
        raise RecordError("record was signed for another key", reason="forged")
    if subkey != signed.peer_id:
        raise RecordError("record subkey is not its signer's peer id", reason="forged")
    if record.expiration_time != signed.expiration:
        raise RecordError("record expiration differs from the signed one", reason="replayed")
