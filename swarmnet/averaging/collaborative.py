"""A peer's side of its stage's collaborative steps.

Every peer of a stage publishes a progress record (epoch = the step its parameters are at, samples
accumulated towards the next step, parameter digest). A background loop reads the stage's records:

- a stage-mate ahead of us: we missed a step, so we download the stage's state again;
- nobody else in the stage: the compute thread steps on its own (`auto_step`), exactly like a
  single process (this keeps a one-peer-per-stage swarm bit-identical to `train --local`);
- the stage's samples at our epoch reach `target_batch_size`: after a bounded grace for joining or
  lagging mates, the live peers at our epoch form a group (the same sorted member list on every
  member, checked by a digest in the all-reduce hello), freeze their accumulators, all-reduce sums
  and sample counts, verify that every member finished with the same result, and apply the same
  step. A round that fails anywhere is dropped by everyone: the frozen gradients go back into the
  accumulator, members that no longer answer are excluded, and the round is redone with the
  survivors.

With `averaging.aggregation = "centered_clip"` every part owner aggregates its part robustly and
reports the members whose contribution was an outlier; one that is an outlier in `ban_after`
consecutive rounds is banned by this peer: its contributions get no weight in the parts this peer
owns (it stays in the group, so that members who did not catch it still agree on the group).

What is averaged and how it is applied depends on the run's averaging mode (`strategies.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
from collections import Counter

import torch

from swarmnet.averaging.allreduce import (
    AllReduceServer,
    AveragingError,
    Member,
    all_reduce_round,
    hand_off,
    ping,
)
from swarmnet.averaging.progress import ProgressInfo, is_behind, lagging_peers, ready_to_step, round_members
from swarmnet.averaging.robust import ClipOptions, OutlierStreaks
from swarmnet.averaging.strategies import Strategy
from swarmnet.averaging.wire import Handoff, handoff_transcript
from swarmnet.config import PeerConfig, RunManifest
from swarmnet.dht import keys
from swarmnet.dht.identity import verify_signature
from swarmnet.dht.node import SwarmDHT
from swarmnet.dht.records import ProgressRecord, SignedRecord
from swarmnet.dht.stages import read_stage_and_progress
from swarmnet.errors import SwarmnetError
from swarmnet.peer.executor import ComputeExecutor
from swarmnet.telemetry import events, metrics
from swarmnet.testing import faults

logger = logging.getLogger(__name__)


class StageAverager:
    def __init__(
        self,
        *,
        dht: SwarmDHT,
        manifest: RunManifest,
        stage: int,
        strategy: Strategy,
        executor: ComputeExecutor,
        server: AllReduceServer,
        config: PeerConfig,
        resync,
    ):
        self.dht = dht
        self.manifest = manifest
        self.stage = stage
        self.strategy = strategy
        self.executor = executor
        self.server = server
        self.config = config
        self.resync = resync
        """`async (peer ids | None) -> None`: downloads the stage's state from those stage-mates
        (None: from any) and loads it."""
        self.wake = asyncio.Event()
        self.alone = False
        """No live stage-mate at the last check (the compute thread steps on its own)."""
        self.failed_rounds = 0
        """All-reduce rounds of this peer that failed (announced in its server record)."""
        for outcome in ("ok", "failed"):  # exported from 0, so that increase() sees the first one
            metrics.AVERAGING_ROUNDS.labels(outcome=outcome)
        self.in_round = False
        """An all-reduce round of ours is in progress."""
        self.robust = ClipOptions.from_config(manifest.averaging)
        """centered_clip's options (None: the plain weighted mean)."""
        self.outliers = OutlierStreaks(manifest.averaging.ban_after)
        """Consecutive rounds in which each stage-mate was an outlier in our part; who is banned."""
        self._addresses: dict[str, str] = {}
        self._leader_wait: tuple[tuple[str, int], float] | None = None
        """((leader, epoch), since when) while we wait for that leader's nonce."""
        self.leaving = False
        """Set when the peer drains before leaving: published in our progress records."""
        self.excluded: set[str] = set()
        """Members left out of this epoch's rounds (gone, or lagging past the grace)."""
        self.suspects: dict[str, float] = {}
        """Members that did not answer a ping after a failed round (frozen, hung or cut off), with
        the expiration of their progress record then: they stay out of rounds, across epochs,
        until they publish a newer record (a thawed peer does so when it resyncs)."""
        self._excluded_epoch = -1
        self._waiting_since: float | None = None
        self._published: tuple | None = None
        self._digests: dict[str, tuple[int, str]] = {}
        self._expirations: dict[str, float] = {}
        self._nonces: dict[str, tuple[int, str]] = {}
        self._nonce = ""
        """Our round nonce while we lead an attempt (empty: none proposed)."""
        self._attempted: set[str] = set()
        self._out: torch.Tensor | None = None
        """Nonces of the current epoch we already tried (a failed attempt is never rejoined)."""
        self.digest = ""
        self.digest_epoch = -1
        """`digest` is the parameter digest at `digest_epoch`, both read together on the compute
        thread (in solo mode the epoch moves on between our ticks)."""

    @property
    def epoch(self) -> int:
        return self.strategy.epoch

    def notify(self) -> None:
        """Called after every backward: re-check the stage's progress soon."""
        self.wake.set()

    async def refresh_digest(self) -> bool:
        """Re-reads (epoch, parameter digest) if the epoch moved; True if it did."""
        if self.digest_epoch == self.epoch and self.digest:
            return False
        self.digest_epoch, self.digest = await self.executor.run(self._epoch_and_digest)
        return True

    def _epoch_and_digest(self) -> tuple[int, str]:  # compute thread
        return self.strategy.epoch, self.strategy.parameter_digest()

    async def publish_progress(self, *, joining: bool = False, force: bool = False) -> None:
        state = (self.epoch, self.strategy.samples, joining, self._nonce, self.leaving)
        if state == self._published and not force:
            return
        await self.refresh_digest()
        record = ProgressRecord(
            epoch=-1 if joining else self.digest_epoch,
            samples=self.strategy.samples,
            joining=joining,
            left=False,
            digest=self.digest,
            round_nonce=self._nonce,
            leaving=self.leaving,
        )
        await self.dht.put(keys.progress_key(self.manifest.run_id, self.stage), record, self.config.record_ttl)
        self._published = state

    async def publish_left(self) -> None:
        """Tells stage-mates at once that we no longer take part (instead of letting them time out)."""
        record = ProgressRecord(epoch=self.epoch, samples=0, joining=False, left=True, digest=self.digest)
        try:
            await self.dht.put(keys.progress_key(self.manifest.run_id, self.stage), record, self.config.record_ttl)
        except Exception as e:  # noqa: BLE001 - leaving must not fail; the record expires anyway
            logger.debug("could not publish leaving: %s", e)

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            try:
                async with asyncio.timeout(self.config.progress_period):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self._tick()
            except (SwarmnetError, OSError, TimeoutError) as e:
                logger.warning("stage %d: progress check failed, will retry: %s", self.stage, e)

    def _parse_progress(self, records: list[SignedRecord]) -> list[ProgressInfo]:
        found = []
        self._digests = {}
        self._expirations = {signed.peer_id: signed.expiration for signed in records}
        for signed in records:
            r = signed.record
            if signed.peer_id == self.dht.peer_id or r.left:
                continue
            if signed.peer_id in self.suspects:
                if signed.expiration <= self.suspects[signed.peer_id]:
                    continue
                logger.info("stage %d: %s is back", self.stage, signed.peer_id[-6:])
                del self.suspects[signed.peer_id]
            if not r.joining:
                self._digests[signed.peer_id] = (r.epoch, r.digest)
                self._nonces[signed.peer_id] = (r.epoch, r.round_nonce)
            found.append(
                ProgressInfo(
                    peer_id=signed.peer_id,
                    epoch=max(r.epoch, 0),  # a joining peer has no epoch yet
                    samples=max(r.samples, 0),
                    joining=r.joining,
                    expires_at=signed.expiration,
                )
            )
        return found

    async def _tick(self) -> None:
        me = self.dht.peer_id
        servers, records = await read_stage_and_progress(self.dht, self.manifest, self.stage, include_leaving=True)
        others = self._parse_progress(records)
        addresses = {info.peer_id: record.averaging_addr for info, record in servers if record.averaging_addr}
        self._addresses = addresses
        if self.epoch != self._excluded_epoch:
            self.excluded.clear()
            self._attempted.clear()
            self._nonce = ""
            self._excluded_epoch = self.epoch
        mine = ProgressInfo(peer_id=me, epoch=self.epoch, samples=self.strategy.samples)
        progress = [mine] + [p for p in others if p.peer_id not in self.excluded]
        if is_behind(progress, self.epoch, me):
            logger.info("stage %d: a stage-mate is past step %d; downloading the stage state", self.stage, self.epoch)
            await self.sync_from_mates(None)
            return
        majority = self._majority_digest()
        if majority is not None:
            logger.warning("stage %d: our parameters differ from the stage's at step %d; reloading", self.stage, self.epoch)
            await self.sync_from_mates(majority)
            return
        alone = len(progress) == 1 and not any(
            pid != me for pid in addresses if pid not in self.excluded and pid not in self.suspects
        )
        self.alone = alone
        self.strategy.set_alone(alone)
        if alone and self.strategy.steps_alone_inline:
            await self._after_local_steps()
            return
        await self.publish_progress()
        if not ready_to_step(progress, self.epoch, self.strategy.target_samples):
            self._waiting_since = None
            return
        lagging = [p for p in lagging_peers(progress, self.epoch) if p not in self.excluded]
        if lagging:
            now = time.monotonic()
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < self.manifest.averaging.join_grace:
                return
            logger.info("stage %d: stepping without lagging peers %s", self.stage, [p[-6:] for p in lagging])
            self.excluded.update(lagging)
            # A lagging peer that is gone (killed before any round noticed) would be waited for
            # again at every step until its record expires: ping, and suspect it if it is gone.
            self._suspect(await _unresponsive([self._member(p) for p in lagging if p in addresses]))
        self._waiting_since = None
        members = [p for p in round_members(progress, self.epoch, me, excluded=self.excluded) if p == me or p in addresses]
        nonce = await self._agree_on_attempt(members)
        if nonce is not None:
            await self._round(members, nonce)

    def _result_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """One reused output buffer for the rounds' sums (allocating it per round costs more
        than the transfer of a small stage)."""
        if self._out is None or self._out.shape != like.shape:
            self._out = torch.empty_like(like)
        return self._out

    def _member(self, pid: str) -> Member:
        """Where `pid`'s all-reduce server listens (ours, or as its stage record announced)."""
        if pid == self.dht.peer_id:
            return Member(peer_id=pid, host=self.server.host, port=self.server.port)
        host, port = _split_addr(self._addresses[pid])
        return Member(peer_id=pid, host=host, port=port)

    def _suspect(self, dead: dict[str, str]) -> None:
        """Leaves unresponsive members out of rounds until they publish a newer progress record:
        a killed peer's record outlives it by up to `record_ttl`, and it must not hold up every
        step meanwhile (as a lagging peer, or as the leader whose nonce never comes)."""
        self.excluded.update(dead)
        for pid in dead:
            self.suspects[pid] = self._expirations.get(pid, 0.0)
            metrics.SUSPECTED_PEERS.inc()

    async def _agree_on_attempt(self, members: list[str]) -> str | None:
        """The leader (smallest peer id) proposes a fresh nonce per attempt in its progress record;
        the others join the attempt they read there, once. None: no attempt to join yet. A leader
        that proposes nothing for `LEADER_GRACE` seconds is pinged, and left out if it is gone."""
        leader = members[0]
        if leader == self.dht.peer_id:
            self._leader_wait = None
            if not self._nonce or self._nonce in self._attempted:
                self._nonce = secrets.token_hex(6)
                await self.publish_progress(force=True)
            nonce = self._nonce
        else:
            epoch, nonce = self._nonces.get(leader, (-1, ""))
            if epoch != self.epoch or not nonce or nonce in self._attempted:
                await self._check_leader(leader)
                return None
        self._leader_wait = None
        self._attempted.add(nonce)
        return nonce

    async def _check_leader(self, leader: str) -> None:
        now = time.monotonic()
        if self._leader_wait is None or self._leader_wait[0] != (leader, self.epoch):
            self._leader_wait = ((leader, self.epoch), now)
            return
        if now - self._leader_wait[1] < LEADER_GRACE or leader not in self._addresses:
            return
        self._leader_wait = ((leader, self.epoch), now)  # ping at most once per grace period
        member = self._member(leader)
        reason = await ping(member.host, member.port, PING_TIMEOUT)
        if reason is not None:
            logger.warning("stage %d: leader %s proposes no round and is %s; leaving it out", self.stage, leader[-6:], reason)
            self._suspect({leader: reason})

    def _majority_digest(self) -> list[str] | None:
        """Peers holding the stage's majority parameters at our epoch, if ours differ from them
        (two groups stepped apart: the minority reloads; a tie goes to the smaller digest)."""
        if not self.digest or self.digest_epoch != self.epoch:
            return None
        same = {
            pid: digest
            for pid, (epoch, digest) in self._digests.items()
            if epoch == self.digest_epoch and digest and pid not in self.excluded
        }
        if not same:
            return None
        counts = Counter([*same.values(), self.digest])
        best = min(counts, key=lambda d: (-counts[d], d))
        if best == self.digest:
            return None
        return [pid for pid, digest in same.items() if digest == best]

    async def sync_from_mates(self, sources: list[str] | None = None) -> None:
        """Announces `joining`, downloads and loads the stage's state, announces the new epoch."""
        self._nonce = ""  # a nonce belongs to the epoch it was proposed at
        await self.publish_progress(joining=True, force=True)
        await self.resync(sources)
        self.digest_epoch = -1
        await self.refresh_digest()
        events.emit("stepped", stage=self.stage, epoch=self.digest_epoch, digest=self.digest, members=0)
        await self.publish_progress(force=True)

    async def _after_local_steps(self) -> None:
        """Alone in the stage: the strategy stepped on the compute thread; report it."""
        if await self.refresh_digest():
            events.emit("stepped", stage=self.stage, epoch=self.digest_epoch, digest=self.digest, members=1)
        await self.publish_progress()

    async def _round(self, members: list[str], nonce: str) -> None:
        me = self.dht.peer_id
        epoch = self.epoch
        group = [self._member(pid) for pid in members]
        group_hash = hashlib.sha256(",".join(members).encode()).hexdigest()[:12]
        round_id = f"{self.manifest.run_id}/{self.stage}/{epoch}/{group_hash}/{nonce}"
        self.in_round = True
        try:
            await self._reduce(group, round_id, members.index(me), epoch)
        finally:
            self.in_round = False

    async def _reduce(self, group: list[Member], round_id: str, my_index: int, epoch: int) -> None:
        tensor, weight = await self.executor.run(self.strategy.freeze)
        start = time.perf_counter()
        events.emit("round", stage=self.stage, epoch=epoch, members=len(group))
        if faults.round_delay():
            await asyncio.sleep(faults.round_delay())
        try:
            result = await all_reduce_round(
                self.server,
                round_id=round_id,
                members=group,
                my_index=my_index,
                tensor=tensor,
                weight=float(weight),
                timeout=self.manifest.averaging.round_timeout,
                out=self._result_buffer(tensor),
                robust=self.robust,
                ignore=self.outliers.banned,
            )
        except AveragingError as e:
            await self.executor.run(self.strategy.unfreeze, tensor, weight)
            dead = await _unresponsive([m for m in group if m.peer_id != self.dht.peer_id])
            self._suspect(dead)
            metrics.AVERAGING_ROUNDS.labels(outcome="failed").inc()
            self.failed_rounds += 1
            logger.warning(
                "stage %d round for step %d with %d peers failed (%s); excluding %s",
                self.stage, epoch + 1, len(group), e, {d[-6:]: r for d, r in dead.items()} or "nobody",
            )
            return
        total, total_weight = result.total, result.total_weight
        self._note_outliers([m.peer_id for m in group], result.outliers)
        await self.executor.run(self.strategy.apply, total, total_weight)
        self._nonce = ""  # never publish the finished round's nonce with the new epoch
        await self.refresh_digest()
        seconds = time.perf_counter() - start
        metrics.AVERAGING_ROUNDS.labels(outcome="ok").inc()
        metrics.AVERAGING_SECONDS.observe(seconds)
        metrics.AVERAGING_GROUP_SIZE.observe(len(group))
        logger.info("stage %d step %d: averaged %d samples over %d peers in %.3f s", self.stage, self.epoch, int(total_weight), len(group), seconds)
        events.emit("stepped", stage=self.stage, epoch=self.digest_epoch, digest=self.digest, members=len(group))
        await self.publish_progress(force=True)

    def _note_outliers(self, members: list[str], outliers: dict[str, float]) -> None:
        for pid, ratio in outliers.items():
            logger.warning(
                "stage %d: %s sent an outlier (%.3g clipping radii from the result)", self.stage, pid[-6:], ratio
            )
        for pid in self.outliers.update(members, outliers):
            logger.warning(
                "stage %d: banning %s, an outlier in %d consecutive rounds: no weight in our parts from now on",
                self.stage, pid[-6:], self.outliers.ban_after,
            )

    # --- handing gradients over when leaving ------------------------------------------------------

    def check_handoff(self, handoff: Handoff) -> str | None:
        """Called by the all-reduce server before it reads a handoff's data."""
        if handoff.run_id != self.manifest.run_id or handoff.stage != self.stage:
            return f"this peer serves stage {self.stage} of run {self.manifest.run_id}"
        if handoff.sender not in self._digests or not verify_signature(
            handoff.sender, handoff_transcript(handoff), handoff.signature
        ):
            return "handoffs are taken only from known stage-mates, signed by their key"
        if self.leaving:
            return "this peer is leaving too"
        if handoff.epoch != self.epoch:
            return f"this peer is at step {self.epoch}, not {handoff.epoch}"
        if self.strategy.handoff_numel is None or handoff.numel != self.strategy.handoff_numel:
            return "this stage takes no handoff of that size"
        if not 0 < handoff.weight <= self.strategy.target_samples:
            return f"handoff of {handoff.weight} samples is out of range"
        return None

    async def accept_handoff(self, handoff: Handoff, tensor: torch.Tensor) -> str | None:
        if not bool(torch.isfinite(tensor).all()):
            return "handed-off gradients are not finite"
        if handoff.epoch != self.epoch or self.in_round:
            return "this peer stepped meanwhile"
        await self.executor.run(self.strategy.unfreeze, tensor, int(handoff.weight))
        logger.info("stage %d: took over %d samples' gradients from a leaving stage-mate", self.stage, int(handoff.weight))
        self.wake.set()
        return None

    async def hand_off(self) -> int:
        """Leaving: gives our accumulated gradients to a live stage-mate at our step, so their
        samples still count; returns the samples handed over (0 if none, or nobody took them)."""
        if self.strategy.handoff_numel is None or self.strategy.samples == 0:
            return 0
        mates = [
            pid
            for pid, (epoch, _) in self._digests.items()
            if epoch == self.epoch and pid in self._addresses and pid not in self.excluded and pid not in self.suspects
        ]
        if not mates:
            return 0
        tensor, weight = await self.executor.run(self.strategy.freeze)
        handoff = Handoff(
            run_id=self.manifest.run_id,
            stage=self.stage,
            epoch=self.epoch,
            numel=tensor.numel(),
            weight=float(weight),
            sender=self.dht.peer_id,
        )
        handoff = dataclasses.replace(handoff, signature=self.dht.identity.sign(handoff_transcript(handoff)))
        for attempt in range(2):  # a mate in the middle of a round refuses; ask again after it
            if attempt:
                await asyncio.sleep(0.5)
            for pid in mates:
                member = self._member(pid)
                reason = await hand_off(member.host, member.port, handoff, tensor)
                if reason is None:
                    logger.info("stage %d: handed %d samples' gradients to %s", self.stage, weight, pid[-6:])
                    return weight
                logger.info("stage %d: %s did not take our gradients: %s", self.stage, pid[-6:], reason)
        await self.executor.run(self.strategy.unfreeze, tensor, weight)
        return 0


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


PING_TIMEOUT = 3.0
LEADER_GRACE = 2.0
"""Seconds a ready stage waits for its leader's round nonce before checking the leader is alive."""


async def _unresponsive(members: list[Member]) -> dict[str, str]:
    """Members that do not answer a ping, with why: "refused" (the process is gone) or "silent"
    (frozen, hung or partitioned away). The ping is answered by the member's event loop, not its
    compute thread, so a peer that is merely busy computing still answers and stays in."""
    reasons = await asyncio.gather(*(ping(m.host, m.port, PING_TIMEOUT) for m in members))
    return {m.peer_id: reason for m, reason in zip(members, reasons) if reason is not None}
