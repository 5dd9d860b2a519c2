"""Why overfitting one batch failed, as data: a :class:`Cause` with the numbers behind it.

:func:`diagnose` reads an :class:`~lightning_recipe.diagnostics.overfit.OverfitEvidence` (plus a few
:class:`OutputFacts` about the final outputs and targets) and names one cause; the callback turns cause and
numbers into words from one table. The thresholds that decide between causes live here, once.

Example::

    >>> from lightning_recipe.diagnostics.overfit import Attempt, OverfitEvidence
    >>> stuck = Attempt(lr=3e-3, curve=(2.0, 1.9), steps=1, reached=False, stop="plateau", nonfinite_step=None,
    ...                 correct=4, total=4, final_grad_norm=0.0)
    >>> evidence = OverfitEvidence(attempts=(stuck,), loss_fraction=0.1, no_grad_params=(), frozen_params=(),
    ...                            trainable_params=("weight",))
    >>> diagnose(evidence).cause
    <Cause.CLAMPED_LOSS: 'clamped'>
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from torch import Tensor

from lightning_recipe.diagnostics.labels import looks_like_probabilities
from lightning_recipe.diagnostics.overfit import Attempt, OverfitEvidence
from lightning_recipe.diagnostics.task import is_binary

__all__ = ["FLAT_GRADIENT", "REACH_ATOL", "REACH_RTOL", "Cause", "Diagnosis", "OutputFacts", "diagnose"]

#: a final gradient norm at or below this is exactly zero: the loss or the outputs are clamped there
FLAT_GRADIENT = 1e-12
#: outputs fall short of the targets' range by more than this fraction of the target value (plus REACH_ATOL)
REACH_RTOL = 1e-3
REACH_ATOL = 1e-6


class Cause(str, Enum):
    """What a run of :func:`~lightning_recipe.diagnostics.overfit.overfit_batch` showed, in the order
    :func:`diagnose` tests them."""

    ALL_FROZEN = "all_frozen"  # no trainable parameter: nothing was tried
    NONFINITE_START = "nonfinite_start"  # the loss is NaN/Inf before any update
    NONPOSITIVE_START = "nonpositive_start"  # the loss starts <= 0: a fraction of it means nothing (a skip)
    NO_GRAPH = "no_graph"  # the loss does not depend on any trainable parameter
    NO_GRADIENT = "no_gradient"  # some trainable parameters never received a gradient
    FITTED = "fitted"  # the batch was fitted: a pass
    NONFINITE = "nonfinite"  # the loss turned NaN/Inf (or raised) at every learning rate
    LABELS_NOT_FITTED = "labels_not_fitted"  # the loss fell to its target, the labels are not predicted
    DOUBLE_SOFTMAX = "double_softmax"  # class outputs are already probabilities
    DOUBLE_SIGMOID = "double_sigmoid"  # outputs in [0, 1] against 0/1 targets
    CLAMPED_LOSS = "clamped"  # every label predicted, the loss stuck above its target with a zero gradient
    LOSS_FLOOR = "floor"  # every label predicted, the loss stuck above its target
    FROZEN = "frozen"  # not fitted, and part of the model is frozen
    SATURATED = "saturated"  # not fitted, with a zero gradient: clamped or saturated outputs or loss
    PLATEAU = "plateau"  # not fitted: the loss plateaus above a floor


@dataclass(frozen=True)
class OutputFacts:
    """What the verdict needs to know about the final outputs and targets (aligned as the loss pairs them)."""

    probabilities: bool = False  # class outputs against integer labels that are already a softmax
    binary_probabilities: bool = False  # outputs in [0, 1] against float 0/1 targets
    output_range: tuple[float, float] | None = None  # (min, max), for regression outputs of the targets' size
    target_range: tuple[float, float] | None = None

    @classmethod
    def read(cls, outputs: Tensor | None, targets: Tensor | None) -> OutputFacts:
        """The facts of ``outputs`` against ``targets``; none when either is missing."""
        if outputs is None or targets is None:
            return cls()
        binary = (
            targets.is_floating_point()
            and is_binary(targets)
            and outputs.numel() == targets.numel()
            and bool(outputs.min() >= 0)
            and bool(outputs.max() <= 1)
        )
        ranged = targets.is_floating_point() and outputs.numel() == targets.numel() and targets.numel() > 0
        return cls(
            probabilities=looks_like_probabilities(outputs, targets),
            binary_probabilities=binary,
            output_range=(float(outputs.min()), float(outputs.max())) if ranged else None,
            target_range=(float(targets.min()), float(targets.max())) if ranged else None,
        )

    @property
    def out_of_reach(self) -> bool:
        """The outputs stay inside a narrower range than the targets span: a clamp or a squashing output."""
        if self.output_range is None or self.target_range is None:
            return False
        (lo, hi), (tlo, thi) = self.output_range, self.target_range
        return hi < thi - REACH_RTOL * abs(thi) - REACH_ATOL or lo > tlo + REACH_RTOL * abs(tlo) + REACH_ATOL


@dataclass(frozen=True)
class Diagnosis:
    """One cause and the numbers behind it.

    Attributes:
        cause: what the run showed.
        start_loss: the loss on the batch before any update (NaN when nothing was tried).
        attempt: the attempt the verdict reads: the first for :attr:`Cause.NO_GRADIENT`, else the one that
            fitted or came closest; ``None`` before any attempt.
        flat_gradient: that attempt's last gradient norm is at most :data:`FLAT_GRADIENT`.
        out_of_reach: the final outputs cannot reach the targets' range (see :class:`OutputFacts`).
    """

    cause: Cause
    start_loss: float
    attempt: Attempt | None = None
    flat_gradient: bool = False
    out_of_reach: bool = False


def diagnose(evidence: OverfitEvidence, facts: OutputFacts | None = None) -> Diagnosis:
    """The cause of ``evidence``'s verdict: the first that holds, in :class:`Cause`'s order."""
    ev, start = evidence, evidence.start_loss
    if not ev.attempts:
        return Diagnosis(Cause.ALL_FROZEN, start)
    early = _before_fitting(ev, start)
    if early is not None:
        return Diagnosis(early, start, ev.attempts[0])
    best = ev.decisive
    assert best is not None  # there are attempts
    if ev.passed:
        return Diagnosis(Cause.FITTED, start, best)
    facts = facts or OutputFacts()
    flat = best.final_grad_norm is not None and best.final_grad_norm <= FLAT_GRADIENT
    if all(a.stop == "nonfinite" for a in ev.attempts):
        cause = Cause.NONFINITE
    elif best.loss_fraction_met(ev.loss_fraction) and best.all_match is False:
        cause = Cause.LABELS_NOT_FITTED
    elif facts.probabilities:
        cause = Cause.DOUBLE_SOFTMAX
    elif facts.binary_probabilities:
        cause = Cause.DOUBLE_SIGMOID
    elif best.all_match:
        cause = Cause.CLAMPED_LOSS if flat else Cause.LOSS_FLOOR
    elif ev.frozen_params:
        cause = Cause.FROZEN
    else:
        cause = Cause.SATURATED if flat else Cause.PLATEAU
    return Diagnosis(cause, start, best, flat_gradient=flat, out_of_reach=facts.out_of_reach)


def _before_fitting(ev: OverfitEvidence, start: float) -> Cause | None:
    """A cause that shows before any fitting is judged: a start the criterion cannot use, or a broken graph."""
    if not math.isfinite(start):
        return Cause.NONFINITE_START
    if start <= 0:
        return Cause.NONPOSITIVE_START
    if not ev.loss_has_graph:
        return Cause.NO_GRAPH
    if ev.no_grad_params:
        return Cause.NO_GRADIENT
    return None
