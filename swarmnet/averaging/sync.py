"""Downloading a stage's state from several stage-mates at once, resuming when one of them dies.

`download_state` asks every source what it holds, picks the newest state (highest step; among equal
steps the digest most sources agree on), cuts it into pieces and fetches them in parallel from every
source that holds that digest, the least busy source first. A source that fails is dropped and its
unfinished pieces go to the others; pieces already received are kept. The assembled state is checked
against its digest before it is returned: nothing unverified ever reaches `load_state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P

from swarmnet.averaging.state import StateSnapshot, StateSyncError, TensorEntry, compute_digest
from swarmnet.errors import SwarmnetError
from swarmnet.protocols.direct import DirectClient
from swarmnet.protocols.state import MAX_RANGE_BYTES, StateInfo, StateStub

logger = logging.getLogger(__name__)

_SOURCE_FAILURES = (SwarmnetError, TimeoutError, OSError, EOFError, asyncio.IncompleteReadError)
"""What a source can do wrong: answer with an error, break the protocol, time out, disconnect."""


class NoStateSourceError(StateSyncError):
    """No source answered with state for the stage (they left it, moved, or are unreachable)."""


@dataclass(frozen=True)
class SyncResult:
    """A verified snapshot and how it was obtained."""

    snapshot: StateSnapshot
    seconds: float
    """Wall time of the whole download, info requests and verification included."""
    bytes_by_source: dict[str, int]
    """Data bytes each source (peer id) served; sources that served nothing are absent."""

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_source.values())


async def download_state(
    p2p: P2P,
    sources: Sequence[tuple[str, list[str]] | tuple[str, list[str], str | None]],
    *,
    run_id: str,
    stage: int,
    piece_bytes: int = 4 << 20,
    parallel: int = 4,
    timeout: float = 120.0,
    call_timeout: float = 30.0,
    layout_check: Callable[[list[TensorEntry]], None] | None = None,
    direct: DirectClient | None = None,
) -> SyncResult:
    """Downloads and verifies stage `stage`'s newest state from `sources`: (peer id, maddrs) or
    (peer id, maddrs, data address); with a `direct` client, sources with a data address are
    downloaded from over direct TCP where they can be reached.

    At most `parallel` pieces of `piece_bytes` are in flight, spread over the sources; each call may
    take `call_timeout` seconds, the whole download `timeout`. `layout_check(entries)` (e.g.
    `functools.partial(state.check_entries, computer)`) vets each source's announced layout before
    the choice: a source it raises `StateSyncError` for is ignored, so a source serving another
    model or optimizer cannot win with a higher step. Raises `StateSyncError` when no source
    answers, when every source holding the chosen state failed before it was complete, when the
    assembled state does not match its digest, or on timeout.
    """
    if not 0 < piece_bytes <= MAX_RANGE_BYTES:
        raise ValueError(f"piece_bytes must be in 1..{MAX_RANGE_BYTES}")
    if parallel < 1 or timeout <= 0 or call_timeout <= 0:
        raise ValueError("parallel >= 1, timeout > 0 and call_timeout > 0 are required")
    started = time.monotonic()
    stubs = {
        source[0]: StateStub(p2p, source[0], list(source[1]), data_addr=(source[2:] or [None])[0], direct=direct)
        for source in sources
    }
    try:
        async with asyncio.timeout(timeout):
            infos = await _ask_everyone(stubs, run_id, stage, call_timeout, layout_check)
            target = _choose(infos)
            holders = [pid for pid, info in infos.items() if info.digest == target.digest]
            logger.info(
                "syncing stage %d: step %d, %d bytes, digest %s… from %d of %d sources",
                stage, target.step, target.total_bytes, target.digest[:12], len(holders), len(stubs),
            )
            download = _Download(target, {pid: stubs[pid] for pid in holders}, run_id, stage, call_timeout)
            data = await download.run(piece_bytes, parallel)
            digest = await asyncio.to_thread(compute_digest, target.step, target.entries, data)
    except TimeoutError as e:
        raise StateSyncError(f"state download for stage {stage} timed out after {timeout:.0f}s") from e
    if digest != target.digest:
        raise StateSyncError(f"downloaded state does not match its digest {target.digest[:12]}…")
    seconds = time.monotonic() - started
    served = {pid: n for pid, n in download.bytes_by_source.items() if n}
    logger.info(
        "synced stage %d step %d: %d bytes in %.2fs; bytes by source: %s",
        stage, target.step, len(data), seconds, served,
    )
    snapshot = StateSnapshot(step=target.step, entries=target.entries, data=memoryview(data), digest=digest)
    return SyncResult(snapshot=snapshot, seconds=seconds, bytes_by_source=served)


async def _ask_everyone(
    stubs: dict[str, StateStub],
    run_id: str,
    stage: int,
    call_timeout: float,
    layout_check: Callable[[list[TensorEntry]], None] | None,
) -> dict[str, StateInfo]:
    async def ask(pid: str, stub: StateStub) -> StateInfo | None:
        try:
            async with asyncio.timeout(call_timeout):
                info = await stub.info(run_id, stage)
        except _SOURCE_FAILURES as e:
            logger.info("state source %s did not answer: %s", pid, _describe(e))
            return None
        try:
            if layout_check is not None:
                layout_check(info.entries)
        except StateSyncError as e:
            logger.warning("ignoring state source %s: %s", pid, e)
            return None
        return info

    async with asyncio.TaskGroup() as group:
        tasks = {pid: group.create_task(ask(pid, stub)) for pid, stub in stubs.items()}
    infos = {pid: task.result() for pid, task in tasks.items() if task.result() is not None}
    if not infos:
        raise NoStateSourceError(f"none of {len(stubs)} sources has state for stage {stage}")
    return infos


def _choose(infos: dict[str, StateInfo]) -> StateInfo:
    """The newest state: highest step, then the digest most sources hold, then the smallest digest."""
    votes = Counter(info.digest for info in infos.values())
    return max(infos.values(), key=lambda info: (info.step, votes[info.digest], _reverse(info.digest)))


def _reverse(digest: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in digest)


class _Download:
    """The pieces of one state and the sources that still serve them."""

    def __init__(
        self, target: StateInfo, stubs: dict[str, StateStub], run_id: str, stage: int, call_timeout: float
    ):
        self.target = target
        self.stubs = stubs
        self.run_id = run_id
        self.stage = stage
        self.call_timeout = call_timeout
        self.alive = list(stubs)
        self.busy = Counter[str]()
        self.bytes_by_source = Counter[str]()
        self._turn = 0

    async def run(self, piece_bytes: int, parallel: int) -> bytearray:
        total = self.target.total_bytes
        buffer = self.buffer = bytearray(total)
        pending = deque((offset, min(piece_bytes, total - offset)) for offset in range(0, total, piece_bytes))
        pieces = len(pending)
        in_flight: dict[asyncio.Task, tuple[tuple[int, int], str]] = {}
        async with asyncio.TaskGroup() as group:
            while pending or in_flight:
                while pending and self.alive and len(in_flight) < parallel:
                    piece, pid = pending.popleft(), self._pick()
                    self.busy[pid] += 1
                    in_flight[group.create_task(self._fetch(pid, piece))] = (piece, pid)
                if not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    (offset, length), pid = in_flight.pop(task)
                    self.busy[pid] -= 1
                    if not task.result():
                        pending.appendleft((offset, length))
                        continue
                    self.bytes_by_source[pid] += length
        if pending:
            raise StateSyncError(
                f"every source of state {self.target.digest[:12]}… failed; "
                f"{len(pending)} of {pieces} pieces missing"
            )
        return buffer

    def _pick(self) -> str:
        """The alive source with the fewest pieces in flight; ties go round-robin."""
        self._turn += 1
        order = self.alive[self._turn % len(self.alive) :] + self.alive[: self._turn % len(self.alive)]
        return min(order, key=lambda pid: self.busy[pid])

    async def _fetch(self, pid: str, piece: tuple[int, int]) -> bool:
        """One piece from one source, received straight into its place in the buffer; False
        after dropping the source for good (another source then writes the piece over)."""
        offset, length = piece
        try:
            async with asyncio.timeout(self.call_timeout):
                stub = self.stubs[pid]
                into = memoryview(self.buffer)[offset : offset + length]
                await stub.fetch_range(self.run_id, self.stage, self.target.digest, offset, length, into=into)
                return True
        except _SOURCE_FAILURES as e:
            if pid in self.alive:
                self.alive.remove(pid)
                logger.info(
                    "state source %s failed after %d bytes (%s); resuming from %d others",
                    pid, self.bytes_by_source[pid], _describe(e), len(self.alive),
                )
            return False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
