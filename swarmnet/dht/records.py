"""Typed, versioned, signed DHT records.

Wire form (msgpack): `[kind, version, key, peer_id, expiration, body, signature]`. The signature is
the Ed25519 signature, by `peer_id`'s key, over msgpack of the first six fields, so a record cannot be
moved to another key, another owner or another expiration without breaking it. Every record is
stored under a subkey equal to its signer's peer id.

Compatibility rule: a record body may carry fields this version does not know; decoders ignore them
(the signature still covers them, so nobody can add any to another's record). New fields are added
with a default and `omit_if_default` (see `protocols/codec.py`), so records that do not use them
are byte-identical to the previous version's. Wire messages stay strict.

Private runs: the records of run members (`MEMBER_KINDS`) carry the signer's join `credential`
(`protocols/access.py`), filled in by `SwarmDHT.put`; readers in a private run ignore records
whose signer is neither on the run's allowlist nor presents a valid credential.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from swarmnet.config import RunManifest
from swarmnet.dht.identity import Identity, verify_signature
from swarmnet.errors import ConfigError, SwarmnetError
from swarmnet.protocols.codec import from_body, to_body

MAX_RECORD_BYTES = 64 * 1024
VERIFIED_CACHE_SIZE = 4096
"""Records already parsed and verified, by their exact bytes. A DHT get sees the same records again
in every node's answer, and hivemind validates each answer record by record: without the cache a
get of a key with 32 subkeys spends most of its CPU re-checking signatures (P9 benchmark)."""
VERIFIED_CACHE_BYTES = 16 * 1024 * 1024
"""...and at most this many bytes of them (records may be up to `MAX_RECORD_BYTES`; most are a few
hundred bytes, so the entry bound is the one that normally applies)."""
_verified: OrderedDict[bytes, "SignedRecord"] = OrderedDict()
_verified_bytes = 0
_verified_lock = threading.Lock()


class RecordError(SwarmnetError):
    """A DHT record is malformed, of the wrong type or version, or its signature is invalid.

    `reason` is the label it is counted under in `swarmnet_records_rejected_total`: `forged` (a
    signature that does not hold), `replayed` (expired, stale or re-dated), `misplaced` (under a key
    that does not hold its kind) or `malformed` (everything else)."""

    code = "bad_record"

    def __init__(self, message: str, *, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class StageServerRecord:
    """A peer serving one pipeline stage or one expert, refreshed by its heartbeat."""

    KIND: ClassVar[str] = "stage_server"
    VERSION: ClassVar[int] = 1

    stage: int
    throughput: float
    """Measured samples/s (a moving average of real serving after start-up)."""
    queue_depth: int
    """Requests waiting for compute right now."""
    device: str
    memory_bytes: int
    """Memory the stage occupies (parameters, gradients, optimizer state)."""
    step: int
    """Optimizer steps the peer has taken."""
    metrics_addr: str | None
    """host:port of the peer's Prometheus endpoint, if it runs one."""
    maddrs: list[str]
    """Multiaddrs where the peer can be reached."""
    averaging_addr: str | None = None
    """host:port of the peer's all-reduce data plane."""
    expert: str | None = None
    """The expert uid, for a peer serving an expert (then `stage` is the expert's unit index)."""
    failed_rounds: int = 0
    """All-reduce rounds of this peer that failed since it started serving the unit."""
    credential: str = field(default="", metadata={"omit_if_default": True})
    """Private runs: the signer's join credential (see `protocols/access.py`)."""


@dataclass(frozen=True, kw_only=True)
class ProgressRecord:
    """Where one peer stands in its stage's current collaborative step."""

    KIND: ClassVar[str] = "progress"
    VERSION: ClassVar[int] = 1

    epoch: int
    """The step the peer's parameters are at (the next step it will take is `epoch + 1`)."""
    samples: int
    """Samples accumulated towards the next step (diloco: since the last outer step)."""
    joining: bool
    """True while the peer is still downloading the stage's state."""
    left: bool
    """True once the peer has stopped serving this stage (shut down or moved)."""
    digest: str
    """sha256 of the peer's parameters at `epoch` (equal digests: identical replicas)."""
    leaving: bool = False
    """True while the peer drains before leaving (SIGTERM): trainers stop sending it new work, its
    stage-mates still count it in the round that commits the gradients it holds."""
    round_nonce: str = ""
    """Set by the leader of a round (the smallest peer id of its members): a fresh value per
    attempt, which every member puts in the round id, so attempts never mix."""
    credential: str = field(default="", metadata={"omit_if_default": True})
    """Private runs: the signer's join credential (see `protocols/access.py`)."""


@dataclass(frozen=True, kw_only=True)
class TrainerRecord:
    """A trainer driving microbatches through the run."""

    KIND: ClassVar[str] = "trainer"
    VERSION: ClassVar[int] = 1

    step: int
    loss: float
    samples_per_s: float
    metrics_addr: str | None = None
    """host:port of the trainer's Prometheus endpoint, if it runs one."""
    credential: str = field(default="", metadata={"omit_if_default": True})
    """Private runs: the signer's join credential (see `protocols/access.py`)."""


@dataclass(frozen=True, kw_only=True)
class ArchivedStage:
    """One stage's state held by an archive: its step and its state digest."""

    stage: int
    step: int
    digest: str


@dataclass(frozen=True, kw_only=True)
class ArchiveRecord:
    """A node (the coordinator) that holds stage states of the run and serves them over the state
    protocol, so that a stage whose every peer left can be restored."""

    KIND: ClassVar[str] = "archive"
    VERSION: ClassVar[int] = 1

    stages: list[ArchivedStage]
    maddrs: list[str]
    credential: str = field(default="", metadata={"omit_if_default": True})
    """Private runs: the signer's join credential (see `protocols/access.py`)."""


@dataclass(frozen=True, kw_only=True)
class ManifestRecord:
    """The run manifest, published by the coordinator; `run_id` must equal the content hash."""

    KIND: ClassVar[str] = "manifest"
    VERSION: ClassVar[int] = 1

    run_id: str
    manifest: dict

    def verified_manifest(self) -> RunManifest:
        try:
            manifest = RunManifest.from_dict(self.manifest)
        except (ConfigError, TypeError, ValueError, ArithmeticError) as e:
            raise RecordError(f"manifest record does not parse: {e}") from e
        if manifest.run_id != self.run_id:
            raise RecordError(f"manifest content hashes to {manifest.run_id}, record claims {self.run_id}")
        return manifest


RECORD_TYPES: dict[str, type] = {
    cls.KIND: cls for cls in (StageServerRecord, ProgressRecord, TrainerRecord, ManifestRecord, ArchiveRecord)
}
MEMBER_KINDS = frozenset(cls.KIND for cls in (StageServerRecord, ProgressRecord, TrainerRecord, ArchiveRecord))
"""Records that only members of a private run may publish (the manifest is how one learns the
run is private, so anyone may read and replicate it)."""


@dataclass(frozen=True)
class SignedRecord:
    """A verified record together with where it lives and who signed it."""

    key: str
    peer_id: str
    expiration: float
    record: Any
    blob: bytes | None = field(default=None, compare=False, repr=False)
    """The signed bytes as stored (to replicate the record unchanged)."""


def encode_record(identity: Identity, key: str, record: Any, expiration: float) -> bytes:
    head = [record.KIND, record.VERSION, key, identity.peer_id, float(expiration), to_body(record)]
    signed = msgpack.packb(head, use_bin_type=True)
    return msgpack.packb(head + [identity.sign(signed)], use_bin_type=True)


def decode_record(blob: bytes) -> SignedRecord:
    """Parses and verifies a record. Raises `RecordError` on any defect. The same bytes always give
    the same answer, so valid records are remembered (`VERIFIED_CACHE_SIZE`, `VERIFIED_CACHE_BYTES`)."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_RECORD_BYTES:
        raise RecordError("record is not bytes or too large")
    blob = bytes(blob)
    with _verified_lock:
        known = _verified.get(blob)
        if known is not None:
            _verified.move_to_end(blob)
            return known
    signed = _decode_record(blob)
    global _verified_bytes
    with _verified_lock:
        if blob not in _verified:
            _verified[blob] = signed
            _verified_bytes += len(blob)
        while len(_verified) > VERIFIED_CACHE_SIZE or _verified_bytes > VERIFIED_CACHE_BYTES:
            _verified_bytes -= len(_verified.popitem(last=False)[0])
    return signed


def _decode_record(blob: bytes) -> SignedRecord:
    try:
        fields = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise RecordError(f"record is not valid msgpack: {e}") from e
    if not isinstance(fields, list) or len(fields) != 7:
        raise RecordError("record must be a 7-element list")
    kind, version, key, peer_id, expiration, body, signature = fields
    cls = RECORD_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecordError(f"unknown record kind {kind!r}")
    if version != cls.VERSION:
        raise RecordError(f"unsupported {kind} record version {version!r} (expected {cls.VERSION})")
    if not (isinstance(key, str) and isinstance(peer_id, str) and isinstance(signature, bytes)):
        raise RecordError("record key, peer id and signature have wrong types")
    if not isinstance(expiration, float) or not math.isfinite(expiration):
        raise RecordError("record expiration must be a finite float")
    signed = msgpack.packb(fields[:6], use_bin_type=True)
    if not verify_signature(peer_id, signed, signature):
        raise RecordError(f"invalid signature on {kind} record claimed by {peer_id}", reason="forged")
    record = from_body(cls, body, RecordError, allow_unknown=True)
    return SignedRecord(key=key, peer_id=peer_id, expiration=expiration, record=record, blob=bytes(blob))
