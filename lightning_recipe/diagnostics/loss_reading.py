"""Which standard loss, reduced how, the loss ``training_step`` returns is: the readings of a measured loss.

A check may judge a loss only by a reference in the same units, so before InitLossCheck compares the loss at
init with chance, and before OverfitOneBatch asks how low a loss can go, each must know what the loss *is*. A
reading is one answer: a standard loss of the outputs (cross-entropy, BCE on logits, BCE on probabilities, MSE,
L1) under one reduction (mean, sum, or summed per example and averaged over the batch). :func:`loss_readings`
lists the candidates with the value each would take; :func:`consistent_readings` keeps those that land close to
the measured loss. A sum over 128 x 784 pixels is then held to 128 x 784 times the per-element references, and
a loss no reading explains (an ELBO, a contrastive or GAN loss) is not misread as one. No Lightning here.

Example::

    >>> import torch
    >>> from lightning_recipe.diagnostics.task import task_views
    >>> forms = [loss_views(torch.zeros(8, 4), torch.arange(8) % 4)]
    >>> [r.name for r in consistent_readings(loss_readings(forms, [8]), 1.3863)]
    ['cross-entropy (mean)']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_recipe.diagnostics.init_loss import binary_entropy, standard_loss
from lightning_recipe.diagnostics.task import IGNORE_INDEX, TaskView, is_binary, task_views

__all__ = [
    "CONSISTENT_RATIO",
    "REDUCTIONS",
    "SECOND_PASS_RATIO",
    "Reading",
    "consistent_readings",
    "element_count",
    "loss_floor",
    "loss_readings",
    "loss_views",
]

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
        per_element = float(binary_entropy(t).mean())
    else:
        per_element = 0.0
    return per_element * reading.scale
