"""Private runs without a network: the access policy, `[access]` validation, making a run private,
credentials in records (and the unknown-field rule of record bodies), the typed error."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
import types

import msgpack
import pytest

from swarmnet.cli.runtime import read_join_token
from swarmnet.config import AccessConfig, RetryConfig, RunManifest, TrainerConfig
from swarmnet.dht import keys
from swarmnet.dht.identity import Identity
from swarmnet.dht.records import RecordError, StageServerRecord, TrainerRecord, decode_record, encode_record
from swarmnet.errors import AccessDeniedError, ConfigError, ProtocolError, error_from_code
from swarmnet.pipeline.retry import RetryPolicy, is_retryable
from swarmnet.protocols import access
from swarmnet.protocols.access import AccessHello, AccessPolicy, make_credential, token_sha256, with_access
from swarmnet.protocols.codec import from_body, to_body
from swarmnet.protocols.direct import DirectOpen
from swarmnet.telemetry import metrics
from swarmnet.testing.toml import dump_toml
from swarmnet.trainer.steps import StepRunner

pytestmark = pytest.mark.timeout(30)

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("ids")
    return [Identity.ephemeral(directory).peer_id for _ in range(5)]


def policy(access_config: AccessConfig, token: str | None, own: str, **kwargs) -> AccessPolicy:
    return AccessPolicy(access_config, token, own, run_name="secret", run_id="0123456789abcdef", **kwargs)


# --- the policy -------------------------------------------------------------------------------------


def test_a_public_run_admits_everyone(ids):
    public = policy(AccessConfig(), None, ids[0])
    assert not public.private and public.admits(ids[1]) and public.admits("anything", "junk")
    public.check_self()
    assert public.hello().credential == ""


def test_allowlisted_ids_and_our_own_are_admitted_others_refused(ids):
    listed = policy(AccessConfig(allowlist=(ids[1],)), None, ids[0])
    assert listed.private
    assert listed.admits(ids[0]) and listed.admits(ids[1])
    assert not listed.admits(ids[2]) and not listed.admits(ids[2], "ab" * 32)
    before = metrics.ACCESS_DENIED.labels("stage")._value.get()
    denial = f"run secret is private: peer {ids[2]} is not on its allowlist"
    with pytest.raises(AccessDeniedError, match=denial):
        listed.check(ids[2], "", protocol="stage")
    assert metrics.ACCESS_DENIED.labels("stage")._value.get() == before + 1


def test_credentials_admit_token_holders_and_are_bound_to_their_peer_id(ids):
    config = AccessConfig(token_sha256=token_sha256(TOKEN))
    member = policy(config, TOKEN, ids[0])
    joiner = policy(config, TOKEN, ids[1])
    assert joiner.own_credential == make_credential(TOKEN, "secret", ids[1]) == member.credential_for(ids[1])
    assert member.admits(ids[1], joiner.own_credential)
    # Someone who copied the credential from a record or a stream cannot use it under their id.
    assert not member.admits(ids[2], joiner.own_credential)
    assert not member.admits(ids[2], "")
    assert not member.admits(ids[2], make_credential("another token", "secret", ids[2]))
    # Bound to the run's name too.
    assert not member.admits(ids[3], make_credential(TOKEN, "another run", ids[3]))
    # Without the token, a process cannot verify anyone, nor make credentials.
    outsider = policy(config, None, ids[2])
    assert not outsider.can_verify and outsider.own_credential == ""
    assert not outsider.admits(ids[1], joiner.own_credential)
    with pytest.raises(AccessDeniedError):
        outsider.credential_for(ids[2])


def test_the_admitted_cache_is_bounded_and_expires(ids):
    now = [0.0]
    config = AccessConfig(token_sha256=token_sha256(TOKEN))
    member = policy(config, TOKEN, ids[0], cache_size=2, cache_ttl=10.0, clock=lambda: now[0])
    for peer in ids[1:]:
        assert member.admits(peer, make_credential(TOKEN, "secret", peer))
    assert member.cached == 2
    # An expired entry is re-verified (still valid), a wrong credential never matches a cached one.
    now[0] = 11.0
    assert member.admits(ids[4], make_credential(TOKEN, "secret", ids[4]))
    assert not member.admits(ids[4], make_credential(TOKEN, "secret", ids[3]))
    assert member.cached == 2


def test_check_self_says_what_is_wrong(ids):
    digest = token_sha256(TOKEN)
    with pytest.raises(AccessDeniedError, match="not on its allowlist; ask the run's operator"):
        policy(AccessConfig(allowlist=(ids[1],)), None, ids[0]).check_self()
    with pytest.raises(AccessDeniedError, match="has no join token"):
        policy(AccessConfig(token_sha256=digest), None, ids[0]).check_self()
    with pytest.raises(AccessDeniedError, match="join token given is not its token"):
        policy(AccessConfig(token_sha256=digest), "a wrong token here", ids[0]).check_self()
    policy(AccessConfig(token_sha256=digest), TOKEN, ids[0]).check_self()
    # Allowlisted without the token: a warning only.
    policy(AccessConfig(allowlist=(ids[0],), token_sha256=digest), None, ids[0]).check_self()


def test_access_denied_is_typed_and_never_retried():
    error = error_from_code("access_denied", "run x is private", peer="12D3KooWpeer")
    assert isinstance(error, AccessDeniedError) and error.peer == "12D3KooWpeer"
    assert str(error) == "run x is private"
    retry = RetryPolicy(RetryConfig(max_attempts=5))
    assert not is_retryable(error) and not retry.should_retry(error, 0) and not retry.should_ban(error)


def test_the_policy_belongs_to_its_host(ids):
    class Host:
        pass

    host, other = Host(), Host()
    mine = policy(AccessConfig(allowlist=(ids[0],)), None, ids[0])
    access.attach(host, mine)
    assert access.policy_for(host) is mine and access.policy_for(other) is None


# --- [access] in the manifest -----------------------------------------------------------------------


def test_access_table_is_validated_and_canonical(ids):
    with pytest.raises(ConfigError, match="peer ids"):
        AccessConfig(allowlist=("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",))
    with pytest.raises(ConfigError, match="token_sha256"):
        AccessConfig(token_sha256="not hex")
    with pytest.raises(ConfigError, match="token_sha256"):
        AccessConfig(token_sha256=token_sha256(TOKEN).upper())
    # Order and repeats do not change the run.
    a = RunManifest(name="p", access=AccessConfig(allowlist=(ids[1], ids[0], ids[1])))
    b = RunManifest(name="p", access=AccessConfig(allowlist=(ids[0], ids[1])))
    assert a.access.allowlist == tuple(sorted(ids[:2])) and a.run_id == b.run_id


def test_public_runs_keep_their_run_ids_and_private_ones_round_trip(ids):
    public = RunManifest(name="n")
    assert "access" not in public.to_dict()  # so every public run keeps the id it had
    both = AccessConfig(allowlist=(ids[0],), token_sha256=token_sha256(TOKEN))
    private = RunManifest(name="n", access=both)
    assert private.run_id != public.run_id
    loaded = RunManifest.from_dict(tomllib.loads(dump_toml(private.to_dict())))
    assert loaded == private and loaded.run_id == private.run_id
    with pytest.raises(ConfigError, match="unknown keys"):
        RunManifest.from_dict({"name": "n", "access": {"token": TOKEN}})


def test_the_coordinator_makes_a_run_private(ids):
    manifest = RunManifest(name="n")
    assert with_access(manifest, allow=[], token=None, coordinator=ids[0]) is manifest
    listed = with_access(manifest, allow=[ids[1]], token=None, coordinator=ids[0])
    assert listed.access.allowlist == tuple(sorted([ids[0], ids[1]]))  # the coordinator admits itself
    tokened = with_access(manifest, allow=[], token=TOKEN, coordinator=ids[0])
    assert tokened.access == AccessConfig(token_sha256=token_sha256(TOKEN))
    assert TOKEN not in repr(tokened.to_dict())
    assert with_access(tokened, allow=[], token=TOKEN, coordinator=ids[0]) == tokened
    with pytest.raises(ConfigError, match="does not match"):
        with_access(tokened, allow=[], token="another token, long enough", coordinator=ids[0])
    with pytest.raises(ConfigError, match="needs its join token"):
        with_access(tokened, allow=[], token=None, coordinator=ids[0])
    with pytest.raises(ConfigError, match="at least 16"):
        with_access(manifest, allow=[], token="short", coordinator=ids[0])


def test_join_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SWARMNET_JOIN_TOKEN", raising=False)
    assert read_join_token(None) is None
    monkeypatch.setenv("SWARMNET_JOIN_TOKEN", " from-env \n")
    assert read_join_token(None) == "from-env"
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_join_token(str(path)) == TOKEN
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_join_token(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_join_token(str(tmp_path / "missing"))


# --- records and messages -----------------------------------------------------------------------------


def stage_record(**changes) -> StageServerRecord:
    record = StageServerRecord(
        stage=0,
        throughput=1.0,
        queue_depth=0,
        device="cpu",
        memory_bytes=1,
        step=0,
        metrics_addr=None,
        maddrs=[],
    )
    return dataclasses.replace(record, **changes)


def test_credentials_are_left_out_of_public_records_and_kept_in_private_ones(tmp_path):
    identity = Identity.ephemeral(tmp_path)
    key = keys.stage_key("0123456789abcdef", 0)
    public = msgpack.unpackb(encode_record(identity, key, stage_record(), 1e9))[5]
    assert "credential" not in public  # byte-identical to what older peers publish and accept
    signed = decode_record(encode_record(identity, key, stage_record(credential="ab" * 32), 1e9))
    assert signed.record.credential == "ab" * 32


def test_a_record_with_an_unknown_field_decodes_but_a_forged_one_does_not(tmp_path):
    identity = Identity.ephemeral(tmp_path)
    key = keys.trainer_key("0123456789abcdef")
    record = TrainerRecord(step=1, loss=2.0, samples_per_s=3.0)
    head = msgpack.unpackb(encode_record(identity, key, record, 1e9))[:6]
    head[5] = {**head[5], "from_a_newer_version": [1, 2]}  # a newer peer's field, signed with the rest
    signed = decode_record(msgpack.packb(head + [identity.sign(msgpack.packb(head))]))
    assert signed.record == record
    forged = msgpack.unpackb(encode_record(identity, key, record, 1e9))
    forged[5] = {**forged[5], "credential": "ab" * 32}  # added after signing: the signature breaks
    with pytest.raises(RecordError, match="signature"):
        decode_record(msgpack.packb(forged))
    head[5] = {**head[5], b"bytes-name": 1}
    with pytest.raises(RecordError, match="field names"):
        decode_record(msgpack.packb(head + [identity.sign(msgpack.packb(head))]))


def test_wire_messages_stay_strict_and_omit_an_unused_credential():
    body = to_body(AccessHello(run_id="r", credential="c"))
    with pytest.raises(ProtocolError, match="unknown fields"):
        from_body(AccessHello, {**body, "extra": 1}, ProtocolError)
    plain = DirectOpen(protocol="/p", client="a", server="b", nonce=b"n" * 32)
    assert "credential" not in to_body(plain)  # a public run's open is what older servers accept
    assert from_body(DirectOpen, to_body(plain), ProtocolError) == plain
    private = dataclasses.replace(plain, credential="ab" * 32)
    assert from_body(DirectOpen, to_body(private), ProtocolError) == private


# --- a refused trainer stops ------------------------------------------------------------------------


class _RefusedRunner(StepRunner):
    """Every microbatch is refused by a private run's member."""

    async def run_microbatch(self, mb) -> float:
        await asyncio.sleep(0)
        raise AccessDeniedError("run x is private: peer y is not on its allowlist")


def test_a_refused_trainer_stops_instead_of_dropping_forever():
    manifest = RunManifest(name="n")
    data = types.SimpleNamespace(microbatch=lambda index: types.SimpleNamespace(index=index))
    runner = _RefusedRunner(manifest, TrainerConfig(max_steps=None), data)
    with pytest.raises(AccessDeniedError, match="is private"):
        asyncio.run(asyncio.wait_for(runner.train(), 10))
