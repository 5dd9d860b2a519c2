"""The loss a model should have at initialisation, and what the loss it has says about its init.

Recipe item "verify loss @ init" and "init well": at initialisation a model knows nothing, so its loss
should sit near *chance* (the loss of a uniform / zero output) and no lower than *prior-optimal* (the
loss of the best input-independent constant: the label prior, the target mean). Given a
:class:`~lightning_recipe.diagnostics.task.TaskView` (2-D outputs, one row per prediction, read in
:mod:`lightning_recipe.diagnostics.task`), this module computes both references, the final-layer bias
that reaches the prior-optimal loss, the statistics of the outputs, and the verdict (:func:`assess`). No Lightning here.

A reading is used to judge the loss only when it explains it (:func:`loss_readings`, :func:`consistent_readings`):
the standard loss of each candidate reading of the outputs (cross-entropy, BCE on logits, BCE on probabilities,
MSE, L1), reduced by mean, by sum, or summed per example and averaged over the batch, must land close to what
``training_step`` returned. A sum over 128 x 784 pixels is then held to 128 x 784 times the per-element
references, and a loss no reading explains (an ELBO with a large KL term, a contrastive or GAN loss, a loss
against something other than the targets) is not judged at all: the caller skips and asks for ``expected=``.

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

from lightning_recipe.diagnostics.task import IGNORE_INDEX, TaskView, is_binary, task_views

__all__ = [
    "CONSISTENT_RATIO",
    "LOSS_KINDS",
    "OFFSET_STDS",
    "REDUCTIONS",
    "REGRESSION_LOSSES",
    "SECOND_PASS_RATIO",
    "Assessment",
    "Reading",
    "References",
    "assess",
    "choose_view",
    "consistent_readings",
    "loss_floor",
    "element_count",
    "loss_readings",
    "loss_views",
    "output_stats",
    "references",
    "standard_loss",
    "offset_stds",
    "tolerance_above",
]

REGRESSION_LOSSES = ("auto", "mse", "l1")
LOSS_KINDS = ("cross_entropy", "bce", "mse", "l1")

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
#: how a loss may reduce its elements: their mean, their sum, or the sum per example averaged over the batch
REDUCTIONS = ("mean", "sum", "per_example")
#: a reading explains the measured loss when the two agree within this factor, computed on the very outputs the
#: loss was computed from. The user's loss may add a small term to the standard one (a KL term at init, label
#: smoothing, class weights, a regulariser): a few percent. The readings it must be told from differ far more:
#: sum vs mean by the element count, MSE vs L1 by the error scale. Tight, because 5 forms x 3 reductions span
#: a wide range and a loss nothing explains (an ELBO) should not land in one of their bands by chance.
CONSISTENT_RATIO = 1.1
#: the same, when the outputs come from a second forward pass (``training_step`` does not call the module
#: itself): another dropout mask or VAE sample moves a batch's loss by up to ~10-15% on small models
SECOND_PASS_RATIO = 1.25
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


# -- readings: which standard loss, reduced how, the measured loss is ----------------------------------


def loss_views(
    outputs: Tensor,
    targets: Tensor,
    task: str = "auto",
    regression_loss: str = "auto",
    ignore_index: int = IGNORE_INDEX,
) -> list[tuple[str, TaskView]]:
    """The task views of ``(outputs, targets)`` as ``(form, view)`` pairs, with the BCE readings a loss on
    same-shape targets in [0, 1] may also be: BCE on logits against soft targets (pixel intensities), and,
    when the outputs are in [0, 1] too (a sigmoid decoder), BCE on probabilities (``F.binary_cross_entropy``),
    as the form ``"bce_probabilities"`` whose view holds the outputs turned into logits, so every reference
    and bias below is in the units of the layer before the sigmoid.

    Raises:
        TaskNotInferred: as :func:`~lightning_recipe.diagnostics.task.task_views`.
    """
    views = task_views(outputs, targets, task, regression_loss, ignore_index)
    forms = [(v.loss_kind, v) for v in views]
    if task != "auto" or not targets.is_floating_point() or outputs.numel() != targets.numel():
        return forms
    rows = next((v for v in views if v.task == "regression"), None)
    if rows is None or rows.targets.numel() == 0:
        return forms
    t = rows.targets
    if float(t.min()) < 0 or float(t.max()) > 1:
        return forms
    name = "binary" if rows.width == 1 else "multilabel"
    soft = " (0/1 labels)" if is_binary(t) else " (targets in [0, 1])"
    bce = next((v for v in views if v.loss_kind == "bce"), None)
    if bce is None:
        bce = TaskView(name, "bce", rows.outputs, t, rows.layout + soft)
        forms.append(("bce", bce))
    o = rows.outputs
    if float(o.min()) >= 0 and float(o.max()) <= 1:
        p = o.double().clamp(1e-7, 1 - 1e-7)
        logits = (p.log() - (-p).log1p()).float()
        layout = rows.layout + soft.replace(")", ", probabilities)")
        forms.append(("bce_probabilities", TaskView(bce.task, "bce", logits, t, layout)))
    return forms


def element_count(view: TaskView) -> int:
    """How many terms a loss over ``view`` adds up: one per row for cross-entropy, one per value otherwise."""
    return view.rows if view.loss_kind == "cross_entropy" else view.rows * view.width


_FORM_NAMES = {
    "cross_entropy": "cross-entropy",
    "bce": "BCE on logits",
    "bce_probabilities": "BCE on probabilities",
    "mse": "MSE",
    "l1": "L1",
}
_REDUCTION_NAMES = {"mean": "mean", "sum": "summed", "per_example": "summed per example, batch mean"}


@dataclass(frozen=True)
class Reading:
    """One explanation of the measured loss: a standard loss of the outputs, reduced one way.

    Attributes:
        form: ``"cross_entropy"``, ``"bce"``, ``"bce_probabilities"``, ``"mse"`` or ``"l1"``.
        reduction: one of :data:`REDUCTIONS`.
        view: the task view, rows of every batch concatenated.
        value: the standard loss in this form and reduction, averaged over the batches: what ``training_step``
            would return if this reading is right.
        scale: ``value`` over the per-element loss: 1 for a mean, the element count for a sum (averaged over
            the batches). The references are per element; the measured loss divided by ``scale`` is too.
        against: ``"targets"``, or ``"inputs"`` when the loss compares the outputs with the model's own
            inputs (an autoencoder, or targets that are not what the loss uses).
    """

    form: str
    reduction: str
    view: TaskView
    value: float
    scale: float
    against: str = "targets"

    @property
    def name(self) -> str:
        """e.g. ``"BCE on probabilities (summed)"``."""
        return f"{_FORM_NAMES[self.form]} ({self.reduction_name})"

    @property
    def reduction_name(self) -> str:
        return _REDUCTION_NAMES[self.reduction]

    def distance(self, measured: float) -> float:
        """``|ln(measured / value)|``: 0 when the reading explains the loss exactly."""
        if not (math.isfinite(self.value) and self.value > 0 and measured > 0):
            return 0.0 if self.value == measured else math.inf
        return abs(math.log(measured / self.value))


def loss_readings(
    per_batch: Sequence[Sequence[tuple[str, TaskView]]], examples: Sequence[int], against: str = "targets"
) -> list[Reading]:
    """Every form found in all batches (with the same width), under every reduction that differs from the
    others, with the value the standard loss takes there. ``examples[b]`` is the number of examples in
    batch ``b`` (the divisor of a per-example sum)."""
    if not per_batch:
        return []
    readings = []
    for form, first in per_batch[0]:
        parts = [next((v for f, v in views if f == form), None) for views in per_batch]
        if any(p is None or p.width != first.width for p in parts):
            continue
        views = [p for p in parts if p is not None]
        with torch.no_grad():
            means = [float(standard_loss(v)) for v in views]
        counts = [element_count(v) for v in views]
        merged = TaskView(
            first.task,
            first.loss_kind,
            torch.cat([v.outputs for v in views]),
            torch.cat([v.targets for v in views]),
            first.layout,
        )
        scales = {
            "mean": [1.0] * len(views),
            "sum": [float(c) for c in counts],
            "per_example": [c / max(n, 1) for c, n in zip(counts, examples, strict=True)],
        }
        seen: list[list[float]] = []
        for reduction in REDUCTIONS:
            factors = scales[reduction]
            if any(all(math.isclose(a, b) for a, b in zip(factors, other, strict=True)) for other in seen):
                continue  # the same numbers as a reduction already listed (one element per example, ...)
            seen.append(factors)
            value = sum(m * f for m, f in zip(means, factors, strict=True)) / len(views)
            readings.append(Reading(form, reduction, merged, value, sum(factors) / len(factors), against))
    return readings


def consistent_readings(readings: Sequence[Reading], measured: float, ratio: float = CONSISTENT_RATIO) -> list[Reading]:
    """The readings whose value agrees with ``measured`` within ``ratio``, the closest first (ties keep the
    order of ``readings``, most likely first)."""
    close = [r for r in readings if r.distance(measured) <= math.log(ratio)]
    return sorted(close, key=lambda r: r.distance(measured))


def loss_floor(reading: Reading) -> float:
    """The lowest value the loss of ``reading`` can take, a perfect prediction of every target, in the units
    of the measured loss (its reduction included): 0 for hard labels and regression, the entropy of the
    targets for soft ones (class probabilities, BCE against pixel intensities), which no model goes below."""
    view = reading.view
    t = view.targets.double()
    if view.loss_kind == "cross_entropy" and t.ndim == 2:
        per_element = float(-(t * t.clamp_min(1e-30).log()).sum(-1).mean())
    elif view.loss_kind == "bce":
        per_element = float(_binary_entropy(t).mean())
    else:
        per_element = 0.0
    return per_element * reading.scale


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
    extra = {"target_std": float(t.std()) if t.numel() > 1 else 0.0, "offset_stds": offset_stds(view)}
    if view.loss_kind == "mse":
        mean = t.mean(0)
        chance, best = float((t**2).mean()), float(((t - mean) ** 2).mean())
        return References(chance, best, mean.tolist(), mean.tolist(), extra=extra)
    median = t.median(0).values
    chance, best = float(t.abs().mean()), float((t - median).abs().mean())
    return References(chance, best, median.tolist(), median.tolist(), extra=extra)


def offset_stds(view: TaskView) -> float:
    """How far the outputs' mean starts from the targets' mean, in target standard deviations: the root mean
    square over columns of ``mean(output) - mean(target)``, over the root of the mean per-column target
    variance. Its square is the share of the MSE the offset alone costs, relative to the target variance."""
    o, t = view.outputs.double(), view.targets.double()
    if t.shape[0] < 2:
        return 0.0
    offset = float(((o.mean(0) - t.mean(0)) ** 2).mean())
    variance = float(t.var(0, unbiased=False).mean())
    if variance <= 1e-24:
        return 0.0 if offset <= 1e-24 else math.inf
    return math.sqrt(offset / variance)


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
    offset = float(refs.extra.get("offset_stds", 0.0))
    if loss_kind in ("mse", "l1") and offset >= OFFSET_STDS:
        # the outputs' mean is the specific cause, whether or not the loss is also above chance
        return Assessment(False, "target_offset", best, OFFSET_STDS)
    if measured > limit:
        return Assessment(False, "above_chance", chance, limit)
    floor = best - tolerance_below(loss_kind, best)
    if measured < floor:
        return Assessment(False, "below_prior", best, floor)
    if loss_kind in ("mse", "l1"):
        # an offset is judged by its size against the targets' spread, not by which reference the loss is near
        return Assessment(True, "ok", chance, limit, bias_advice=offset >= OFFSET_ADVICE_STDS)
    # classification: an imbalanced prior the bias does not express yet is advice, not a failure (the cost
    # is bounded by ln C nats and training removes it in the first steps); needs enough rows per class
    enough = loss_kind == "bce" or rows >= 10 * width
    advice = enough and refs.imbalance > IMBALANCE_NATS and measured - best > 0.5 * refs.imbalance
    return Assessment(True, "ok", chance, limit, bias_advice=advice)
