"""Learning-rate schedule: linear warmup, then cosine / linear / constant, as a pure function of the step."""

from __future__ import annotations

import pytest

from tuneforge.train.schedule import lr_at, warmup_steps

BASE = 2e-4


def lrs(kind, total=100, warmup=10, base=BASE):
    return [lr_at(s, base_lr=base, total_steps=total, warmup=warmup, kind=kind) for s in range(total)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_reaches_base_lr(kind):
    sched = lrs(kind, total=100, warmup=10)
    warm = sched[:10]
    assert warm[0] == pytest.approx(BASE / 10)  # the first step already learns
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert steps == pytest.approx([BASE / 10] * 9)
    assert warm[-1] == pytest.approx(BASE)  # the last warmup step is at base_lr
    assert sched[10] == pytest.approx(BASE)  # and decay starts from base_lr
    assert max(sched) == pytest.approx(BASE)


def test_cosine_ends_near_zero_and_is_half_way_at_half_decay():
    total, warmup = 1000, 100
    sched = lrs("cosine", total=total, warmup=warmup)
    assert sched[warmup + (total - warmup) // 2] == pytest.approx(BASE / 2)
    assert 0 < sched[-1] < BASE * 1e-4
    assert lr_at(total, base_lr=BASE, total_steps=total, warmup=warmup, kind="cosine") == pytest.approx(0, abs=1e-12)
    decay = sched[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises again


def test_linear_halves_half_way_and_decays_evenly():
    total, warmup = 110, 10
    sched = lrs("linear", total=total, warmup=warmup)
    assert sched[warmup + 50] == pytest.approx(BASE / 2)
    assert sched[warmup + 25] == pytest.approx(BASE * 0.75)
    decay = sched[warmup:]
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([BASE / 100] * 99)
    assert sched[-1] == pytest.approx(BASE / 100)


def test_constant_stays_after_warmup():
    sched = lrs("constant", total=50, warmup=5)
    assert sched[5:] == pytest.approx([BASE] * 45)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_base_lr(kind):
    assert lrs(kind, total=20, warmup=0)[0] == pytest.approx(BASE)


def test_schedule_is_a_pure_function_of_the_step():
    # resume: asking again for any step gives the same value as the first time
    first = lrs("cosine", total=200, warmup=20)
    again = [lr_at(s, base_lr=BASE, total_steps=200, warmup=20, kind="cosine") for s in reversed(range(200))]
    assert first == list(reversed(again))


def test_unknown_scheduler_errors():
    with pytest.raises(ValueError, match="cosin"):
        lr_at(5, base_lr=BASE, total_steps=10, warmup=0, kind="cosin")


@pytest.mark.parametrize("total, steps, ratio, expected", [
    (1000, None, 0.1, 100),
    (1000, None, 0.0, 0),
    (1000, 50, 0.1, 50),  # explicit steps win over the ratio
    (10, 50, 0.0, 10),  # never longer than the run
    (7, None, 0.5, 4),
    (100, 0, 0.3, 0),
])
def test_warmup_steps_helper(total, steps, ratio, expected):
    assert warmup_steps(total, steps, ratio) == expected


def test_warmup_as_long_as_the_run_never_exceeds_base_lr():
    total = 10
    w = warmup_steps(total, 50, 0.0)
    sched = lrs("cosine", total=total, warmup=w)
    assert sched == pytest.approx([BASE * (s + 1) / total for s in range(total)])
