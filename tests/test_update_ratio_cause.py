"""The update-ratio verdict as data (diagnostics/update_ratio_cause.py) and its words (callbacks/_update_ratio_text.py):
each cause from known numbers, the thresholds at their edges, and a message for every cause."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from lightning_recipe.callbacks import _update_ratio_text as text
from lightning_recipe.diagnostics import update_ratio as ur
from lightning_recipe.diagnostics.update_ratio_cause import (
    LR_DECAYED,
    Cause,
    Finding,
    History,
    Limits,
    Measurement,
    judge,
    not_in_optimizer,
)

LIMITS = Limits(window=3, max_ratio=0.1, min_ratio=1e-5)


def step(ratio: float, *, step: int = 0, lr: float = 1e-3, **setting) -> Measurement:
    """One step of a one-matrix model whose weight norm is 1, so the update norm is the ratio."""
    return Measurement(
        step=step,
        names=("w",),
        update_norms=(ratio,),
        weight_norms=(1.0,),
        ratios=(ratio,),
        gradient_norms=(1.0,),
        has_grad=(True,),
        param_lrs=(lr,),
        lrs=(lr,),
        median=ratio,
        **setting,
    )


def run(ratios, history=None, limits=LIMITS, **setting):
    """Judge a sequence of steps; the findings of every step, and the history at the end."""
    history = history or History(start_lrs=(setting.get("lr", 1e-3),))
    findings = []
    for i, ratio in enumerate(ratios):
        verdict = judge(step(ratio, step=i, **setting), history, limits)
        findings += verdict.findings
        history = verdict.history
    return findings, history


# -- the learning rate on the sustained window -----------------------------------------------------------------


def test_a_sustained_high_median_is_a_learning_rate_too_high_and_remembers_when():
    findings, history = run([0.5, 0.5, 0.5])
    assert [f.cause for f in findings] == [Cause.LR_TOO_HIGH]
    assert findings[0].kind == "ratio_too_high" and findings[0].factor == pytest.approx(500)
    assert history.too_high_at == 2 and list(history.medians) == [0.5, 0.5, 0.5]


def test_a_sustained_low_median_blames_the_learning_rate_itself():
    findings, _ = run([1e-7] * 3)
    assert [f.cause for f in findings] == [Cause.LR_TOO_LOW]
    assert findings[0].factor == pytest.approx(1e4)


def test_a_ratio_that_falls_after_a_too_high_verdict_has_collapsed():
    history = History(start_lrs=(1e-3,), too_high_at=40)
    findings, _ = run([1e-7] * 3, history=history)
    assert [f.cause for f in findings] == [Cause.COLLAPSED] and findings[0].too_high_at == 40


@pytest.mark.parametrize(("fall", "cause"), [(LR_DECAYED, Cause.LR_DECAYED), (LR_DECAYED * 0.9, Cause.LR_TOO_LOW)])
def test_a_learning_rate_decayed_ten_times_below_its_start_blames_the_schedule(fall, cause):
    history = History(start_lrs=(3e-3,), steps=500)
    findings, _ = run([1e-7] * 3, history=history, lr=3e-3 / fall)
    assert [f.cause for f in findings] == [cause]
    assert findings[0].decayed == pytest.approx(fall) and findings[0].steps == 500


# -- the first steps --------------------------------------------------------------------------------------------


def test_large_first_steps_of_plain_sgd_are_no_verdict_unless_the_loss_diverges():
    first = dict(early=True, regular=False)
    assert run([0.5] * 3, **first)[0] == []
    findings, _ = run([0.5] * 3, early_losses=(1.0, 6.0), **first)
    assert [f.cause for f in findings] == [Cause.OVERSHOOTING_START] and findings[0].loss_rise == 6.0


def test_large_first_steps_of_an_adaptive_optimizer_are_a_learning_rate_too_high():
    findings, history = run([0.5] * 3, early=True, regular=False, adaptive=True)
    assert [f.cause for f in findings] == [Cause.ADAPTIVE_START]
    assert list(history.early_medians) == [0.5] * 3 and list(history.medians) == []


def test_first_steps_larger_than_the_weights_explode_whatever_the_optimizer():
    findings, _ = run([2.0] * 3, early=True, regular=False)
    assert [f.cause for f in findings] == [Cause.OVERSHOOTING_START]


def test_tiny_first_steps_are_too_low_unless_a_warmup_ramps_the_learning_rate_up():
    findings, _ = run([1e-7] * 3, early=True, regular=False)
    assert [f.cause for f in findings] == [Cause.LR_TOO_LOW]
    warming = History(start_lrs=(1e-3,))
    assert run([1e-7] * 3, history=warming, early=True, regular=False, lr=1e-5)[0] == []


# -- parameters that do not move, non-finite values ------------------------------------------------------------


def zero_updates(names, lrs, gradient_norms, weight_update=0.0):
    n = len(names)
    updates = tuple(weight_update if name.endswith("weight") else 0.0 for name in names)
    return Measurement(
        step=7,
        names=names,
        update_norms=updates,
        weight_norms=(1.0,) * n,
        ratios=updates,
        gradient_norms=gradient_norms,
        has_grad=(True,) * n,
        param_lrs=lrs,
        lrs=tuple(sorted(set(lrs))),
        median=None,
    )


def test_a_parameter_that_never_moves_for_a_window_is_found_with_the_learning_rate_that_explains_it():
    history = History()
    stuck_zero_lr = zero_updates(("a.weight", "b.weight"), (0.0, 0.0), (1.0, 1.0))
    for _ in range(LIMITS.window - 1):
        verdict = judge(stuck_zero_lr, history, LIMITS)
        assert verdict.findings == ()  # one zero step is no evidence
        history = verdict.history
    (finding,) = judge(stuck_zero_lr, history, LIMITS).findings
    assert finding.cause is Cause.ZERO_LR and finding.parameters == ("a.weight", "b.weight")
    assert finding.details == {"parameters": ["a.weight", "b.weight"], "lr": [0.0]}
    no_gradient = zero_updates(("a.weight",), (1e-2,), (0.0,))
    (finding,) = judge(no_gradient, replace(history, zero_streak={"a.weight": 2}), LIMITS).findings
    assert finding.cause is Cause.NO_GRADIENT and finding.kind == "not_moving"


def test_a_bias_cancelled_by_a_normalisation_is_a_note_not_a_finding():
    cancelled = zero_updates(("c.weight", "c.bias"), (1e-2, 1e-2), (1.0, 1e-9), weight_update=1e-3)
    verdict = judge(cancelled, History(zero_streak={"c.bias": 2}), LIMITS)
    assert verdict.findings == () and dict(verdict.cancelled) == {"c.bias": "c.weight"}
    assert verdict.history.zero_streak == {"c.weight": 0, "c.bias": 3}


def test_non_finite_values_end_the_verdict_and_leave_the_history_as_it_was():
    history = History(start_lrs=(1e-3,), medians=(0.5, 0.5), zero_streak={"w": 2})
    verdict = judge(replace(step(0.5, step=9), update_norms=(math.nan,), ratios=(math.nan,)), history, LIMITS)
    assert [f.cause for f in verdict.findings] == [Cause.NON_FINITE] and verdict.history == history
    assert verdict.findings[0].details == {"parameters": ["w"], "step": 9}


def test_trainable_parameters_in_no_optimizer_are_named():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].bias.requires_grad_(False)
    finding = not_in_optimizer(model.named_parameters(), [model[0].weight])
    assert finding is not None and finding.parameters == ("1.weight", "1.bias") and finding.trainable == 3
    assert not_in_optimizer(model.named_parameters(), model.parameters()) is None


# -- what the verdict reads from the optimizer -----------------------------------------------------------------


def test_an_optimizer_with_second_moment_state_is_adaptive():
    w = nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    for optimizer, adaptive in [(torch.optim.Adam([w]), True), (torch.optim.SGD([w], lr=0.1), False)]:
        optimizer.step()
        assert ur.is_adaptive(optimizer) is adaptive
    assert ur.start_lr({"lr": 0.5, "initial_lr": 0.1}) == 0.1 and ur.start_lr({"lr": 0.5}) == 0.5


# -- the words -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cause", list(Cause))
def test_every_cause_has_a_message_with_its_numbers(cause):
    finding = Finding(
        cause, 5, parameters=("a", "b"), lrs=(1e-2,), start_lrs=(1e-1,), median=0.5, ranked=(("a", 0.5),),
        history=(0.5,), loss_rise=6.0, decayed=10.0, too_high_at=3, steps=50, trainable=4,
    )  # fmt: skip
    message = text.message(finding, LIMITS, every_n_steps=50)
    assert "{" not in message and "}" not in message
    numbers = {
        "not_in_optimizer": "2 of 4",
        "non_finite": "1.0e-02",
        "not_moving": "last 3 measured optimizer steps (every 50 steps): a, b",
        "ratio_too_high": "5.0e-01",
        "ratio_too_low": "below 1.0e-05",
    }
    assert numbers[finding.kind] in message


def test_a_learning_rate_changed_by_a_scheduler_is_said_with_where_it_started():
    assert text.lr_text([1e-3], [1e-3]) == "1.0e-03"
    assert text.lr_text([1e-4, 1e-3], [1e-3, 1e-3]) == (
        "1.0e-04, 1.0e-03 (per param group), changed by a scheduler from 1.0e-03, 1.0e-03 at the start"
    )
    assert text.fmt(0.0) == "0.0" and text.fmt(math.inf) == "inf" and text.fmt(3e-3) == "3.0e-03"
