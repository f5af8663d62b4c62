"""A private run with real processes: members train; outsiders are refused at the protocol level.

One swarm serves every check: a coordinator whose run admits an allowlist (its own id, two stage
peers, one in-process client) and holders of a join token (the honest trainer). While the honest
trainer trains, outsiders call a member's stage and state protocols over the direct data plane and
over p2pd, without a credential and with a credential copied from a member, publish a stage record
into the run, and try to train; every attempt is refused with `AccessDeniedError`, and the member
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.request

import pytest
import torch

from swarmnet.config import AccessConfig
from swarmnet.dht.identity import Identity
from swarmnet.dht.manifests import fetch_manifest
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.stages import read_stage, server_key
from swarmnet.errors import AccessDeniedError
from swarmnet.protocols import access
from swarmnet.protocols.access import AccessPolicy, token_sha256
from swarmnet.protocols.stage import StageStub
from swarmnet.protocols.state import StateStub
from swarmnet.testing.swarm import LocalSwarm, tiny_manifest

pytestmark = [pytest.mark.integration]

TOKEN = "a join token of the private run, long enough"
STEPS = 3


@dataclasses.dataclass
class PrivateSwarm:
    swarm: LocalSwarm
    run_id: str
    member_key: Identity
    peers: list
    trainer: object
    outsider_trainer: object


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("private")
    keys = {name: Identity.load_or_create(workdir / f"{name}.key") for name in ("peer0", "peer1", "member")}
    manifest = dataclasses.replace(
        tiny_manifest("private"),
        access=AccessConfig(
            allowlist=(keys["peer0"].peer_id, keys["peer1"].peer_id), token_sha256=token_sha256(TOKEN)
        ),
    )
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    with_token = ("--join-token-file", str(token_file))
    swarm = LocalSwarm(manifest, workdir=workdir / "swarm")
    try:
        # `--allow` adds the in-process member; the coordinator adds its own id: a new run id.
        swarm.start_coordinator("--allow", keys["member"].peer_id, *with_token)
        peers = [
            swarm.start_peer(0, "--identity", str(keys["peer0"].path), *with_token, wait=False),
            swarm.start_peer(
                1, "--identity", str(keys["peer1"].path), wait=False, env={"SWARMNET_JOIN_TOKEN": TOKEN}
            ),
        ]
        for peer in peers:
            peer.wait_event("ready", 90)
        trainer = swarm.start_trainer("--max-steps", str(STEPS), *with_token)
        outsider_trainer = swarm.start_trainer("--max-steps", "1")
        yield PrivateSwarm(
            swarm, swarm.coordinator.ready["run_id"], keys["member"], peers, trainer, outsider_trainer
        )
    finally:
        swarm.close()


@pytest.mark.timeout(120)
def test_outsiders_are_refused_on_every_path_and_members_keep_serving(private):
    assert private.run_id != tiny_manifest("private").run_id
    assert {p.ready["run_id"] for p in private.peers} == {private.run_id}
    asyncio.run(_attack(private))
    denied = _metric(private.peers[0].ready["metrics"], 'swarmnet_access_denied_total{protocol="stage"}')
    assert denied >= 4, denied  # p2pd and direct, without a credential and with a stolen one
    assert all(p.alive for p in private.peers)


@pytest.mark.timeout(120)
def test_members_train_and_an_outsider_trainer_stops_with_the_reason(private):
    summary = private.trainer.wait_event("summary", 90)
    assert summary["steps"] == STEPS and summary["dropped"] == 0, summary
    assert private.trainer.popen.wait(30) == 0
    assert private.outsider_trainer.popen.wait(60) == 2
    said = private.outsider_trainer.log_path.read_text()
    assert "is private: this process" in said and "has no join token" in said, said[-2000:]
    assert TOKEN not in "".join(p.log_path.read_text() for p in private.swarm.processes)


async def _attack(private: PrivateSwarm) -> None:
    run_id = private.run_id
    initial = private.swarm.initial_peers
    target = private.peers[0].ready  # stage 0: a forward only caches its input, nothing trains on it
    tokens = torch.randint(0, 256, (4, 32))
    outsider_key = Identity.ephemeral()
    try:
        async with (
            await SwarmDHT.create(
                identity=private.member_key, initial_peers=initial, client_mode=True
            ) as member,
            await SwarmDHT.create(identity=outsider_key, initial_peers=initial, client_mode=True) as outsider,
        ):
            manifest = await fetch_manifest(member, run_id=run_id, timeout=30)
            member_policy = AccessPolicy.for_run(manifest, None, member.peer_id)
            member_policy.check_self()  # allowlisted, no token: admitted
            member.use_access(member_policy)
            ((info, record),) = [
                (i, r) for i, r in await read_stage(member, manifest, 0) if i.peer_id == target["peer_id"]
            ]
            direct_addr = record.averaging_addr

            def stub(host: SwarmDHT, data_addr: str | None) -> StageStub:
                return StageStub(
                    host.p2p, target["peer_id"], target["maddrs"], data_addr=data_addr, direct=host.direct
                )

            async def served(host: SwarmDHT, data_addr: str | None) -> None:
                result = await asyncio.wait_for(
                    stub(host, data_addr).forward(run_id, "member", 0, tokens), 30
                )
                assert result.output is not None and result.output.shape == (4, 32, manifest.model.d_model)

            async def refused(host: SwarmDHT, data_addr: str | None) -> AccessDeniedError:
                with pytest.raises(AccessDeniedError) as caught:
                    await asyncio.wait_for(stub(host, data_addr).forward(run_id, "outsider", 0, tokens), 30)
                return caught.value

            await served(member, None)  # p2pd
            await served(member, direct_addr)

            # An outsider that does not even say hello, over both transports.
            for data_addr in (None, direct_addr):
                error = await refused(outsider, data_addr)
                assert str(error) == (
                    f"run private is private: peer {outsider.peer_id} is not on its allowlist "
                    "and presented no valid join credential"
                ), error
            with pytest.raises(AccessDeniedError):
                await asyncio.wait_for(
                    StateStub(outsider.p2p, target["peer_id"], target["maddrs"]).info(run_id, 0), 30
                )

            # An outsider presenting a member's credential (copied from a record): bound to the member's id.
            stolen = AccessPolicy.for_run(manifest, TOKEN, private.member_key.peer_id)
            access.attach(outsider.p2p, stolen)
            outsider.direct.credential = stolen.own_credential
            for data_addr in (None, direct_addr):
                await refused(outsider, data_addr)

            # Its stage record in the run is stored by the DHT, but members ignore it.
            await outsider.put(
                server_key(manifest, 0), dataclasses.replace(record, credential=stolen.own_credential), 30
            )
            unfiltered = {i.peer_id for i, _ in await read_stage(outsider, manifest, 0)}
            assert outsider.peer_id in unfiltered and target["peer_id"] in unfiltered
            members_view = {i.peer_id for i, _ in await read_stage(member, manifest, 0)}
            assert outsider.peer_id not in members_view and target["peer_id"] in members_view

            # The member is still served, both ways.
            await served(member, direct_addr)
            await served(member, None)
    finally:
        with contextlib.suppress(FileNotFoundError):
            outsider_key.path.unlink()


def _metric(address: str, series: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))
