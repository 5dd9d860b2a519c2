"""What a measured init loss says, as data: an :class:`InitLossCause` and the causes behind a loss too high.

:func:`judge_init_loss` holds the loss to its references (:mod:`~lightning_recipe.diagnostics.init_loss`) and
names the verdict; when the loss sits far above them, :func:`diagnose_high_loss` reads the inputs, the outputs and
the final layer and names the likely causes, most likely first; :func:`non_finite_cause` does the same for a NaN
loss. Every threshold that decides between causes lives here, once; the callback turns causes and numbers into
words from one table (``callbacks/_init_loss_text.py``). No Lightning here.

Example::

    >>> import torch
    >>> from lightning_recipe.diagnostics.init_loss import references
    >>> from lightning_recipe.diagnostics.task import task_views
    >>> view = task_views(torch.zeros(40, 4), torch.arange(40) % 4)[0]
    >>> judge_init_loss(9.0, "cross_entropy", references(view)).reason
    <InitLossCause.ABOVE_CHANCE: 'above_chance'>
    >>> diagnose_high_loss(view, None, {"mean": 120.0, "std": 60.0}, None).causes  # 0..255 pixels
    (<HighLossCause.RAW_INPUTS: 'raw_inputs'>,)
    >>> loud = task_views(torch.eye(4).repeat(10, 1) * 20, torch.arange(40) % 4)[0]  # logits of +-20
    >>> diagnose_high_loss(loud, None, {"mean": 0.0, "std": 1.0}, None).causes
    (<HighLossCause.LARGE_LOGITS: 'large_logits'>,)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.init_loss import References, output_stats
from lightning_recipe.diagnostics.task import TaskView

__all__ = [
    "IMBALANCE_NATS",
    "LARGE_BIAS",
    "LARGE_LOGIT_STD",
    "OFFSET_ADVICE_STDS",
    "OFFSET_STDS",
    "RAW_INPUT_SCALE",
    "Assessment",
    "FinalLayer",
    "HighLoss",
    "HighLossCause",
    "InitLossCause",
    "NonFiniteCause",
    "diagnose_high_loss",
    "final_layer",
    "judge_init_loss",
    "non_finite_cause",
    "tolerance_above",
    "tolerance_below",
]

#: a regression whose outputs start this many target standard deviations from the targets' mean fails: the
#: offset then costs at least OFFSET_STDS**2 = 25 times the variance the model is there to learn, so the loss
#: curve starts as a hockey stick that says nothing about learning, and a plain optimizer spends its first
#: hundreds of steps on the output mean (targets around 50 with std 2.4 start ~20 std away; SGD at 1e-3 takes
#: thousands of steps). Nearer offsets are advice, as an imbalanced label prior is: the tests' shrunk
#: super-resolution net starts ~2.2 std off (output mean -0.09, targets 0.45 +- 0.25) and Adam at 1e-3 closes
#: it within ~40 steps, while the loss it costs is at most 4x the variance.
OFFSET_STDS = 5.0
#: an offset of at least this many target standard deviations is worth a hint (the bias value) when passing
OFFSET_ADVICE_STDS = 1.0
#: labels are "imbalanced" when the uniform output costs this many nats more than the prior
IMBALANCE_NATS = 0.1
#: inputs whose mean or std exceeds this in magnitude are unnormalised (0..255 pixels, raw physical units)
RAW_INPUT_SCALE = 5.0
#: a final-layer bias entry larger than this in magnitude is a large constant offset of the logits: a default
#: init draws it within ~1/sqrt(fan_in), and log class priors stay within ~2 until a class is rarer than 1 in 7
LARGE_BIAS = 2.0
#: logits spread over more than this (their std, or the spread of the per-class mean logit) are too large: a
#: default init gives ~0.3-1 on roughly standardised inputs, a uniform guess 0
LARGE_LOGIT_STD = 1.0


# -- the verdict ------------------------------------------------------------------------------------


def tolerance_above(loss_kind: str | None, reference: float) -> float:
    """How far above ``reference`` a healthy init may sit.

    Cross-entropy / BCE: ``max(1.0, 0.25 * reference)`` nats. A default PyTorch init gives logits with
    std ~0.3-1.3, which costs up to ~1 nat over ``ln C`` when the inputs are only roughly standardised
    (over 200 seeds of the test MLP on inputs with std 3.2: median +0.2, max +0.92 nats over ``ln 4``).
    A final layer 10x too large, a bias of 8, or raw 0..255 inputs cost 2 to 30 nats.
    MSE: ``reference`` (up to twice chance: the output's own variance may reach ``E[y^2]``).
    L1: ``0.5 * reference``. Unknown (custom loss with ``expected=``): ``0.25 * |reference|``.
    """
    if loss_kind in ("cross_entropy", "bce"):
        return max(1.0, 0.25 * reference)
    if loss_kind == "mse":
        return abs(reference)
    if loss_kind == "l1":
        return 0.5 * abs(reference)
    return 0.25 * abs(reference)


def tolerance_below(loss_kind: str | None, reference: float) -> float:
    """How far below the prior-optimal loss a model that knows nothing about its inputs may land:
    ``max(0.25, 0.5 * reference)`` nats for classification, half of it for regression and custom losses."""
    if loss_kind in ("cross_entropy", "bce"):
        return max(0.25, 0.5 * reference)
    return 0.5 * abs(reference)


class InitLossCause(str, Enum):
    """The verdict on a measured init loss: ``OK``, or what failed."""

    OK = "ok"
    ABOVE_CHANCE = "above_chance"  # bad scale: final layer, inputs, bias (see :func:`diagnose_high_loss`)
    TARGET_OFFSET = "target_offset"  # regression: outputs start far from the targets' mean, no bias for it
    BELOW_PRIOR = "below_prior"  # better than any constant: label leak, or a trained model
    ABOVE_EXPECTED = "above_expected"  # far above ``expected=``
    BELOW_EXPECTED = "below_expected"  # far below ``expected=``


@dataclass(frozen=True)
class Assessment:
    """The verdict on a measured init loss.

    Attributes:
        ok: no failure.
        reason: what the loss showed (a ``str`` enum: it compares equal to its value, ``"above_chance"``).
        reference: the value ``measured`` was held to.
        limit: the threshold it crossed (or the nearest one when ok).
        bias_advice: the final bias is worth setting (imbalanced labels or an offset target mean) though
            the check passes.
    """

    ok: bool
    reason: InitLossCause
    reference: float
    limit: float
    bias_advice: bool = False


def judge_init_loss(
    measured: float,
    loss_kind: str | None,
    refs: References | None,
    expected: float | None = None,
    rows: int = 0,
    width: int = 1,
) -> Assessment:
    """Hold ``measured`` to ``expected`` when given, else to chance (above) and prior-optimal (below)."""
    if expected is not None:
        above, below = tolerance_above(loss_kind, expected), tolerance_below(loss_kind, expected)
        if measured > expected + above:
            return Assessment(False, InitLossCause.ABOVE_EXPECTED, expected, expected + above)
        if measured < expected - below:
            return Assessment(False, InitLossCause.BELOW_EXPECTED, expected, expected - below)
        return Assessment(True, InitLossCause.OK, expected, expected + above)
    if refs is None:
        raise ValueError("Expected `refs` or `expected`, got neither.")
    chance, best = refs.chance, refs.prior_optimal
    limit = chance + tolerance_above(loss_kind, chance)
    offset = float(refs.extra.get("offset_stds", 0.0))
    if loss_kind in ("mse", "l1") and offset >= OFFSET_STDS:
        # the outputs' mean is the specific cause, whether or not the loss is also above chance
        return Assessment(False, InitLossCause.TARGET_OFFSET, best, OFFSET_STDS)
    if measured > limit:
        return Assessment(False, InitLossCause.ABOVE_CHANCE, chance, limit)
    floor = best - tolerance_below(loss_kind, best)
    if measured < floor:
        return Assessment(False, InitLossCause.BELOW_PRIOR, best, floor)
    if loss_kind in ("mse", "l1"):
        # an offset is judged by its size against the targets' spread, not by which reference the loss is near
        return Assessment(True, InitLossCause.OK, chance, limit, bias_advice=offset >= OFFSET_ADVICE_STDS)
    # classification: an imbalanced prior the bias does not express yet is advice, not a failure (the cost
    # is bounded by ln C nats and training removes it in the first steps); needs enough rows per class
    enough = loss_kind == "bce" or rows >= 10 * width
    advice = enough and refs.imbalance > IMBALANCE_NATS and measured - best > 0.5 * refs.imbalance
    return Assessment(True, InitLossCause.OK, chance, limit, bias_advice=advice)


# -- why a loss is too high -------------------------------------------------------------------------


class HighLossCause(str, Enum):
    """A likely cause of a loss far above its reference, in the order :func:`diagnose_high_loss` lists them."""

    RAW_INPUTS = "raw_inputs"  # inputs not normalised
    LARGE_BIAS = "large_bias"  # a large constant offset of the logits: the final bias
    LARGE_LOGITS = "large_logits"  # logits spread too wide: the final weights
    LARGE_OUTPUTS = "large_outputs"  # regression outputs much larger than the targets
    UNKNOWN_SCALE = "unknown_scale"  # no reading of the outputs: weights or inputs, unknown which
    WRONG_EXPECTED = "wrong_expected"  # ``expected=`` may be the wrong value


@dataclass(frozen=True)
class FinalLayer:
    """The last layer (in registration order) whose weight produces one value per output column."""

    name: str
    weight_std: float
    bias_mean: float | None = None
    bias_abs_max: float | None = None

    def as_details(self) -> dict[str, Any]:
        """The JSON form in a result's details: the bias entries only when the layer has a bias."""
        info: dict[str, Any] = {"name": self.name, "weight_std": self.weight_std}
        if self.bias_abs_max is not None:
            info.update(bias_mean=self.bias_mean, bias_abs_max=self.bias_abs_max)
        return info


def final_layer(module: nn.Module, width: int) -> FinalLayer | None:
    """The last layer (in registration order) whose weight produces ``width`` outputs: the final layer."""
    found = None
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, nn.Embedding) or not isinstance(weight, Tensor) or weight.ndim < 2:
            continue
        if weight.shape[0] == width:
            found = (name, sub, weight)
    if found is None:
        return None
    name, sub, weight = found
    bias = getattr(sub, "bias", None)
    if not isinstance(bias, Tensor):
        return FinalLayer(name, float(weight.detach().float().std()))
    b = bias.detach().float()
    return FinalLayer(name, float(weight.detach().float().std()), float(b.mean()), float(b.abs().max()))


@dataclass(frozen=True)
class HighLoss:
    """Why a loss sits far above its reference: the likely causes, most likely first, and their numbers.

    Attributes:
        causes: never empty.
        input_mean, input_std: of the first input tensor (NaN when it has none).
        logit_std, offset_std, within_std: the spread of all logits, of the per-class mean logit (a constant
            offset) and of one class's logit across examples (what the inputs move); NaN for regression.
        output_std, target_std: regression outputs and targets (NaN for classification).
        layer: the final layer, when one produces the outputs.
    """

    causes: tuple[HighLossCause, ...]
    input_mean: float = math.nan
    input_std: float = math.nan
    logit_std: float = math.nan
    offset_std: float = math.nan
    within_std: float = math.nan
    output_std: float = math.nan
    target_std: float = math.nan
    layer: FinalLayer | None = None


def diagnose_high_loss(
    view: TaskView | None,
    refs: References | None,
    inputs: Mapping[str, Any] | None,
    layer: FinalLayer | None,
    vs_expected: bool = False,
) -> HighLoss:
    """The likely causes of a loss far above chance (or ``expected=``), read from the first input's statistics
    (``inputs``, as :func:`~lightning_recipe.diagnostics.batch.value_stats` gives them), the outputs of ``view``
    and the final layer. ``vs_expected`` adds that the expected value itself may be wrong."""
    causes: list[HighLossCause] = []
    inputs = inputs or {}
    if max(abs(inputs.get("mean", 0.0)), inputs.get("std", 0.0)) > RAW_INPUT_SCALE:
        causes.append(HighLossCause.RAW_INPUTS)
    numbers = _scale_numbers(view, refs, inputs, layer)
    if view is None:
        causes.append(HighLossCause.UNKNOWN_SCALE)
    elif view.task == "regression":
        causes.append(HighLossCause.LARGE_OUTPUTS)
    else:
        if _large_bias(numbers):
            causes.append(HighLossCause.LARGE_BIAS)
        if numbers.logit_std > LARGE_LOGIT_STD or not causes:
            causes.append(HighLossCause.LARGE_LOGITS)
    if vs_expected:
        causes.append(HighLossCause.WRONG_EXPECTED)
    return replace(numbers, causes=tuple(causes))


def _scale_numbers(
    view: TaskView | None, refs: References | None, inputs: Mapping[str, Any], layer: FinalLayer | None
) -> HighLoss:
    """The numbers the causes are read from, with no cause yet."""
    mean, std = float(inputs.get("mean", math.nan)), float(inputs.get("std", math.nan))
    if view is None:
        return HighLoss((), mean, std, layer=layer)
    stats = output_stats(view)
    if view.task != "regression":
        return HighLoss((), mean, std, stats["logit_std"], stats["offset_std"], stats["within_std"], layer=layer)
    target_std = float(refs.extra.get("target_std", math.nan)) if refs is not None else math.nan
    return HighLoss((), mean, std, output_std=stats["output_std"], target_std=target_std, layer=layer)


def _large_bias(numbers: HighLoss) -> bool:
    """The final bias is large; with no bias to read, a per-class offset of the logits wider than what the
    inputs move them is the same thing seen from the outputs."""
    layer = numbers.layer
    if layer is not None and layer.bias_abs_max is not None:
        return layer.bias_abs_max > LARGE_BIAS
    return numbers.offset_std > numbers.within_std and numbers.offset_std > LARGE_LOGIT_STD


# -- why a loss is not finite -----------------------------------------------------------------------


class NonFiniteCause(str, Enum):
    """Where a NaN/inf loss at init comes from, the first that holds in this order."""

    INPUTS = "inputs"  # the inputs hold NaN/inf
    OUTPUTS = "outputs"  # the outputs are NaN/inf at init
    TARGETS = "targets"  # the targets hold NaN/inf
    LOSS = "loss"  # everything fed to the loss is finite: the loss makes it


def non_finite_cause(inputs_finite: bool, view: TaskView | None) -> NonFiniteCause:
    """The first source of a non-finite loss: the inputs, the outputs, the targets (of ``view``), else the loss."""
    if not inputs_finite:
        return NonFiniteCause.INPUTS
    if view is not None and not bool(torch.isfinite(view.outputs).all()):
        return NonFiniteCause.OUTPUTS
    if view is not None and not bool(torch.isfinite(view.targets).all()):
        return NonFiniteCause.TARGETS
    return NonFiniteCause.LOSS
