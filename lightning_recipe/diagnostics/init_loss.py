"""The loss a model should have at initialisation: chance, prior-optimal, and the bias that reaches it.

Recipe item "verify loss @ init" and "init well": at initialisation a model knows nothing, so its loss
should sit near *chance* (the loss of a uniform / zero output) and no lower than *prior-optimal* (the
loss of the best input-independent constant: the label prior, the target mean). Given a
:class:`~lightning_recipe.diagnostics.task.TaskView` (2-D outputs, one row per prediction, read in
:mod:`lightning_recipe.diagnostics.task`), this module computes both references, the final-layer bias
that reaches the prior-optimal loss, and the statistics of the outputs. Which standard loss the measured loss
is lives in :mod:`~lightning_recipe.diagnostics.loss_reading`; the verdict and its causes in
:mod:`~lightning_recipe.diagnostics.init_loss_cause`. No Lightning here.

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
    >>> view = task_views(torch.zeros(8, 4), torch.arange(8) % 4)[0]
    >>> round(references(view).chance, 4)  # ln 4
    1.3863
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe.diagnostics.task import TaskView

__all__ = [
    "LOSS_KINDS",
    "REGRESSION_LOSSES",
    "References",
    "binary_entropy",
    "class_prior",
    "offset_stds",
    "output_stats",
    "references",
    "standard_loss",
]

REGRESSION_LOSSES = ("auto", "mse", "l1")
LOSS_KINDS = ("cross_entropy", "bce", "mse", "l1")


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


def binary_entropy(p: Tensor) -> Tensor:
    """The entropy of a Bernoulli(p), elementwise, in nats: the BCE of a perfect prediction of soft targets."""
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
        chance, best = math.log(2.0), float(binary_entropy(p).mean())
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
        stats["mean_entropy"] = float(binary_entropy(torch.sigmoid(o)).mean())
        stats["max_entropy"] = math.log(2.0)
    else:
        stats = {"output_mean": stats["logit_mean"], "output_std": stats["logit_std"]}
    return stats
