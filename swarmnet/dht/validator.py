"""The DHT record validator every swarmnet node runs.

hivemind calls `validate` when another node asks us to store a record and when a node returns a
record to our query. A swarmnet DHT holds only swarmnet records: a value is accepted only if it is a
signed record (`records.py`) whose key, subkey (= signer's peer id) and expiration are exactly the
ones it was signed for, and whose kind is the one its key holds.
"""

from __future__ import annotations

import logging

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from swarmnet.dht.keys import record_kind_for_key
from swarmnet.dht.records import RecordError, decode_record

logger = logging.getLogger(__name__)


class SwarmnetRecordValidator(RecordValidatorBase):
    def validate(self, record: DHTRecord) -> bool:
        try:
            check_dht_record(record)
            return True
        except RecordError as e:
            logger.debug("refused DHT record: %s", e)
            return False

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
        raise RecordError(f"a {type(signed.record).KIND} record cannot live under {signed.key!r}")
    if DHTID.generate(source=signed.key).to_bytes() != record.key:
        raise RecordError("record was signed for another key")
    if subkey != signed.peer_id:
        raise RecordError("record subkey is not its signer's peer id")
    if record.expiration_time != signed.expiration:
        raise RecordError("record expiration differs from the signed one")
