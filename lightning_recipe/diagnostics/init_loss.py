"""The loss a model should have at initialisation, and what the loss it has says about its init.

Recipe item "verify loss @ init" and "init well": at initialisation a model knows nothing, so its loss
should sit near *chance* (the loss of a uniform / zero output) and no lower than *prior-optimal* (the
loss of the best input-independent constant: the label prior, the target mean). Given a
:class:`~lightning_recipe.diagnostics.task.TaskView` (2-D outputs, one row per prediction, read in
:mod:`lightning_recipe.diagnostics.task`), this module computes both references, the final-layer bias
that reaches the prior-optimal loss, the statistics of the outputs, and the verdict (:func:`assess`). No Lightning here.

=============  =====================  =========================  ==============================
loss           chance                 prior-optimal              bias that reaches it
=============  =====================  =========================  ==============================
cross-entropy  ``ln C``               ``H(p)``, label prior p    ``log p_c``
BCE (logits)   ``ln 2`` per label     mean ``H_b(p_k)``          ``log(p_k / (1 - p_k))``
MSE            ``E[y^2]``             ``Var(y)`` per column      column mean of y
L1             ``E|y|``               ``E|y - median(y)|``       column median of y
=============  =====================  =========================  ==============================

Example::

    >>> import torch
    >>> from lightning_recipe.diagnostics.task import task_views
    >>> view = choose_view(task_views(torch.zeros(8, 4), torch.arange(8) % 4))
    >>> round(references(view).chance, 4)  # ln 4
    1.3863
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe.diagnostics.task import TaskView

__all__ = [
    "LOSS_KINDS",
    "REGRESSION_LOSSES",
    "Assessment",
    "References",
    "assess",
    "choose_view",
    "output_stats",
    "references",
    "standard_loss",
    "tolerance_above",
]

REGRESSION_LOSSES = ("auto", "mse", "l1")
LOSS_KINDS = ("cross_entropy", "bce", "mse", "l1")

#: a model whose loss at init is this many times the prior-optimal MSE (or its square root for L1) is
#: paying mostly for a wrong constant offset: the target mean is far from the zero the output starts at
OFFSET_FACTOR = {"mse": 4.0, "l1": 2.0}
#: labels are "imbalanced" when the uniform output costs this many nats more than the prior
IMBALANCE_NATS = 0.1


def choose_view(views: Sequence[TaskView], measured: float | None = None) -> TaskView:
    """The reading with a reference (chance or prior-optimal) closest in ratio to the measured loss; the
    most likely one when nothing was measured. This is how MSE is told from L1, and BCE from cross-entropy
    on one-hot rows: a model at init sits near one of its two references, whichever its bias matches."""
    if measured is None or len(views) == 1 or not math.isfinite(measured):
        return views[0]
    m = max(measured, 1e-12)

    def distance(view: TaskView) -> float:
        refs = references(view)
        return min(abs(math.log(m / max(r, 1e-12))) for r in (refs.chance, refs.prior_optimal))

    return min(views, key=distance)


# -- references -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class References:
    """The two loss levels a model at init is held to, and what reaches the lower one.

    Attributes:
        chance: loss of a uniform / zero output.
        prior_optimal: loss of the best input-independent constant output.
        prior: class frequencies (cross-entropy), per-label positive rate (BCE), or column means (MSE) /
            medians (L1) of the targets.
        suggested_bias: final-layer bias that makes the output that constant (log priors, log odds,
            target mean or median).
        imbalance: ``chance - prior_optimal`` for classification, in nats: what a wrong bias costs.
    """

    chance: float
    prior_optimal: float
    prior: list[float]
    suggested_bias: list[float]
    imbalance: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum()


def _binary_entropy(p: Tensor) -> Tensor:
    q = p.clamp(1e-12, 1 - 1e-12)
    return -(p * q.log() + (1 - p) * (1 - q).log())


def class_prior(view: TaskView) -> Tensor:
    """Frequency of every class among the targets (mean of the rows for class-probability targets)."""
    if view.targets.ndim == 1:
        counts = torch.bincount(view.targets, minlength=view.width).double()
        return counts / counts.sum()
    return view.targets.double().mean(0)


def references(view: TaskView) -> References:
    """Chance and prior-optimal loss for ``view``, with the bias that reaches the prior-optimal loss."""
    t = view.targets.double()
    if view.loss_kind == "cross_entropy":
        p = class_prior(view)
        chance, best = math.log(view.width), float(_entropy(p))
        # unseen classes get half a count, so the suggestion stays finite
        floor = 0.5 / max(view.rows, 1)
        bias = p.clamp_min(floor).log()
        return References(chance, best, p.tolist(), bias.tolist(), chance - best)
    if view.loss_kind == "bce":
        p = t.mean(0)
        chance, best = math.log(2.0), float(_binary_entropy(p).mean())
        q = p.clamp(1e-4, 1 - 1e-4)
        return References(chance, best, p.tolist(), (q / (1 - q)).log().tolist(), chance - best)
    if view.loss_kind == "mse":
        mean = t.mean(0)
        chance, best = float((t**2).mean()), float(((t - mean) ** 2).mean())
        return References(chance, best, mean.tolist(), mean.tolist(), extra={"target_std": float(t.std())})
    median = t.median(0).values
    chance, best = float(t.abs().mean()), float((t - median).abs().mean())
    return References(chance, best, median.tolist(), median.tolist(), extra={"target_std": float(t.std())})


def standard_loss(view: TaskView) -> Tensor:
    """The standard loss of the task, used when ``training_step`` cannot be called (manual optimization)."""
    if view.loss_kind == "cross_entropy":
        return F.cross_entropy(view.outputs, view.targets)
    if view.loss_kind == "bce":
        return F.binary_cross_entropy_with_logits(view.outputs, view.targets)
    if view.loss_kind == "mse":
        return F.mse_loss(view.outputs, view.targets)
    return F.l1_loss(view.outputs, view.targets)


def output_stats(view: TaskView) -> dict[str, float]:
    """Statistics of the outputs that tell a bad scale from a bad offset.

    ``logit_std`` is the spread of all logits; ``offset_std`` the spread of the per-class (per-label)
    mean logit, a constant offset such as a large bias; ``within_std`` the typical spread of one class's
    logit across examples, what the input moves. Classification adds ``mean_entropy`` (softmax, or
    Bernoulli per label) and ``max_entropy`` (``ln C`` or ``ln 2``).
    """
    o = view.outputs.double()
    col_mean = o.mean(0)
    stats = {
        "logit_mean": float(o.mean()),
        "logit_std": float(o.std()) if o.numel() > 1 else 0.0,
        "offset_std": float(col_mean.std()) if o.shape[1] > 1 else float(col_mean.abs().max()),
        "within_std": float(o.std(0).mean()) if o.shape[0] > 1 else 0.0,
        "logit_abs_max": float(o.abs().max()) if o.numel() else 0.0,
    }
    if view.loss_kind == "cross_entropy":
        logp = o.log_softmax(-1)
        stats["mean_entropy"] = float(-(logp.exp() * logp).sum(-1).mean())
        stats["max_entropy"] = math.log(view.width)
    elif view.loss_kind == "bce":
        stats["mean_entropy"] = float(_binary_entropy(torch.sigmoid(o)).mean())
        stats["max_entropy"] = math.log(2.0)
    else:
        stats = {"output_mean": stats["logit_mean"], "output_std": stats["logit_std"]}
    return stats


# -- verdict ----------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Assessment:
    """The verdict on a measured init loss.

    Attributes:
        ok: no failure.
        reason: ``"ok"``, ``"above_chance"`` (bad scale: final layer, inputs, bias), ``"target_offset"``
            (regression: targets far from zero and no bias for it), ``"below_prior"`` (better than any
            constant: label leak, or a trained model), ``"above_expected"`` / ``"below_expected"``.
        reference: the value ``measured`` was held to.
        limit: the threshold it crossed (or the nearest one when ok).
        bias_advice: the final bias is worth setting (imbalanced labels or an offset target mean) though
            the check passes.
    """

    ok: bool
    reason: str
    reference: float
    limit: float
    bias_advice: bool = False


def assess(
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
            return Assessment(False, "above_expected", expected, expected + above)
        if measured < expected - below:
            return Assessment(False, "below_expected", expected, expected - below)
        return Assessment(True, "ok", expected, expected + above)
    if refs is None:
        raise ValueError("Expected `refs` or `expected`, got neither.")
    chance, best = refs.chance, refs.prior_optimal
    limit = chance + tolerance_above(loss_kind, chance)
    if measured > limit:
        return Assessment(False, "above_chance", chance, limit)
    floor = best - tolerance_below(loss_kind, best)
    if measured < floor:
        return Assessment(False, "below_prior", best, floor)
    if loss_kind in OFFSET_FACTOR:
        factor = OFFSET_FACTOR[loss_kind]
        offset_limit = factor * best
        if measured > offset_limit and chance > offset_limit:
            return Assessment(False, "target_offset", best, offset_limit)
        advice = chance > 1.5 * best and measured > 1.5 * best
        return Assessment(True, "ok", chance, limit, bias_advice=advice)
    # classification: an imbalanced prior the bias does not express yet is advice, not a failure (the cost
    # is bounded by ln C nats and training removes it in the first steps); needs enough rows per class
    enough = loss_kind == "bce" or rows >= 10 * width
    advice = enough and refs.imbalance > IMBALANCE_NATS and measured - best > 0.5 * refs.imbalance
    return Assessment(True, "ok", chance, limit, bias_advice=advice)
