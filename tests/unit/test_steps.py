"""The trainer's step loop (`swarmnet.trainer.steps`): with `max_staleness` 0 a step starts after
the previous one finished; with 1 the next step's microbatches enter the pipeline while the current
step's finish, within one `max_in_flight` window, and steps are still reported in order."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import pytest

from swarmnet.config import RunManifest, TrainerConfig, TrainingConfig
from swarmnet.errors import ConfigError, SwarmError
from swarmnet.trainer.steps import StepRunner


class _Recorder(StepRunner):
    """Microbatches take `duration` s (the last one of each step longer: the straggler a step
    barrier waits for); records when each started and ended, and the most in flight at once."""

    def __init__(self, manifest, config, *, fail: set[int] = frozenset()):
        data = types.SimpleNamespace(microbatch=lambda index: types.SimpleNamespace(index=index))
        super().__init__(manifest, config, data)
        self.events: list[tuple[str, int]] = []
        self.in_flight = self.most_in_flight = 0
        self.fail = fail

    async def run_microbatch(self, mb) -> float:
        self.events.append(("start", mb.index))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            last = mb.index % self.manifest.microbatches_per_step == self.manifest.microbatches_per_step - 1
            await asyncio.sleep(0.03 if last else 0.005)
            if mb.index in self.fail:
                raise SwarmError("no peer served the call")
            return float(mb.index)
        finally:
            self.in_flight -= 1
            self.events.append(("end", mb.index))


def _manifest(staleness: int) -> RunManifest:
    return RunManifest(name="steps", training=TrainingConfig(microbatch_size=8, target_batch_size=32, max_staleness=staleness))


def _run(staleness: int, **kwargs) -> tuple[_Recorder, list, object]:
    runner = _Recorder(_manifest(staleness), TrainerConfig(max_steps=3, max_in_flight=4), **kwargs)
    reports: list = []

    async def on_step(report) -> None:
        reports.append(report)

    summary = asyncio.run(asyncio.wait_for(runner.train(on_step=on_step), 10))
    return runner, reports, summary


@pytest.mark.timeout(20)
def test_synchronous_steps_do_not_overlap():
    runner, reports, summary = _run(0)
    for step in (1, 2):
        first_of_next = runner.events.index(("start", 4 * step))
        assert runner.events.index(("end", 4 * step - 1)) < first_of_next  # the barrier
    assert [r.step for r in reports] == [1, 2, 3] and summary.steps == 3


@pytest.mark.timeout(20)
def test_delayed_updates_overlap_steps_within_the_window_and_report_in_order():
    runner, reports, summary = _run(1)
    # Step 2's first microbatch starts while step 1's straggler (microbatch 3) is still running.
    assert runner.events.index(("start", 4)) < runner.events.index(("end", 3))
    assert runner.most_in_flight <= 4
    starts = [index for kind, index in runner.events if kind == "start"]
    assert starts == sorted(starts) == list(range(12))  # data order kept
    assert [r.step for r in reports] == [1, 2, 3] and summary.steps == 3
    assert [r.loss for r in reports] == [1.5, 5.5, 9.5]  # each step's own microbatches
    assert all(r.samples == 32 and r.dropped == 0 for r in reports)


@pytest.mark.timeout(20)
def test_a_dropped_microbatch_is_counted_in_its_own_step_when_steps_overlap():
    _, reports, summary = _run(1, fail={5})
    assert [(r.samples, r.dropped) for r in reports] == [(32, 0), (24, 1), (32, 0)]
    assert summary.dropped == 1


def test_staleness_is_zero_or_one_and_zero_keeps_the_run_id():
    with pytest.raises(ConfigError, match="max_staleness"):
        TrainingConfig(max_staleness=2)
    plain = RunManifest(name="steps")
    assert dataclasses.replace(plain, training=TrainingConfig(max_staleness=0)).run_id == plain.run_id
    assert dataclasses.replace(plain, training=TrainingConfig(max_staleness=1)).run_id != plain.run_id
