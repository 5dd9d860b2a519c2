"""InitLossCheck's causes as data: the diagnostic decides (each threshold once), the text table only words it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_recipe.callbacks._init_loss_text import HIGH_LOSS_TEXT, NON_FINITE_TEXT, TEXT, wording
from lightning_recipe.diagnostics.init_loss import references
from lightning_recipe.diagnostics.init_loss_cause import (
    LARGE_BIAS,
    LARGE_LOGIT_STD,
    RAW_INPUT_SCALE,
    FinalLayer,
    HighLossCause,
    InitLossCause,
    NonFiniteCause,
    diagnose_high_loss,
    final_layer,
    judge_init_loss,
    non_finite_cause,
)
from lightning_recipe.diagnostics.loss_reading import Reading
from lightning_recipe.diagnostics.task import TaskView, task_views


def _classes(outputs: torch.Tensor) -> TaskView:
    """A 4-class view of ``outputs`` against balanced labels."""
    return task_views(outputs, torch.arange(outputs.shape[0]) % outputs.shape[1])[0]


QUIET = _classes(torch.zeros(40, 4))  # a uniform guess: logit std 0
STANDARD = {"mean": 0.0, "std": 1.0}


def test_every_cause_has_its_words():
    assert set(TEXT) == set(InitLossCause)
    assert set(HIGH_LOSS_TEXT) == set(HighLossCause)
    assert set(NON_FINITE_TEXT) == set(NonFiniteCause)


def test_the_verdict_is_an_enum_that_reads_as_its_value():
    refs = references(QUIET)
    verdict = judge_init_loss(9.0, "cross_entropy", refs)
    assert verdict.reason is InitLossCause.ABOVE_CHANCE and verdict.reason == "above_chance"
    assert judge_init_loss(math.log(4), "cross_entropy", refs).reason is InitLossCause.OK
    assert judge_init_loss(9.0, None, None, expected=2.0).reason is InitLossCause.ABOVE_EXPECTED
    assert judge_init_loss(0.1, None, None, expected=2.0).reason is InitLossCause.BELOW_EXPECTED


@pytest.mark.parametrize(("scale", "raw"), [(RAW_INPUT_SCALE * 0.99, False), (RAW_INPUT_SCALE * 1.01, True)])
def test_inputs_are_raw_above_the_scale_by_mean_or_by_std(scale, raw):
    for stats in ({"mean": -scale, "std": 1.0}, {"mean": 0.0, "std": scale}):
        causes = diagnose_high_loss(QUIET, None, stats, None).causes
        assert (HighLossCause.RAW_INPUTS in causes) is raw
    # a classifier with nothing else to blame: its logits are named, as the fallback
    assert diagnose_high_loss(QUIET, None, STANDARD, None).causes == (HighLossCause.LARGE_LOGITS,)


def test_a_large_final_bias_is_read_from_the_layer_when_it_has_one():
    just_over = FinalLayer("head", 0.1, 0.0, LARGE_BIAS * 1.01)
    just_under = FinalLayer("head", 0.1, 0.0, LARGE_BIAS * 0.99)
    assert diagnose_high_loss(QUIET, None, STANDARD, just_over).causes == (HighLossCause.LARGE_BIAS,)
    assert diagnose_high_loss(QUIET, None, STANDARD, just_under).causes == (HighLossCause.LARGE_LOGITS,)


def test_without_a_bias_a_per_class_offset_wider_than_the_inputs_move_it_is_the_bias():
    g = torch.Generator().manual_seed(0)
    offset = torch.tensor([0.0, 3.0, -3.0, 6.0])  # per-class spread ~3.7 > LARGE_LOGIT_STD
    high = diagnose_high_loss(_classes(offset + 0.1 * torch.randn(40, 4, generator=g)), None, STANDARD, None)
    assert high.offset_std > LARGE_LOGIT_STD and high.offset_std > high.within_std
    assert high.causes == (HighLossCause.LARGE_BIAS, HighLossCause.LARGE_LOGITS)  # the logits spread too
    small = diagnose_high_loss(_classes(0.2 * offset + torch.randn(40, 4, generator=g)), None, STANDARD, None)
    assert HighLossCause.LARGE_BIAS not in small.causes  # the inputs move the logits more than the offset


def test_regression_outputs_too_large_and_an_unread_loss_have_their_own_causes():
    g = torch.Generator().manual_seed(0)
    view = task_views(30 * torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g), task="regression")[0]
    high = diagnose_high_loss(view, references(view), STANDARD, None, vs_expected=True)
    assert high.causes == (HighLossCause.LARGE_OUTPUTS, HighLossCause.WRONG_EXPECTED)  # `expected=` comes last
    assert high.output_std == pytest.approx(float(view.outputs.double().std()), rel=1e-6)
    assert high.target_std == pytest.approx(float(view.targets.double().std()), rel=1e-6)
    assert math.isnan(high.logit_std)
    assert diagnose_high_loss(None, None, None, None).causes == (HighLossCause.UNKNOWN_SCALE,)


def test_a_non_finite_loss_is_traced_to_the_first_source_that_holds_nan():
    nan_out = TaskView("regression", "mse", torch.tensor([[math.nan]]), torch.tensor([[math.nan]]), "")
    nan_target = TaskView("regression", "mse", torch.zeros(1, 1), torch.tensor([[math.inf]]), "")
    assert non_finite_cause(False, nan_out) is NonFiniteCause.INPUTS
    assert non_finite_cause(True, nan_out) is NonFiniteCause.OUTPUTS
    assert non_finite_cause(True, nan_target) is NonFiniteCause.TARGETS
    assert non_finite_cause(True, QUIET) is NonFiniteCause.LOSS
    assert non_finite_cause(True, None) is NonFiniteCause.LOSS


def test_the_final_layer_is_the_last_with_that_width_never_an_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 3))
    layer = final_layer(model, 4)
    assert layer is not None and layer.name == "2" and layer.bias_abs_max is None
    assert layer.as_details() == {"name": "2", "weight_std": pytest.approx(float(model[2].weight.detach().std()))}
    with_bias = final_layer(model, 3)
    assert with_bias is not None and with_bias.bias_abs_max == pytest.approx(float(model[3].bias.detach().abs().max()))
    assert set(with_bias.as_details()) == {"name", "weight_std", "bias_mean", "bias_abs_max"}
    assert final_layer(model, 5) is None


def test_the_hint_words_each_cause_with_its_numbers_most_likely_first():
    loud = _classes(torch.eye(4).repeat(10, 1) * 20)  # logits of 0 and 20: std ~8.7, no per-class offset
    refs = references(loud)
    verdict = judge_init_loss(9.0, "cross_entropy", refs)
    high = diagnose_high_loss(loud, refs, {"mean": 120.0, "std": 60.0}, FinalLayer("net.2", 0.25, 0.0, 0.1))
    assert high.causes == (HighLossCause.RAW_INPUTS, HighLossCause.LARGE_LOGITS)
    reading = Reading("cross_entropy", "mean", loud, math.log(4), 1.0)
    summary, hint = wording(verdict, 9.0, None, reading, refs, high, " `net.2`")
    assert summary == (
        f"measured 9 vs expected ~1.386 (chance: ln 4), prior-optimal 1.386 for 4-class cross-entropy: far above "
        f"chance (limit {verdict.limit:.4g})."
    )
    assert hint is not None and hint.startswith("Likely causes, most likely first: (1) the inputs are not normalised")
    assert "(mean 120, std 60)" in hint and f"(2) the logits are too large (std {high.logit_std:.3g};" in hint
    assert "the final layer `net.2`'s weights are too large (weight std 0.25)" in hint
