"""Why an optimizer's updates are out of the healthy band, as data: a :class:`Cause` with the numbers behind it.

:func:`judge` reads one measured optimizer step (:class:`Measurement`) and what the optimizer's earlier steps left
behind (:class:`History`: windows of median ratios, zero-update streaks) and returns a :class:`Verdict`: the
:class:`Finding` of each cause that holds, and the history to keep for the next step. The callback turns cause and
numbers into words from one table (``callbacks/_update_ratio_text.py``). The thresholds that decide live here or
in :class:`Limits`, once. No Lightning, no tensors: a few dozen floats per step.

Example::

    >>> limits = Limits(window=2, max_ratio=0.1, min_ratio=1e-5)
    >>> def step(i, ratio):
    ...     return Measurement(step=i, names=("w",), update_norms=(ratio,), weight_norms=(1.0,), ratios=(ratio,),
    ...                        gradient_norms=(1.0,), has_grad=(True,), param_lrs=(1e-7,), lrs=(1e-7,),
    ...                        median=ratio)
    >>> history = History(start_lrs=(1e-7,))
    >>> first = judge(step(0, 1e-8), history, limits)
    >>> first.findings
    ()
    >>> [f.cause for f in judge(step(1, 1e-8), first.history, limits).findings]
    [<Cause.LR_TOO_LOW: 'lr_too_low'>]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from torch import Tensor

from lightning_recipe.diagnostics.update_ratio import (
    TARGET_RATIO,
    cancelled_biases,
    loss_diverged,
    loss_rise,
    never_moved,
    sustained,
)

__all__ = [
    "EXPLODE_RATIO",
    "LR_DECAYED",
    "Cause",
    "Finding",
    "History",
    "Limits",
    "Measurement",
    "Verdict",
    "judge",
    "not_in_optimizer",
]

EXPLODE_RATIO = 1.0
"""In the first steps, a median update larger than the weights themselves (ratio above 1) on most of them is an
explosion; anything below is judged on the sustained window only."""

LR_DECAYED = 10.0
"""A learning rate this many times below its start in every param group has decayed away: a too-low ratio is then
blamed on the schedule (one that steps every batch instead of every epoch), not on the starting learning rate."""


class Cause(str, Enum):
    """What one optimizer's measured steps showed; :attr:`kind` is the alert it raises."""

    NOT_IN_OPTIMIZER = "not_in_optimizer"  # a trainable parameter in no optimizer's param groups
    NON_FINITE = "non_finite"  # NaN/Inf in the weights or the update
    ZERO_LR = "zero_lr"  # parameters that never move, in param groups whose learning rate is 0
    NO_GRADIENT = "no_gradient"  # parameters that never move: no gradient reaches them
    ADAPTIVE_START = "adaptive_start"  # too high on the first steps of an adaptive optimizer (Adam, RMSprop)
    OVERSHOOTING_START = "overshooting_start"  # too high on the first steps: exploding, or the loss rose
    LR_TOO_HIGH = "lr_too_high"  # too high on a sustained window of regular measurements
    COLLAPSED = "collapsed"  # too low after a too-high alert: the weights grew until units died
    LR_DECAYED = "lr_decayed"  # too low, with the learning rate decayed LR_DECAYED times below its start
    LR_TOO_LOW = "lr_too_low"  # too low: the learning rate itself

    @property
    def kind(self) -> str:
        """The alert kind this cause raises (one kind can have several causes)."""
        return _KINDS.get(self, self.value)


_KINDS = {
    Cause.ZERO_LR: "not_moving",
    Cause.NO_GRADIENT: "not_moving",
    Cause.ADAPTIVE_START: "ratio_too_high",
    Cause.OVERSHOOTING_START: "ratio_too_high",
    Cause.LR_TOO_HIGH: "ratio_too_high",
    Cause.COLLAPSED: "ratio_too_low",
    Cause.LR_DECAYED: "ratio_too_low",
    Cause.LR_TOO_LOW: "ratio_too_low",
}


@dataclass(frozen=True)
class Limits:
    """The thresholds a verdict uses: the monitor's arguments (see ``UpdateRatioMonitor``)."""

    window: int
    max_ratio: float
    min_ratio: float
    explode_ratio: float = EXPLODE_RATIO


@dataclass(frozen=True)
class Measurement:
    """One measured optimizer step: per-parameter numbers in the optimizer's parameter order, and the setting the
    step ran under.

    Attributes:
        step: the global step the evidence was measured at.
        names, update_norms, weight_norms, ratios, gradient_norms, has_grad: per parameter.
        param_lrs: per parameter, its param group's learning rate.
        lrs: per param group, the learning rate in effect.
        median: the median ratio the learning-rate verdict uses (``None``: nothing qualified).
        early: one of the optimizer's first ``window`` steps (judged apart: large first steps are normal).
        regular: a measurement of the schedule, which counts towards the sustained window.
        adaptive: the optimizer divides its steps by a second-moment estimate (Adam, RMSprop, Adagrad).
        early_losses: the training loss of the run's first steps.
    """

    step: int
    names: Sequence[str]
    update_norms: Sequence[float]
    weight_norms: Sequence[float]
    ratios: Sequence[float]
    gradient_norms: Sequence[float]
    has_grad: Sequence[bool]
    param_lrs: Sequence[float]
    lrs: Sequence[float]
    median: float | None
    early: bool = False
    regular: bool = True
    adaptive: bool = False
    early_losses: Sequence[float] = ()


@dataclass(frozen=True)
class History:
    """What the verdicts of one optimizer remember between its measured steps (kept across a checkpoint resume).

    Attributes:
        start_lrs: per param group, the learning rate the user asked for.
        steps: the optimizer's own step count so far.
        medians: the last ``window`` regular medians: the sustained verdicts.
        early_medians: the medians of the first ``window`` steps: only an explosion or overshooting counts there.
        zero_streak: parameter name -> measured zero updates in a row.
        too_high_at: the step of the first too-high verdict (a later too-low one is then a collapse).
    """

    start_lrs: Sequence[float] = ()
    steps: int = 0
    medians: Sequence[float] = ()
    early_medians: Sequence[float] = ()
    zero_streak: Mapping[str, int] = field(default_factory=dict)
    too_high_at: int | None = None


@dataclass(frozen=True)
class Finding:
    """One cause and the numbers behind it; which fields are filled depends on :attr:`cause`'s kind.

    Attributes:
        cause: what was seen.
        step: the step the evidence was measured at (``None``: at the start of training).
        parameters: the tensors concerned (non-finite, never moving, in no optimizer).
        lrs: the learning rates in effect per param group; for a parameter that never moves, those of the stuck
            tensors' groups, sorted.
        start_lrs: the learning rates at the start, per param group.
        median: the median ratio (too high / too low).
        ranked: too high: ``(name, ratio)`` of every finite ratio, largest first.
        history: the regular window of medians when the verdict was taken.
        loss_rise: the highest early training loss over the first one.
        decayed: how many times the learning rate fell below its start (the smallest over param groups).
        too_high_at: the step of the earlier too-high verdict.
        steps: the optimizer's own step count.
        trainable: how many trainable parameter tensors the model has.
    """

    cause: Cause
    step: int | None = None
    parameters: tuple[str, ...] = ()
    lrs: tuple[float, ...] = ()
    start_lrs: tuple[float, ...] = ()
    median: float = math.nan
    ranked: tuple[tuple[str, float], ...] = ()
    history: tuple[float, ...] = ()
    loss_rise: float = math.nan
    decayed: float = math.nan
    too_high_at: int | None = None
    steps: int = 0
    trainable: int = 0

    @property
    def kind(self) -> str:
        """The alert kind."""
        return self.cause.kind

    @property
    def factor(self) -> float:
        """How far the median is from :data:`TARGET_RATIO`, as a factor above 1 (``inf`` for a zero median)."""
        if self.kind == "ratio_too_high":
            return self.median / TARGET_RATIO
        return TARGET_RATIO / self.median if self.median > 0 else math.inf

    @property
    def details(self) -> dict[str, Any]:
        """The numbers an alert records, by kind."""
        if self.kind == "non_finite":
            return {"parameters": list(self.parameters), "step": self.step}
        if self.kind == "not_moving":
            return {"parameters": list(self.parameters), "lr": list(self.lrs)}
        if self.kind == "not_in_optimizer":
            return {"parameters": list(self.parameters), "trainable": self.trainable}
        numbers = {"median_ratio": self.median, "history": list(self.history), "lr": list(self.lrs)}
        if self.kind == "ratio_too_high":
            return {**numbers, "factor": self.factor}
        return {**numbers, "start_lr": list(self.start_lrs)}


@dataclass(frozen=True)
class Verdict:
    """What one measured step showed: the findings in the order they are raised, the history to keep, and the
    biases that do not move because a normalisation cancels them (bias name -> its layer's weight: a note)."""

    history: History
    findings: tuple[Finding, ...] = ()
    cancelled: Mapping[str, str] = field(default_factory=dict)


def judge(m: Measurement, history: History, limits: Limits) -> Verdict:
    """The verdict on one measured step, given the optimizer's history: non-finite values end it (the ratios of a
    diverged step say nothing more); then parameters that never move; then the learning rate, on the first steps
    and on the sustained window of regular measurements."""
    norms = zip(m.names, m.update_norms, m.weight_norms, strict=True)
    bad = tuple(n for n, u, w in norms if not (math.isfinite(u) and math.isfinite(w)))
    if bad:
        diverged = Finding(
            Cause.NON_FINITE, m.step, parameters=bad, lrs=tuple(m.lrs), start_lrs=tuple(history.start_lrs)
        )
        return Verdict(history, (diverged,))
    streaks, stuck, cancelled = _zero_streaks(m, history.zero_streak, limits.window)
    history = replace(history, zero_streak=streaks)
    findings = [stuck] if stuck is not None else []
    if m.median is not None:
        if m.early:
            history = _judge_start(m, m.median, history, limits, findings)
        if m.regular:
            history = _judge_window(m, m.median, history, limits, findings)
    return Verdict(history, tuple(findings), cancelled)


def _zero_streaks(
    m: Measurement, streaks: Mapping[str, int], window: int
) -> tuple[dict[str, int], Finding | None, dict[str, str]]:
    """The zero-update streaks after this step, the parameters that never moved for a whole window (a
    :class:`Finding`, ``None`` if none), and the never-moving biases a normalisation cancels (not a problem)."""
    streaks = dict(streaks)
    can_cancel = cancelled_biases(m.names, m.update_norms, m.gradient_norms, m.has_grad)
    stuck: list[str] = []
    lrs: set[float] = set()
    cancelled: dict[str, str] = {}
    for lr, name, norm in zip(m.param_lrs, m.names, m.update_norms, strict=True):
        streak = streaks.get(name, 0) + 1 if norm == 0.0 else 0
        streaks[name] = streak
        if never_moved(streak, window):
            if name in can_cancel:
                cancelled[name] = can_cancel[name]
                continue
            stuck.append(name)
            lrs.add(lr)
    if not stuck:
        return streaks, None, cancelled
    cause = Cause.ZERO_LR if lrs == {0.0} else Cause.NO_GRADIENT
    return streaks, Finding(cause, m.step, parameters=tuple(stuck), lrs=tuple(sorted(lrs))), cancelled


def _judge_start(m: Measurement, median: float, history: History, limits: Limits, found: list[Finding]) -> History:
    """The first ``window`` steps. A tiny model's first steps rewrite a large part of its weights by design (SGD
    at 0.1 on a 5-parameter regression: ratio ~0.1 for a few steps, then it converges): only an update larger than
    the weights on most of them is an explosion this early, or a median above ``max_ratio`` from an adaptive
    optimizer (its first steps are ~lr per entry whatever the gradient: Adam's first step is lr * sign(g), so the
    ratio is the learning rate over the weights' scale) or while the training loss diverges. Far too low is no
    normal start either, unless a warm-up is still ramping the learning rate up."""
    history = replace(history, early_medians=(*history.early_medians, median))
    window = history.early_medians
    exploding = sustained(window, limits.explode_ratio, above=True, window=limits.window)
    overshooting = sustained(window, limits.max_ratio, above=True, window=limits.window) and (
        m.adaptive or loss_diverged(m.early_losses)
    )
    if exploding or overshooting:
        history = _too_high(m, median, history, Cause.ADAPTIVE_START if m.adaptive else Cause.OVERSHOOTING_START, found)
    ramping = any(lr < start for lr, start in zip(m.lrs, history.start_lrs, strict=False))
    if not ramping and sustained(window, limits.min_ratio, above=False, window=limits.window):
        found.append(_too_low(m, median, history))
    return history


def _judge_window(m: Measurement, median: float, history: History, limits: Limits, found: list[Finding]) -> History:
    """A regular measurement: the median joins the window, and more than half of it out of band decides."""
    history = replace(history, medians=(*history.medians, median)[-limits.window :])
    if sustained(history.medians, limits.max_ratio, above=True, window=limits.window):
        history = _too_high(m, median, history, Cause.LR_TOO_HIGH, found)
    elif sustained(history.medians, limits.min_ratio, above=False, window=limits.window):
        found.append(_too_low(m, median, history))
    return history


def _too_high(m: Measurement, median: float, history: History, cause: Cause, found: list[Finding]) -> History:
    """Record a too-high finding; the history remembers the step of the first one."""
    finite = sorted((i for i, r in enumerate(m.ratios) if math.isfinite(r)), key=lambda i: -m.ratios[i])
    found.append(
        Finding(
            cause,
            m.step,
            lrs=tuple(m.lrs),
            start_lrs=tuple(history.start_lrs),
            median=median,
            ranked=tuple((m.names[i], m.ratios[i]) for i in finite),
            history=tuple(history.medians),
            loss_rise=loss_rise(m.early_losses) if cause is Cause.OVERSHOOTING_START else math.nan,
        )
    )
    return history if history.too_high_at is not None else replace(history, too_high_at=m.step)


def _too_low(m: Measurement, median: float, history: History) -> Finding:
    """A too-low finding, blamed on a collapse after a too-high verdict, on a learning rate decayed
    :data:`LR_DECAYED` times below its start, or on the learning rate itself."""
    decayed = [s / lr if lr > 0 else math.inf for s, lr in zip(history.start_lrs, m.lrs, strict=False) if s > 0]
    if history.too_high_at is not None:
        cause = Cause.COLLAPSED
    elif decayed and min(decayed) >= LR_DECAYED:
        cause = Cause.LR_DECAYED
    else:
        cause = Cause.LR_TOO_LOW
    return Finding(
        cause,
        m.step,
        lrs=tuple(m.lrs),
        start_lrs=tuple(history.start_lrs),
        median=median,
        history=tuple(history.medians),
        decayed=min(decayed) if decayed else math.nan,
        too_high_at=history.too_high_at,
        steps=history.steps,
    )


def not_in_optimizer(named: Iterable[tuple[str, Tensor]], optimized: Iterable[Tensor]) -> Finding | None:
    """Trainable parameters (``requires_grad=True``) of ``named`` that are not among ``optimized`` (every
    optimizer's param groups): they will never be updated. ``None`` when every one is in an optimizer."""
    in_optimizer = {id(p) for p in optimized}
    trainable = [(n, p) for n, p in named if p.requires_grad]
    missing = tuple(n for n, p in trainable if id(p) not in in_optimizer)
    if not missing:
        return None
    return Finding(Cause.NOT_IN_OPTIMIZER, parameters=missing, trainable=len(trainable))
