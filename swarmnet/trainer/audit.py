"""Catching stage peers that lie about their results: duplicate microbatches, majority verdicts.

A trainer cannot check a stage's output itself (it does not hold the stage's parameters), but the
replicas of a stage can check each other: in gradient-averaging mode every replica holds exactly the
same parameters at the same step, so the same input must give the same output, loss and input
gradient up to float noise. With probability `audit_fraction` a forward call (and the last stage's
forward + loss) goes to two peers of the stage at once, chosen by the usual routing, as ordinary
calls: a liar cannot tell an audit from work. If their results agree, the first one is used. If not,
a third peer answers the same call and the majority decides: the peer that disagrees with the two
others is a liar, banned by this trainer for good and counted in
`swarmnet_trainer_liars_banned_total`. Without a majority (two peers only, or three different
answers) nobody is banned and the microbatch is dropped rather than trained on a result nobody
vouches for.

What it does not see, documented in docs/architecture.md: a peer that lies only in its backward
(parameter gradients are covered by robust aggregation in averaging, a middle stage's input
gradients are not), or a stage whose honest peers are not a majority. Replicas whose steps differ
(one has applied an update the other has not yet) give no verdict. Low-communication (diloco)
replicas differ between outer steps by design, so audits are off in that mode.

Costs: an audited call is computed twice (three times on a mismatch), and the unused replica keeps a
cached input until its TTL; the last stage's duplicate also adds that microbatch's gradient twice to
the stage's sum (one extra sample in the step's mean, like a repeated sample).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from swarmnet.protocols.stage import ForwardResult
from swarmnet.telemetry import events

logger = logging.getLogger(__name__)

RTOL = 1e-3
"""Relative L2 difference under which two replicas' tensors agree: float noise between devices and
kernels is ~1e-6; corrupted outputs differ by orders of magnitude more."""


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    a, b = a.float(), b.float()
    scale = max(float(a.norm()), float(b.norm()), 1e-12)
    return float((a - b).norm()) / scale


def results_agree(a: ForwardResult, b: ForwardResult, rtol: float = RTOL) -> bool | None:
    """Whether two replicas' results for the same call agree; None when they cannot be compared
    (the replicas were at different steps)."""
    if a.step != b.step:
        return None
    for x, y in ((a.output, b.output), (a.grad_input, b.grad_input)):
        if (x is None) != (y is None):
            return False
        if x is not None and relative_difference(x, y) > rtol:
            return False
    if (a.loss is None) != (b.loss is None):
        return False
    if a.loss is not None and not (math.isfinite(a.loss) and math.isfinite(b.loss)):
        return False
    if a.loss is not None and abs(a.loss - b.loss) > rtol * max(abs(a.loss), abs(b.loss), 1e-12):
        return False
    return True


@dataclass(frozen=True)
class Verdict:
    accepted: str | None
    """The peer whose result to use; None when no majority vouches for any."""
    liars: tuple[str, ...] = ()
    outcome: str = "agree"
    """`agree`, `liar` (a liar was found), `no_majority`, or `incomparable` (different steps)."""


def judge(results: dict[str, ForwardResult], rtol: float = RTOL) -> Verdict:
    """Verdict over the results of one call from 2 or 3 replicas (insertion order = preference).

    Two results: agree → the first; disagree → no verdict yet (ask a third). Three: a peer that
    disagrees with two peers who agree with each other is a liar."""
    peers = list(results)
    pairs = {}
    for i, p in enumerate(peers):
        for q in peers[i + 1 :]:
            pairs[(p, q)] = results_agree(results[p], results[q], rtol)
    if any(v is None for v in pairs.values()):
        return Verdict(accepted=peers[0], outcome="incomparable")
    if len(peers) == 2:
        return Verdict(accepted=peers[0]) if pairs[(peers[0], peers[1])] else Verdict(None, outcome="no_majority")
    for (p, q), agree in pairs.items():
        if agree:
            liars = tuple(r for r in peers if r not in (p, q) and not pairs.get((p, r), pairs.get((r, p))))
            return Verdict(accepted=p, liars=liars, outcome="liar" if liars else "agree")
    return Verdict(None, outcome="no_majority")


class Auditor:
    """Chooses which calls to audit and remembers the liars caught."""

    def __init__(self, fraction: float, rng: random.Random):
        self.fraction = fraction
        self.rng = rng
        self.liars: set[str] = set()
        self.audits = 0
        """Audits started so far."""

    def should_audit(self) -> bool:
        audit = self.fraction > 0 and self.rng.random() < self.fraction
        self.audits += audit
        return audit

    def convict(self, peer_id: str, stage: int) -> None:
        if peer_id not in self.liars:
            logger.warning("peer %s of stage %d returned results its replicas contradict: banned", peer_id, stage)
            events.emit("liar_banned", peer_id=peer_id, stage=stage, audits=self.audits)
        self.liars.add(peer_id)
