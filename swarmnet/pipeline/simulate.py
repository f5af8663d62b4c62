"""A policy-level simulation of a large swarm under churn: how close do `choose_stage` (on join) and
`plan_move` (every `move_delay`) keep the pipeline to the best assignment of its peers?

No network, no model: a peer is a throughput and a stage. The swarm's throughput is its bottleneck,
the least total throughput of a stage, integrated exactly over simulated time, event by event, and
compared with the upper bound total / stages (no assignment does better) and, at sample times, with
an LPT assignment of the same peers (a lower bound of the optimum; the exact optimum is NP-hard).

The model (`ScaleConfig`):
- A peer's throughput is drawn once from `DEVICE_MIX` (a class by share, its speed times log-normal
  noise) and is the same on every stage (stages of equal cost). It is always known: real peers
  measure themselves before they announce a stage, so the default for unmeasured peers in
  `plan_move` never applies (`SwarmState` rejects a throughput of 0).
- Churn (`churn_trace`): `peers` peers join at time 0, each stays an exponential lifetime, and new
  peers arrive as a Poisson process of rate `peers / mean_lifetime`, which keeps the count near
  `peers`. The trace depends on the seed only: runs with and without rebalancing see the same peers.
- A joining peer takes the stage `choose_stage` gives it. With rebalancing, each peer checks after
  `move_delay(rng, rebalance_period)` and, like `peer/session.py`, confirms a planned move after a
  pause uniform in `[0, 0.5 * rebalance_period]`, moves if the plan held, then waits a new delay.
- Idealized: every peer sees the exact current swarm (no DHT staleness); a move is instant.

A real snapshot costs O(peers) per decision. `SwarmState` keeps per-stage sums and counts, updated on
join/leave/move, and caches the bottleneck until the next change: a decision costs O(1). Its
`plan_move` and `choose_stage` follow the real rules step by step; tests compare them with the real
functions on many random swarms, and `verify_every` makes a run check its decisions against the real
functions on full snapshots. Throughputs are multiples of 1/1024, so every sum of them below 2^43 is
exact in float64, in any order: the incremental sums equal those the real functions compute.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import time
from dataclasses import dataclass, field

from swarmnet.pipeline.rebalance import move_delay, plan_move
from swarmnet.pipeline.snapshot import PeerInfo, SwarmSnapshot
from swarmnet.pipeline.stage_choice import choose_stage

_REL_TOL = 1e-9
"""The tie tolerance of the real policies (`rebalance._REL_TOL`, `stage_choice._REL_TOL`)."""

_QUANTUM = 1024
"""Throughputs are multiples of 1 / _QUANTUM: their sums (below 2^43) are exact in float64."""

_SWAP_CANDIDATES = 64
"""Peers of the least stage that `lpt_bottleneck` tries to swap out per round (keeps 10k peers fast)."""


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """A kind of volunteer hardware."""

    name: str
    """What it stands for (illustrative; the speeds are assumptions, not measurements)."""
    share: float
    """Fraction of peers of this class."""
    speed: float
    """Mean throughput, relative to the slowest class (1.0)."""


DEVICE_MIX: tuple[DeviceClass, ...] = (
    DeviceClass(name="T4 / GTX 1080 Ti class", share=0.40, speed=1.0),
    DeviceClass(name="V100 / A10 class", share=0.20, speed=2.0),
    DeviceClass(name="RTX 3090 / 4090 class", share=0.30, speed=2.5),
    DeviceClass(name="A100 class", share=0.10, speed=5.0),
)
"""The heterogeneous population of the simulation (mean speed ≈ 2.05)."""


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """One simulated swarm. Raises `ValueError` on values the simulation cannot run."""

    peers: int = 1000
    """Peers at time 0, and the stationary mean of the peer count."""
    stages: int = 8
    """Pipeline stages, of equal cost."""
    hours: float = 6.0
    """Simulated time."""
    mean_lifetime: float = 3600.0
    """Mean seconds a peer stays (exponential)."""
    rebalance_period: float = 30.0
    """Mean seconds between a peer's `plan_move` checks (`PeerConfig.rebalance_period`)."""
    margin: float = 0.1
    """`plan_move`'s margin (`PeerConfig.rebalance_margin`)."""
    noise: float = 0.15
    """Sigma of the log-normal factor on a peer's class speed."""
    sample_every: float = 300.0
    """Seconds between the samples compared with the LPT assignment."""
    seed: int = 0
    """Seeds the trace, the joins' tie-breaks and the check delays."""
    verify_every: int = 0
    """Check every n-th decision against the real policy on a full snapshot (0: never)."""

    def __post_init__(self) -> None:
        positive = (self.peers, self.stages, self.hours, self.mean_lifetime, self.rebalance_period)
        non_negative = (self.margin, self.noise, self.verify_every)
        valid = all(math.isfinite(x) and x > 0 for x in (*positive, self.sample_every)) and all(
            math.isfinite(x) and x >= 0 for x in non_negative
        )
        if not valid:
            raise ValueError(f"cannot simulate {self}")


class PolicyMismatch(AssertionError):
    """A fast decision differed from the real policy's: a bug in this module, never retried."""


# --- churn trace ------------------------------------------------------------------------------------


def draw_throughput(rng: random.Random, noise: float) -> float:
    """A peer's throughput: a class of `DEVICE_MIX` by share, its speed times log-normal noise."""
    device = rng.choices(DEVICE_MIX, weights=[d.share for d in DEVICE_MIX])[0]
    speed = device.speed * rng.lognormvariate(0.0, noise)
    return max(round(speed * _QUANTUM), 1) / _QUANTUM


def churn_trace(config: ScaleConfig) -> list[tuple[float, int, float]]:
    """Events `(time, peer, throughput)` in time order; throughput 0.0 means the peer leaves.
    Peer ids count up from 0 in order of arrival and are never reused."""
    rng = random.Random(f"scale-trace/{config.seed}")
    end = config.hours * 3600.0
    events: list[tuple[float, int, float]] = []

    def arrive(t: float) -> None:
        peer = len(events)  # unique: one join per peer, and a peer's leave comes after its join
        events.append((t, peer, draw_throughput(rng, config.noise)))
        leaves = t + rng.expovariate(1.0 / config.mean_lifetime)
        if leaves < end:
            events.append((leaves, peer, 0.0))

    for _ in range(config.peers):
        arrive(0.0)
    t = rng.expovariate(config.peers / config.mean_lifetime)
    while t < end:
        arrive(t)
        t += rng.expovariate(config.peers / config.mean_lifetime)
    events.sort(key=lambda e: (e[0], e[2] == 0.0))  # at one time, joins before leaves
    return events


# --- incremental state and fast policies -------------------------------------------------------------


class SwarmState:
    """Who serves which stage, with per-stage sums and counts kept up to date."""

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.peers: dict[int, tuple[int, float]] = {}
        """peer → (stage, throughput)."""
        self.sums = [0.0] * num_stages
        self.counts = [0] * num_stages
        self.total = 0.0
        self._tied: list[int] | None = None  # stages tied at the least sum; None: recompute
        self._target = 0  # plan_move's target: the first tied stage by (peers, index)

    def add(self, peer: int, stage: int, throughput: float) -> None:
        if peer in self.peers or not 0 <= stage < self.num_stages or not throughput > 0:
            raise ValueError(f"cannot add peer {peer} on stage {stage} at {throughput}")
        self.peers[peer] = (stage, throughput)
        self._update(stage, throughput, 1)

    def remove(self, peer: int) -> tuple[int, float]:
        stage, throughput = self.peers.pop(peer)
        self._update(stage, -throughput, -1)
        return stage, throughput

    def move(self, peer: int, stage: int) -> None:
        self.add(peer, stage, self.remove(peer)[1])

    def _update(self, stage: int, throughput: float, count: int) -> None:
        self.sums[stage] += throughput
        self.counts[stage] += count
        self.total += throughput
        self._tied = None

    def bottleneck_sum(self) -> float:
        """The swarm's throughput: the least stage sum."""
        return min(self.sums)

    def _tied_stages(self) -> list[int]:
        if self._tied is None:
            lowest = min(self.sums)
            self._tied = [s for s, t in enumerate(self.sums) if math.isclose(t, lowest, rel_tol=_REL_TOL)]
            self._target = min(self._tied, key=lambda s: (self.counts[s], s))
        return self._tied

    def choose_stage(self, rng: random.Random) -> int:
        """`stage_choice.choose_stage` on this state (no checkpoints held), same use of `rng`."""
        candidates = self.join_candidates()
        return candidates[0] if len(candidates) == 1 else rng.choice(candidates)

    def join_candidates(self) -> list[int]:
        """The stages `choose_stage` picks from: least sum, then fewest peers."""
        tied = self._tied_stages()
        fewest = min(self.counts[s] for s in tied)
        return [s for s in tied if self.counts[s] == fewest]

    def plan_move(self, peer: int, margin: float) -> int | None:
        """`rebalance.plan_move` for `peer` on this state (every throughput measured, ids unique)."""
        entry = self.peers.get(peer)
        if entry is None:
            return None
        mine, throughput = entry
        if self._tied is None:
            self._tied_stages()
        target, counts = self._target, self.counts
        if target == mine or counts[mine] < 2:
            return None
        if counts[target] == 0:
            return target
        current_min = self.sums[target]
        new_low = min(self.sums[mine] - throughput, current_min + throughput)
        threshold = current_min * (1 + margin)
        enough = new_low >= threshold or math.isclose(new_low, threshold, rel_tol=_REL_TOL)
        better = new_low > current_min and not math.isclose(new_low, current_min, rel_tol=_REL_TOL)
        return target if enough and better else None

    def snapshot(self) -> SwarmSnapshot:
        """What the real policies read: one `PeerInfo` per peer, id `str(peer)`."""
        peers = (
            PeerInfo(peer_id=str(p), stage=s, throughput=t, queue_depth=0) for p, (s, t) in self.peers.items()
        )
        return SwarmSnapshot(self.num_stages, tuple(peers))


# --- the optimum's bounds ----------------------------------------------------------------------------


def upper_bound(throughputs: list[float], num_stages: int) -> float:
    """No assignment has a bottleneck above the mean stage sum."""
    return sum(throughputs) / num_stages


def lpt_bottleneck(throughputs: list[float], num_stages: int, *, rounds: int | None = None) -> float:
    """The bottleneck of a good assignment (a lower bound of the optimum): LPT (largest peer first, to
    the stage of least sum), then up to `rounds` (default 2 * stages) local improvements, each the
    best single move or swap between the least stage and another that raises the lesser of the two
    (swapping out one of at most `_SWAP_CANDIDATES` peers of the least stage, evenly spread)."""
    stages: list[list[float]] = [[] for _ in range(num_stages)]
    heap = [(0.0, s) for s in range(num_stages)]
    for t in sorted(throughputs, reverse=True):
        total, s = heapq.heappop(heap)
        stages[s].append(t)
        heapq.heappush(heap, (total + t, s))
    sums = [0.0] * num_stages
    for total, s in heap:
        sums[s] = total
    for group in stages:
        group.sort()
    for _ in range(2 * num_stages if rounds is None else rounds):
        lo = min(range(num_stages), key=sums.__getitem__)
        best = (sums[lo], None, None, None)  # (lesser sum after, other stage, leaving it, leaving lo)
        for other in range(num_stages):
            gap = sums[other] - sums[lo]
            if gap <= 0:
                continue
            stride = max(math.ceil(len(stages[lo]) / _SWAP_CANDIDATES), 1)
            for q in [0.0, *stages[lo][::stride]]:  # 0.0: a plain move to lo
                group = stages[other]
                i = bisect.bisect_left(group, q + gap / 2)
                for p in group[max(i - 1, 0) : i + 1]:
                    low = min(sums[lo] + p - q, sums[other] - p + q)
                    if p > q and low > best[0]:
                        best = (low, other, p, q)
        _, other, p, q = best
        if other is None:
            break
        stages[other].remove(p)
        bisect.insort(stages[lo], p)
        if q:
            stages[lo].remove(q)
            bisect.insort(stages[other], q)
        sums[lo], sums[other] = sums[lo] + p - q, sums[other] - p + q
    return min(sums)


def alive_at(trace: list[tuple[float, int, float]], times: list[float]) -> list[list[float]]:
    """The throughputs of the peers in the swarm at each of `times` (ascending), from the trace."""
    alive: dict[int, float] = {}
    result, i = [], 0
    for t in times:
        while i < len(trace) and trace[i][0] <= t:
            _, peer, throughput = trace[i]
            if throughput:
                alive[peer] = throughput
            else:
                del alive[peer]
            i += 1
        result.append(list(alive.values()))
    return result


# --- one run -----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunResult:
    """What one run measured; equal results compare equal whatever their wall-clock time."""

    rebalance: bool
    ratio_to_upper_bound: float
    """Time average of the bottleneck over time average of total / stages."""
    samples: list[float]
    """The bottleneck at each of `sample_times` (the state after every event up to that time)."""
    moves: int
    moves_per_peer_hour: float
    stages_emptied_by_moves: int
    """Moves that left a stage with no peer (`plan_move` forbids it: should be 0)."""
    empty_stage_seconds: float
    """Simulated seconds during which some stage had no peer (after leaves)."""
    verified_decisions: int
    """Decisions also taken by the real policy on a full snapshot (`verify_every`)."""
    wall_s: float = field(compare=False)


def sample_times(config: ScaleConfig) -> list[float]:
    """0, sample_every, ... up to the end of the simulated time."""
    return [k * config.sample_every for k in range(int(config.hours * 3600.0 // config.sample_every) + 1)]


def run(config: ScaleConfig, trace: list[tuple[float, int, float]], *, rebalance: bool) -> RunResult:
    """Plays `trace`: joins by `choose_stage` and, if `rebalance`, moves by `plan_move`."""
    return _Run(config, rebalance).play(trace)


class _Run:
    """One run: the trace's events and the peers' checks (a heap), in time order."""

    def __init__(self, config: ScaleConfig, rebalance: bool) -> None:
        self.config, self.rebalance = config, rebalance
        self.state = SwarmState(config.stages)
        self.join_rng = random.Random(f"scale-join/{config.seed}")
        self.delay_rng = random.Random(f"scale-delay/{config.seed}")
        self.checks: list[tuple[float, int, int]] = []  # (time, peer, planned stage; -1: a fresh check)
        self.samples: list[float] = []
        self.last = self.bottleneck_area = self.bound_area = self.peer_seconds = self.empty_seconds = 0.0
        self.moves = self.emptied = self.decisions = self.verified = 0

    def play(self, trace: list[tuple[float, int, float]]) -> RunResult:
        started = time.perf_counter()
        end, checks, state = self.config.hours * 3600.0, self.checks, self.state
        i = 0
        while True:
            next_event = trace[i][0] if i < len(trace) else math.inf
            if checks and checks[0][0] < next_event:
                t, peer, planned = heapq.heappop(checks)
                if t >= end:
                    break
                if peer in state.peers:  # else it left since
                    self._check(t, peer, planned)
            elif next_event < end:
                t, peer, throughput = trace[i]
                i += 1
                self._advance(t)
                if throughput:
                    self._join(t, peer, throughput)
                else:
                    state.remove(peer)
            else:
                break
        self._advance(end, final=True)
        return RunResult(
            rebalance=self.rebalance,
            ratio_to_upper_bound=self.bottleneck_area / self.bound_area,
            samples=self.samples,
            moves=self.moves,
            moves_per_peer_hour=self.moves / (self.peer_seconds / 3600.0),
            stages_emptied_by_moves=self.emptied,
            empty_stage_seconds=self.empty_seconds,
            verified_decisions=self.verified,
            wall_s=time.perf_counter() - started,
        )

    def _join(self, t: float, peer: int, throughput: float) -> None:
        if self._verify_now():
            rng_state = self.join_rng.getstate()
            stage = self.state.choose_stage(self.join_rng)
            real_rng = random.Random()
            real_rng.setstate(rng_state)  # the real policy draws from the same rng state
            real = choose_stage(self.state.snapshot(), real_rng)
            if real != stage:
                raise PolicyMismatch(f"joining peer {peer}: choose_stage says {real}, the fast rule {stage}")
        else:
            stage = self.state.choose_stage(self.join_rng)
        self.state.add(peer, stage, throughput)
        if self.rebalance:
            delay = move_delay(self.delay_rng, self.config.rebalance_period)
            heapq.heappush(self.checks, (t + delay, peer, -1))

    def _check(self, t: float, peer: int, planned: int) -> None:
        """A peer's periodic check (`planned` -1) or the confirmation of a planned move, as in
        `peer/session.py`: plan, pause, plan again, move if the plan held; then wait `move_delay`."""
        period = self.config.rebalance_period
        target = self.state.plan_move(peer, self.config.margin)
        if self._verify_now():
            real = plan_move(self.state.snapshot(), str(peer), margin=self.config.margin)
            if real != target:
                raise PolicyMismatch(f"peer {peer}: plan_move says {real}, the fast rule {target}")
        if planned < 0 and target is not None:
            heapq.heappush(self.checks, (t + self.delay_rng.uniform(0.0, 0.5) * period, peer, target))
            return
        if planned >= 0 and target == planned:
            self._advance(t)
            source = self.state.peers[peer][0]
            self.state.move(peer, target)
            self.moves += 1
            self.emptied += self.state.counts[source] == 0
        heapq.heappush(self.checks, (t + move_delay(self.delay_rng, period), peer, -1))

    def _verify_now(self) -> bool:
        self.decisions += 1
        verify = self.config.verify_every > 0 and self.decisions % self.config.verify_every == 0
        self.verified += verify
        return verify

    def _advance(self, t: float, *, final: bool = False) -> None:
        """Integrates the state since the last change up to `t` (the next change); records the
        samples due before `t` (and at `t` if `final`)."""
        dt, low, every = t - self.last, self.state.bottleneck_sum(), self.config.sample_every
        self.bottleneck_area += dt * low
        self.bound_area += dt * self.state.total / self.config.stages
        self.peer_seconds += dt * len(self.state.peers)
        self.empty_seconds += dt if low == 0 else 0.0
        while len(self.samples) * every < t or (final and len(self.samples) * every <= t):
            self.samples.append(low)
        self.last = t
