"""Identities, signed DHT records, the DHT record validator and the pure manifest choice."""

from __future__ import annotations

import asyncio
import dataclasses
import stat
import time

import base58
import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID

from swarmnet.config import ModelConfig, MoEConfig, RunManifest, TrainingConfig
from swarmnet.dht import keys
from swarmnet.dht.identity import Identity, public_key_from_peer_id, verify_signature
from swarmnet.dht.manifests import peer_ids_of, select_manifest
from swarmnet.dht.records import (
    MAX_RECORD_BYTES,
    ArchivedStage,
    ArchiveRecord,
    ManifestRecord,
    ProgressRecord,
    RecordError,
    SignedRecord,
    StageServerRecord,
    TrainerRecord,
    decode_record,
    encode_record,
)
from swarmnet.dht.stages import read_experts
from swarmnet.dht.validator import SwarmnetRecordValidator
from swarmnet.errors import ConfigError, ManifestError

pytestmark = pytest.mark.timeout(30)

MANIFEST = RunManifest(
    name="records",
    model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16),
    training=TrainingConfig(num_stages=2, microbatch_size=2, seq_len=8, target_batch_size=4),
)
RUN_ID = MANIFEST.run_id
EXPIRATION = 1_700_000_123.25

# A base58 string that passes the identity-multihash prefix check but holds garbage protobuf bytes.
GARBAGE_PEER_ID = base58.b58encode(b"\x00\x03\xff\xff\xff").decode()


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> Identity:
    return Identity.ephemeral(tmp_path_factory.mktemp("alice"))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Identity:
    return Identity.ephemeral(tmp_path_factory.mktemp("bob"))


def stage_record(**changes) -> StageServerRecord:
    record = StageServerRecord(
        stage=1,
        throughput=12.5,
        queue_depth=2,
        device="cpu",
        memory_bytes=123_456,
        step=7,
        metrics_addr="127.0.0.1:9100",
        maddrs=["/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"],
    )
    return dataclasses.replace(record, **changes)


def manifest_record() -> ManifestRecord:
    return ManifestRecord(run_id=RUN_ID, manifest=MANIFEST.to_dict())


# (key, record) pairs of every record type, each under the key it belongs to.
PLACED = {
    "stage_server": (keys.stage_key(RUN_ID, 1), stage_record()),
    "stage_server_no_metrics": (
        keys.stage_key(RUN_ID, 0),
        stage_record(stage=0, metrics_addr=None, maddrs=[]),
    ),
    "expert_server": (keys.expert_key(RUN_ID, "expert.1."), stage_record(stage=3, expert="expert.1.1")),
    "trainer": (keys.trainer_key(RUN_ID), TrainerRecord(step=3, loss=2.5, samples_per_s=40.0)),
    "manifest": (keys.MANIFESTS, manifest_record()),
    "archive": (
        keys.archive_key(RUN_ID),
        ArchiveRecord(stages=[ArchivedStage(stage=0, step=7, digest="ab" * 32)], maddrs=["/ip4/127.0.0.1/tcp/1"]),
    ),
    "progress_leaving": (
        keys.progress_key(RUN_ID, 1),
        ProgressRecord(epoch=3, samples=8, joining=False, left=False, digest="cd" * 32, leaving=True),
    ),
}


def fields_of(blob: bytes) -> list:
    return msgpack.unpackb(blob, raw=False)


def pack(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def resign(identity: Identity, head: list) -> bytes:
    """A record with arbitrary first six fields, validly signed by `identity`."""
    return pack(head + [identity.sign(pack(head))])


# --- identity ---------------------------------------------------------------------------------------


def test_load_or_create_writes_a_0400_key_and_reloads_the_same_peer_id(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    created = Identity.load_or_create(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    reloaded = Identity.load_or_create(path)
    assert reloaded.peer_id == created.peer_id
    assert reloaded.public_bytes == created.public_bytes
    # Same key: Ed25519 signatures are deterministic.
    assert reloaded.sign(b"hello") == created.sign(b"hello")


def test_distinct_identities_have_distinct_peer_ids(identity, other):
    assert identity.peer_id != other.peer_id


def test_peer_id_is_an_ed25519_libp2p_peer_id(identity):
    assert identity.peer_id.startswith("12D3KooW")  # identity multihash of an Ed25519 protobuf key
    assert PeerID.from_base58(identity.peer_id).to_base58() == identity.peer_id


def test_public_key_round_trips_through_the_peer_id(identity):
    public = public_key_from_peer_id(identity.peer_id)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == identity.public_bytes
    public.verify(identity.sign(b"data"), b"data")  # raises if the key were wrong


def test_verify_signature(identity, other):
    signature = identity.sign(b"payload")
    assert verify_signature(identity.peer_id, b"payload", signature)
    assert not verify_signature(identity.peer_id, b"payloaD", signature)
    assert not verify_signature(other.peer_id, b"payload", signature)
    assert not verify_signature(identity.peer_id, b"payload", signature[:-1])


@pytest.mark.parametrize(
    "peer_id",
    ["", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "11", GARBAGE_PEER_ID],
    ids=["empty", "not-base58", "sha256-multihash", "empty-key", "garbage-protobuf"],
)
def test_peer_ids_without_an_ed25519_key_are_refused(peer_id):
    with pytest.raises(ValueError):
        public_key_from_peer_id(peer_id)
    assert not verify_signature(peer_id, b"payload", b"\0" * 64)


def test_a_corrupt_key_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"\x08\x00\x12\x03abc")  # an RSA-typed key of three bytes
    with pytest.raises(ConfigError):
        Identity.load_or_create(path)


# --- encoding and decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PLACED))
def test_encode_decode_round_trip(identity, kind):
    key, record = PLACED[kind]
    signed = decode_record(encode_record(identity, key, record, EXPIRATION))
    assert signed == SignedRecord(key=key, peer_id=identity.peer_id, expiration=EXPIRATION, record=record)
    assert type(signed.record) is type(record)


def test_integer_expiration_is_signed_as_a_float(identity):
    key, record = PLACED["trainer"]
    signed = decode_record(encode_record(identity, key, record, 1_700_000_000))
    assert signed.expiration == 1_700_000_000.0 and isinstance(signed.expiration, float)


def test_manifest_record_gives_back_the_manifest(identity):
    signed = decode_record(encode_record(identity, keys.MANIFESTS, manifest_record(), EXPIRATION))
    assert signed.record.verified_manifest() == MANIFEST


def test_manifest_record_rejects_a_run_id_mismatch():
    other = dataclasses.replace(MANIFEST, name="another run")
    record = ManifestRecord(run_id=RUN_ID, manifest=other.to_dict())
    with pytest.raises(RecordError, match="hashes to"):
        record.verified_manifest()
    with pytest.raises(RecordError):
        ManifestRecord(run_id="0" * 16, manifest=MANIFEST.to_dict()).verified_manifest()


def _manifest_dict(section: str, **changes) -> dict:
    data = MANIFEST.to_dict()
    data[section] = {**data[section], **changes}
    return data


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param({"name": "x", "model": {"width": 3}}, id="unknown-key"),
        pytest.param({"name": "x", "model": 3}, id="model-not-a-table"),
        pytest.param({"model": {}}, id="no-name"),
        pytest.param(_manifest_dict("model", d_model=30, n_heads=4), id="indivisible-heads"),
        pytest.param(_manifest_dict("model", n_heads=0), id="zero-heads"),
        pytest.param({"name": "x", b"extra": 1, "zz": 2}, id="mixed-str-and-bytes-keys"),
    ],
)
def test_manifest_record_turns_any_bad_manifest_into_record_error(manifest):
    # Manifests come from any peer of the DHT: none may crash `fetch_manifest`, which catches RecordError.
    with pytest.raises(RecordError):
        ManifestRecord(run_id=RUN_ID, manifest=manifest).verified_manifest()


# --- tampering --------------------------------------------------------------------------------------


@pytest.fixture
def blob(identity) -> bytes:
    key, record = PLACED["stage_server"]
    return encode_record(identity, key, record, EXPIRATION)


def test_flipping_a_byte_of_the_body_breaks_the_signature(blob):
    assert blob.count(b"cpu") == 1
    with pytest.raises(RecordError, match="signature"):
        decode_record(blob.replace(b"cpu", b"cpv"))


def test_verified_records_are_remembered_and_tampered_copies_still_refused(blob):
    first = decode_record(blob)
    assert decode_record(bytearray(blob)) is first  # the same bytes: no second signature check
    with pytest.raises(RecordError, match="signature"):
        decode_record(blob.replace(b"cpu", b"cpv"))
    assert decode_record(blob) is first


def test_the_verified_record_cache_is_bounded_in_bytes(identity, monkeypatch):
    from swarmnet.dht import records

    monkeypatch.setattr(records, "VERIFIED_CACHE_BYTES", 4000)
    key, record = PLACED["stage_server"]
    for i in range(40):
        decode_record(encode_record(identity, key, record, EXPIRATION + i))
    assert 0 < records._verified_bytes <= 4000
    assert records._verified_bytes == sum(len(b) for b in records._verified)


def test_flipping_a_byte_of_the_signature_breaks_it(blob):
    with pytest.raises(RecordError, match="signature"):
        decode_record(blob[:-1] + bytes([blob[-1] ^ 0x01]))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        pytest.param(4, EXPIRATION + 1.0, id="later-expiration"),
        pytest.param(4, EXPIRATION - 1e-3, id="earlier-expiration"),
        pytest.param(2, keys.stage_key(RUN_ID, 0), id="another-stage-key"),
        pytest.param(2, keys.stage_key("0123456789abcdef", 1), id="another-run-key"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "step": 8}, id="changed-body"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "throughput": 1e9}, id="inflated-throughput"),
    ],
)
def test_changing_a_signed_field_breaks_the_signature(blob, index, value):
    fields = fields_of(blob)
    fields[index] = value
    with pytest.raises(RecordError, match="signature"):
        decode_record(pack(fields))


def test_another_identitys_peer_id_breaks_the_signature(blob, other):
    fields = fields_of(blob)
    fields[3] = other.peer_id
    with pytest.raises(RecordError, match="signature"):
        decode_record(pack(fields))


def test_another_identitys_signature_is_refused(blob, identity, other):
    fields = fields_of(blob)
    fields[6] = other.sign(pack(fields[:6]))
    with pytest.raises(RecordError, match="signature"):
        decode_record(pack(fields))
    # ... while signing for one's own peer id works.
    fields[3] = other.peer_id
    assert decode_record(resign(other, fields[:6])).peer_id == other.peer_id


def test_a_garbage_peer_id_is_a_record_error(blob):
    fields = fields_of(blob)
    fields[3] = GARBAGE_PEER_ID
    with pytest.raises(RecordError):
        decode_record(pack(fields))


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_other_versions_are_refused_even_when_signed(blob, identity, version):
    head = fields_of(blob)[:6]
    with pytest.raises(RecordError):
        decode_record(pack([*head[:1], version, *head[2:], b"sig"]))
    head[1] = version
    with pytest.raises(RecordError, match="version"):
        decode_record(resign(identity, head))


@pytest.mark.parametrize("kind", ["bogus", "", 1, None, "Stage_Server"])
def test_unknown_kinds_are_refused_even_when_signed(blob, identity, kind):
    head = fields_of(blob)[:6]
    head[0] = kind
    with pytest.raises(RecordError, match="kind"):
        decode_record(resign(identity, head))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        pytest.param(2, 17, id="int-key"),
        pytest.param(3, b"peer", id="bytes-peer-id"),
        pytest.param(4, 1_700_000_000, id="int-expiration"),
        pytest.param(4, float("inf"), id="infinite-expiration"),
        pytest.param(4, float("nan"), id="nan-expiration"),
        pytest.param(4, "tomorrow", id="str-expiration"),
        pytest.param(5, [1, 2], id="list-body"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "stage": "1"}, id="str-for-int"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "stage": True}, id="bool-for-int"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "throughput": float("nan")}, id="nan-float"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "maddrs": "/ip4/1.2.3.4"}, id="str-for-list"),
        pytest.param(5, {**dataclasses.asdict(stage_record()), "maddrs": [1]}, id="int-in-list"),
        pytest.param(
            5, {k: v for k, v in dataclasses.asdict(stage_record()).items() if k != "step"}, id="missing"
        ),
        pytest.param(5, {**dataclasses.asdict(stage_record()), b"x": 1, "y": 2}, id="mixed-key-types"),
    ],
)
def test_malformed_fields_are_refused_even_when_signed(blob, identity, index, value):
    head = fields_of(blob)[:6]
    head[index] = value
    signature = identity.sign(pack(head))
    with pytest.raises(RecordError):
        decode_record(pack(head + [signature]))


def test_a_str_signature_is_refused(blob):
    fields = fields_of(blob)
    fields[6] = "signature"
    with pytest.raises(RecordError):
        decode_record(pack(fields))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x97\x01", id="truncated-list"),
        pytest.param(b"not msgpack at all", id="text"),
        pytest.param(msgpack.packb({"kind": "trainer"}), id="map"),
        pytest.param(msgpack.packb([1, 2, 3]), id="short-list"),
        pytest.param(msgpack.packb(list(range(8))), id="long-list"),
        pytest.param(msgpack.packb({1: 2}), id="int-map-key"),
    ],
)
def test_garbage_bytes_are_refused(data):
    with pytest.raises(RecordError):
        decode_record(data)


@pytest.mark.parametrize("cut", [1, 2, 10, 64])
def test_truncated_records_are_refused(blob, cut):
    with pytest.raises(RecordError):
        decode_record(blob[:-cut])


def test_trailing_bytes_are_refused(blob):
    with pytest.raises(RecordError):
        decode_record(blob + b"\x00")


def test_oversized_records_are_refused(identity):
    huge = stage_record(maddrs=["/ip4/127.0.0.1/tcp/1/p2p/" + "x" * 1000] * 70)
    blob = encode_record(identity, keys.stage_key(RUN_ID, 1), huge, EXPIRATION)
    assert len(blob) > MAX_RECORD_BYTES
    with pytest.raises(RecordError, match="too large"):
        decode_record(blob)


@pytest.mark.parametrize("value", ["a str", None, 42, [b"x"]], ids=["str", "none", "int", "list"])
def test_non_bytes_are_refused(value):
    with pytest.raises(RecordError):
        decode_record(value)  # type: ignore[arg-type]


# --- the DHT validator ------------------------------------------------------------------------------


def dht_record(key: str, blob: bytes, peer_id: str, expiration: float) -> DHTRecord:
    """The DHTRecord hivemind hands to the validator for a value stored under (key, subkey=peer_id)."""
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=msgpack.packb(peer_id),
        value=msgpack.packb(blob),
        expiration_time=expiration,
    )


@pytest.mark.parametrize("kind", sorted(PLACED))
def test_validator_accepts_correctly_placed_records(identity, kind):
    key, record = PLACED[kind]
    expiration = time.time() + 60  # the validator refuses expired records (replays)
    blob = encode_record(identity, key, record, expiration)
    assert SwarmnetRecordValidator().validate(dht_record(key, blob, identity.peer_id, expiration))


def test_validator_accepts_a_real_dht_time(identity):
    key, record = PLACED["trainer"]
    expiration = time.time() + 15.0
    blob = encode_record(identity, key, record, expiration)
    assert SwarmnetRecordValidator().validate(dht_record(key, blob, identity.peer_id, expiration))


@pytest.fixture
def placed(identity):
    key, record = PLACED["stage_server"]
    return key, encode_record(identity, key, record, EXPIRATION)


def test_validator_rejects_a_record_under_another_key(identity, placed):
    key, blob = placed
    for wrong in (keys.stage_key(RUN_ID, 0), keys.trainer_key(RUN_ID), keys.MANIFESTS, "elsewhere"):
        assert not SwarmnetRecordValidator().validate(dht_record(wrong, blob, identity.peer_id, EXPIRATION))


def test_validator_rejects_a_wrong_subkey(identity, other, placed):
    key, blob = placed
    validator = SwarmnetRecordValidator()
    assert not validator.validate(dht_record(key, blob, other.peer_id, EXPIRATION))
    record = dht_record(key, blob, identity.peer_id, EXPIRATION)
    raw = identity.peer_id.encode()
    for subkey in (msgpack.packb(raw), msgpack.packb(None), b"\xc1", raw):
        assert not validator.validate(dataclasses.replace(record, subkey=subkey))


@pytest.mark.parametrize("delta", [1.0, -1.0, 1e-6])
def test_validator_rejects_a_wrong_expiration(identity, placed, delta):
    key, blob = placed
    assert not SwarmnetRecordValidator().validate(dht_record(key, blob, identity.peer_id, EXPIRATION + delta))


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("stage_server", keys.MANIFESTS),
        ("stage_server", keys.trainer_key(RUN_ID)),
        ("trainer", keys.stage_key(RUN_ID, 1)),
        ("trainer", keys.expert_key(RUN_ID, "expert.1.")),
        ("manifest", keys.stage_key(RUN_ID, 0)),
        ("manifest", keys.trainer_key(RUN_ID)),
        ("trainer", "swarmnet/" + RUN_ID + "/unknown"),
        ("trainer", "not-swarmnet/" + RUN_ID + "/trainers"),
    ],
)
def test_validator_rejects_a_record_signed_for_a_key_of_another_kind(identity, kind, key):
    # Signed for exactly this key, subkey and expiration: only the kind/key mismatch is wrong.
    _, record = PLACED[kind]
    blob = encode_record(identity, key, record, EXPIRATION)
    assert decode_record(blob).key == key
    assert not SwarmnetRecordValidator().validate(dht_record(key, blob, identity.peer_id, EXPIRATION))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(msgpack.packb("a string"), id="str"),
        pytest.param(msgpack.packb(123), id="int"),
        pytest.param(msgpack.packb(None), id="none"),
        pytest.param(msgpack.packb({"a": 1}), id="map"),
        pytest.param(msgpack.packb(b"random bytes"), id="random-bytes"),
        pytest.param(b"\xc1", id="not-msgpack"),
    ],
)
def test_validator_rejects_non_swarmnet_values(identity, value):
    record = DHTRecord(
        key=DHTID.generate(source=keys.MANIFESTS).to_bytes(),
        subkey=msgpack.packb(identity.peer_id),
        value=value,
        expiration_time=EXPIRATION,
    )
    assert not SwarmnetRecordValidator().validate(record)


def test_validator_rejects_a_raw_record_not_wrapped_in_msgpack(identity, placed):
    key, blob = placed
    record = dataclasses.replace(dht_record(key, blob, identity.peer_id, EXPIRATION), value=blob)
    assert not SwarmnetRecordValidator().validate(record)


def test_validator_refuses_hostile_records_without_raising(identity, placed):
    # `validate` must answer False for anything, never raise into hivemind's DHT code.
    key, blob = placed
    fields = fields_of(blob)
    fields[3] = GARBAGE_PEER_ID
    garbage_peer = pack(fields)
    head = fields_of(blob)[:6]
    head[5] = {**dataclasses.asdict(stage_record()), b"x": 1, "y": 2}
    mixed_keys = resign(identity, head)
    validator = SwarmnetRecordValidator()
    assert not validator.validate(dht_record(key, garbage_peer, GARBAGE_PEER_ID, EXPIRATION))
    assert not validator.validate(dht_record(key, mixed_keys, identity.peer_id, EXPIRATION))


def test_validators_merge_only_with_their_own_kind():
    validator = SwarmnetRecordValidator()
    assert validator.merge_with(SwarmnetRecordValidator())
    assert not validator.merge_with(object())  # type: ignore[arg-type]


# --- choosing a manifest ----------------------------------------------------------------------------

A = RunManifest(name="a", training=TrainingConfig(num_stages=2))
B = RunManifest(name="b", training=TrainingConfig(num_stages=2))


def test_select_by_run_id():
    candidates = {"alice": A, "bob": B}
    assert select_manifest(candidates, run_id=B.run_id, preferred_signers=()) == B
    assert select_manifest(candidates, run_id=A.run_id, preferred_signers=()) == A


def test_run_id_wins_over_preferred_signers():
    candidates = {"alice": A, "bob": B}
    assert select_manifest(candidates, run_id=B.run_id, preferred_signers={"alice"}) == B


def test_unknown_run_id_gives_none_even_if_others_exist():
    assert select_manifest({"alice": A, "bob": B}, run_id="0" * 16, preferred_signers={"alice"}) is None


def test_preferred_signer_decides_among_several_runs():
    candidates = {"alice": A, "bob": B}
    assert select_manifest(candidates, run_id=None, preferred_signers={"bob"}) == B
    assert select_manifest(candidates, run_id=None, preferred_signers=["carol", "alice"]) == A


def test_a_single_run_is_chosen_whoever_signed_it():
    assert select_manifest({"alice": A}, run_id=None, preferred_signers=()) == A
    assert select_manifest({"alice": A, "bob": A}, run_id=None, preferred_signers={"carol"}) == A


def test_several_runs_without_a_choice_raise():
    with pytest.raises(ManifestError, match="several runs"):
        select_manifest({"alice": A, "bob": B}, run_id=None, preferred_signers=())
    with pytest.raises(ManifestError):
        select_manifest({"alice": A, "bob": B}, run_id=None, preferred_signers={"carol"})


def test_no_manifest_gives_none():
    assert select_manifest({}, run_id=None, preferred_signers=()) is None
    assert select_manifest({}, run_id=A.run_id, preferred_signers={"alice"}) is None


def test_peer_ids_of():
    maddrs = [
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAlice",
        "/ip6/::1/tcp/4001/p2p/12D3KooWAlice",
        "/ip4/10.0.0.1/tcp/4002/p2p/12D3KooWBob",
        "/ip4/10.0.0.2/tcp/4003/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWCarol",
        "/ip4/10.0.0.3/tcp/4004",
    ]
    assert peer_ids_of(maddrs) == {"12D3KooWAlice", "12D3KooWBob", "12D3KooWCarol"}
    assert peer_ids_of([]) == set()


def test_reading_a_layers_experts_keeps_only_consistent_records(identity, other):
    moe = MoEConfig(layers=(1,), num_experts=2, top_k=1)
    manifest = dataclasses.replace(MANIFEST, model=dataclasses.replace(MANIFEST.model, moe=moe))
    key = keys.expert_key(manifest.run_id, "expert.1.")
    good = stage_record(stage=3, expert="expert.1.1")
    placed = [
        (identity, good),
        (other, stage_record(stage=2, expert="expert.1.1")),  # unit and uid disagree
        (other, stage_record(stage=3, expert="expert.0.1")),  # another layer's uid
        (other, stage_record(stage=3, expert=None)),  # a stage record under an expert key
        (other, stage_record(stage=3, expert="expert.1.7")),  # no such expert
    ]
    signed = [decode_record(encode_record(who, key, record, EXPIRATION)) for who, record in placed]

    class Records:  # answers `get` with fixed, genuinely signed records (no network here)
        async def get(self, wanted):
            return signed if wanted == key else []

    found = asyncio.run(read_experts(Records(), manifest, 1))
    assert list(found) == ["expert.1.1"]
    ((info, record),) = found["expert.1.1"]
    assert info.peer_id == identity.peer_id and info.stage == 3 and record == good


# --- rejections counted: forged and replayed records -------------------------------------------------


def _rejected(reason: str) -> float:
    from swarmnet.telemetry import metrics

    return metrics.RECORDS_REJECTED.labels(reason=reason)._value.get()


def test_a_replayed_older_copy_is_refused_and_counted(identity):
    key, record = PLACED["trainer"]
    validator = SwarmnetRecordValidator()
    now = time.time()
    old = encode_record(identity, key, record, now + 10)
    new = encode_record(identity, key, record, now + 20)
    assert validator.validate(dht_record(key, old, identity.peer_id, now + 10))
    assert validator.validate(dht_record(key, new, identity.peer_id, now + 20))
    before = _rejected("replayed")
    assert not validator.validate(dht_record(key, old, identity.peer_id, now + 10))  # validly signed, but stale
    expired = encode_record(identity, key, record, now - 5)
    assert not validator.validate(dht_record(key, expired, identity.peer_id, now - 5))
    assert _rejected("replayed") == before + 2


def test_a_forged_record_is_refused_and_counted(identity, other):
    key, record = PLACED["trainer"]
    expiration = time.time() + 15
    head = fields_of(encode_record(identity, key, record, expiration))
    head[3] = other.peer_id  # claims to be another peer, signature still ours
    before = _rejected("forged")
    assert not SwarmnetRecordValidator().validate(dht_record(key, pack(head), other.peer_id, expiration))
    assert _rejected("forged") == before + 1
