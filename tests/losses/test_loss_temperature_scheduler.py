"""TemperatureScheduler: each schedule's value at chosen steps, the plateau reaction, exact resume."""

from __future__ import annotations

import math

import pytest

from clipexp.losses.temperature_scheduler import TemperatureScheduler
from clipexp.names import SCHEDULES


def make(schedule_type, **kwargs):
    defaults = dict(initial_temp=0.07, min_temp=0.01, max_temp=0.1, warmup_steps=10, total_steps=110)
    return TemperatureScheduler(schedule_type=schedule_type, **{**defaults, **kwargs})


def test_constant():
    sched = make("constant")
    assert [sched.step(s) for s in (0, 50, 10_000)] == [0.07, 0.07, 0.07]
    assert make("constant", initial_temp=0.5).step(0) == 0.1  # clamped to max_temp


def test_warmup_linear_from_max_to_initial():
    sched = make("warmup")
    # 0.1 + (0.07 - 0.1) * s / 10
    assert sched.step(0) == pytest.approx(0.1)
    assert sched.step(5) == pytest.approx(0.085)
    assert sched.step(10) == pytest.approx(0.07)
    assert sched.step(500) == pytest.approx(0.07)
    assert make("warmup", warmup_steps=0).step(0) == pytest.approx(0.07)


def test_cosine_after_warmup():
    sched = make("cosine")
    assert sched.step(5) == pytest.approx(0.085)  # warmup half-way
    assert sched.step(10) == pytest.approx(0.07)  # cosine start
    # half-way through steps 10..110: 0.01 + 0.06 * (1 + cos(pi / 2)) / 2 = 0.04
    assert sched.step(60) == pytest.approx(0.04)
    # a quarter: 0.01 + 0.06 * (1 + cos(pi / 4)) / 2
    assert sched.step(35) == pytest.approx(0.01 + 0.06 * (1 + math.cos(math.pi / 4)) / 2)
    assert sched.step(110) == pytest.approx(0.01)
    assert sched.step(1000) == pytest.approx(0.01)


def test_exponential():
    sched = make("exponential", decay_rate=0.9)
    assert sched.step(0) == pytest.approx(0.07)
    assert sched.step(2) == pytest.approx(0.07 * 0.81)
    assert sched.step(100) == pytest.approx(0.01)  # 0.07 * 0.9^100 ~ 1.9e-6, clamped to min_temp


def test_adaptive_reacts_to_a_plateau():
    sched = make("adaptive", initial_temp=0.08, patience=3, factor=0.5, threshold=0.01)
    assert sched.step(0, loss=1.0) == 0.08  # first loss sets the best
    assert sched.step(1, loss=0.995) == 0.08  # not better than 1.0 - 0.01 * 1.0: 1 bad
    assert sched.step(2, loss=1.0) == 0.08  # 2 bad
    assert sched.step(3, loss=1.2) == pytest.approx(0.04)  # 3 bad = patience: x 0.5
    assert sched.step(4, loss=0.5) == pytest.approx(0.04)  # improvement resets the count
    assert sched.step(5) == pytest.approx(0.04)  # no loss: no change
    values = [sched.step(6 + i, loss=0.5) for i in range(6)]
    assert values == pytest.approx([0.04, 0.04, 0.02, 0.02, 0.02, 0.01])
    assert [sched.step(12 + i, loss=0.5) for i in range(3)] == pytest.approx([0.01] * 3)  # floor: min_temp
    assert sched.num_reductions == 4


def test_adaptive_keeps_improving_loss_unchanged():
    sched = make("adaptive", patience=2, factor=0.5)
    values = [sched.step(i, loss=1.0 / (i + 1)) for i in range(20)]
    assert values == [0.07] * 20


def test_adaptive_handles_negative_losses():
    sched = make("adaptive", patience=2, factor=0.5, threshold=0.1)
    sched.step(0, loss=-1.0)
    sched.step(1, loss=-1.05)  # better, but not by 10% of |best|
    assert sched.step(2, loss=-1.05) == pytest.approx(0.035)
    sched.step(3, loss=-2.0)  # clearly better
    assert sched.best_loss == -2.0 and sched.num_bad_steps == 0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_state_dict_resumes_exactly(schedule):
    losses = [1.0, 0.9, 0.9, 0.9, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    reference = make(schedule, patience=2, factor=0.8, decay_rate=0.95)
    expected = [reference.step(i, loss=loss) for i, loss in enumerate(losses)]

    first = make(schedule, patience=2, factor=0.8, decay_rate=0.95)
    got = [first.step(i, loss=loss) for i, loss in enumerate(losses[:5])]
    resumed = make(schedule, patience=2, factor=0.8, decay_rate=0.95)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.step(loss=loss) for loss in losses[5:]]  # step=None continues from last_step
    assert got == expected
    assert resumed.last_step == len(losses) - 1


def test_validation():
    with pytest.raises(ValueError, match="constant, warmup, cosine, exponential, adaptive"):
        make("linear")
    with pytest.raises(ValueError, match="min_temp"):
        make("constant", min_temp=0.2)
    with pytest.raises(ValueError, match="mismatch"):
        make("cosine").load_state_dict(make("constant").state_dict())
