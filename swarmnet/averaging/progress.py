"""When a stage's peers step together, and with whom (pure, over the stage's DHT progress records).

Each peer of a stage announces how many samples it has accumulated for the stage's current optimizer
epoch. The stage steps once the peers at that epoch together hold the run's target batch size; the
round's members are those peers. A peer still *joining* (downloading the stage's state) announces
itself too, but holds no gradients yet: it counts neither towards the batch nor as a member, though
the round may wait a bounded grace for it, as for any peer at an older epoch.

Duplicate records of one peer (a stale record next to a fresh one) are resolved in every function
the same way: the record with the greatest epoch wins; at equal epochs, the one expiring last (the
fresher record), then the one with more samples (samples only grow within an epoch); on a full tie,
the first one. Records are assumed live: dropping expired ones is the DHT reader's job.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ProgressInfo:
    """One peer's progress record for its stage.

    Raises `ValueError` on a negative epoch or sample count, so a bad record is rejected where it is
    read.
    """

    peer_id: str
    """The peer's libp2p id (base58)."""
    epoch: int
    """The stage optimizer step the peer is accumulating gradients for."""
    samples: int
    """Samples the peer has accumulated in `epoch` so far."""
    joining: bool = False
    """True while the peer is still obtaining the stage's state and holds no gradients yet."""
    expires_at: float = 0.0
    """DHT expiration time of the record."""

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"peer {self.peer_id}: negative epoch {self.epoch}")
        if self.samples < 0:
            raise ValueError(f"peer {self.peer_id}: negative sample count {self.samples}")


def stage_samples(progress: Sequence[ProgressInfo], epoch: int) -> int:
    """Total samples accumulated at `epoch` by the stage's non-joining peers."""
    return sum(p.samples for p in _active_at(progress, epoch))


def ready_to_step(progress: Sequence[ProgressInfo], epoch: int, target_batch_size: int) -> bool:
    """Whether the stage's peers at `epoch` have accumulated `target_batch_size` samples together.

    Raises `ValueError` if `target_batch_size` is not positive.
    """
    if target_batch_size < 1:
        raise ValueError(f"target_batch_size must be positive, not {target_batch_size}")
    return stage_samples(progress, epoch) >= target_batch_size


def round_members(
    progress: Sequence[ProgressInfo], epoch: int, me: str, *, excluded: Collection[str] = ()
) -> list[str]:
    """Sorted ids of the peers that average together at `epoch`.

    These are the non-joining peers at `epoch`, minus `excluded` (e.g. peers that failed the previous
    attempt of this round). `me` is always a member, whatever its own record says and even if listed
    in `excluded`: a peer that averages at all averages with itself.
    """
    members = {p.peer_id for p in _active_at(progress, epoch)} - set(excluded)
    members.add(me)
    return sorted(members)


def lagging_peers(progress: Sequence[ProgressInfo], epoch: int) -> list[str]:
    """Sorted ids of the peers, joining or not, whose epoch is older than `epoch`.

    The round waits a bounded grace for them to catch up. The caller's own record is included if it
    is older than `epoch`; callers filter themselves out where that matters.
    """
    return sorted(p.peer_id for p in _latest(progress) if p.epoch < epoch)


def is_behind(progress: Sequence[ProgressInfo], epoch: int, me: str) -> bool:
    """True if a non-joining peer other than `me` is past `epoch`: I missed a step and must resync."""
    return any(p.epoch > epoch and not p.joining and p.peer_id != me for p in _latest(progress))


def _active_at(progress: Sequence[ProgressInfo], epoch: int) -> list[ProgressInfo]:
    return [p for p in _latest(progress) if p.epoch == epoch and not p.joining]


def _latest(progress: Sequence[ProgressInfo]) -> list[ProgressInfo]:
    """One record per peer id (see the module docstring), in order of first appearance."""
    best: dict[str, ProgressInfo] = {}
    for record in progress:
        kept = best.get(record.peer_id)
        if kept is None or _freshness(record) > _freshness(kept):
            best[record.peer_id] = record
    return list(best.values())


def _freshness(record: ProgressInfo) -> tuple[int, float, int]:
    return (record.epoch, record.expires_at, record.samples)
