"""What a window of evaluations of the fixed batch says about the learning rate: thrashing, frozen, or nothing.

The numbers of each evaluation (loss, accuracy, churn, jitter) come from
:mod:`lightning_recipe.diagnostics.prediction_dynamics`; this module decides on a window of them, as a typed cause
(:data:`DynamicsCause`) with its evidence. The callback words it.

The rules of :func:`judge`, on the last ``window`` evaluations:

Thrashing is a wobble that persists and is larger than noise at this many examples, all three of:

- *sustained*: past ``warmup_steps``, at least half of the window's evaluations (more than half for
  regression, which has no labels to count flips of) wobble: p(true class) moved
  by ``thrash_jitter`` or more on average, or at least ``thrash_churn`` of the labels flipped at once, more
  than chance allows at that one evaluation (a language model at its entropy floor flips 5-10% of its
  near-tie positions at every evaluation with p(true class) still: that is not thrashing; a learning rate
  too high flips a large share in unison, again and again; one bad step, e.g. an Adam spike on a converged
  model, moves one evaluation and its way back the next);
- *significant* (classification): the predicted labels that flipped over the window are more than a
  settled model flips by chance (:func:`flips_beyond_chance`: a binomial null with ``flip_rate`` per label
  per evaluation, level ``alpha``), so 3 flips among 12 examples are not read as thrashing;
- *stalled and jumping* (needs up to ``2 * window + 1`` evaluations for the trend; fewer are fine):
  the loss did not improve by ``improvement`` (relative) from the start of the window
  to its end (each end the mean of two evaluations, so one lucky evaluation does not decide), and it jumps:
  its mean change between evaluations is at least ``loss_jump`` of its mean over the window. Early training
  moves predictions a lot too, but there the loss falls; a model at its noise floor (a language model at
  the entropy of its data: p(true class) moves ~0.05 per evaluation under AdamW's minibatch noise) keeps a
  steady loss (changes of 1-2%), a learning rate too high makes it jump (9-65% on the MLP at Adam 0.3). An
  evaluation that sets the run's best loss is never stalled (a transformer that learns in spikes: 0.28,
  1.19, then 0.007), nor one whose median loss over the window is below ``TRENDING`` (1/4) of the median of
  the evaluations before it (a jumpy run still on its way down).

Frozen: ``window_movement`` (:func:`~lightning_recipe.diagnostics.prediction_dynamics.movement` between the
outputs ``window`` evaluations ago and now) is below ``frozen_movement`` and the loss never improved by
``improvement`` over the whole run (a model that learnt and then settled, e.g. at the end of a cosine schedule,
is not frozen).

>>> history = [Evaluation(step=10 * i, loss=1.0, accuracy=None, churn=None, jitter=0.0) for i in range(5)]
>>> judge(history, 1e-6, window=4, warmup_steps=0, thrash_jitter=0.05, frozen_movement=5e-3).kind
'frozen'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "SETTLED_FLIP_RATE",
    "TRENDING",
    "DynamicsCause",
    "DynamicsVerdict",
    "Evaluation",
    "flips_beyond_chance",
    "judge",
]


@dataclass(frozen=True)
class Evaluation:
    """The numbers of one evaluation, compared with the one before it (``nan`` at the first). ``labels``: how
    many predicted labels ``churn`` is a fraction of (rows x label columns), ``None`` when unknown."""

    step: int
    loss: float
    accuracy: float | None
    churn: float | None
    jitter: float
    labels: int | None = None


TRENDING = 0.25
"""A window whose median loss is below this fraction of the median of the evaluations before it is learning,
however jumpy."""

SETTLED_FLIP_RATE = 0.05
"""The chance a settled, healthy model flips one predicted label between two evaluations: borderline held-out
examples move across the boundary now and then. The null model of :func:`flips_beyond_chance`."""


def flips_beyond_chance(flips: int, trials: int, rate: float = SETTLED_FLIP_RATE, alpha: float = 0.01) -> bool:
    """Whether ``flips`` label changes out of ``trials`` (labels x evaluations) are more than a settled model
    makes: ``P[Binomial(trials, rate) >= flips] < alpha``. With 12 examples and 4 evaluations (48 trials) that
    takes 7 flips or more (one evaluation alone: 4 of 12); one bad step that flips 3 of 12 examples and back is
    noise at that size, a third of the labels
    flipping at every evaluation is not. Exact upper tail in log space (any ``trials``)."""
    if trials <= 0 or flips <= 0:
        return False
    if flips > trials:
        return True
    log_p, log_q = math.log(rate), math.log1p(-rate)

    def log_pmf(k: int) -> float:
        return (
            math.lgamma(trials + 1)
            - math.lgamma(k + 1)
            - math.lgamma(trials - k + 1)
            + k * log_p
            + (trials - k) * log_q
        )

    tail = sum(math.exp(log_pmf(k)) for k in range(flips, trials + 1))
    return tail < alpha


#: what a window of evaluations can be found to be: predictions that keep jumping while the loss stalls (learning
#: rate too high), or that do not move while the loss never improved (far too low, or nothing trains)
DynamicsCause = Literal["thrashing", "frozen"]


@dataclass(frozen=True)
class DynamicsVerdict:
    """What a window of evaluations says: ``kind`` is a :data:`DynamicsCause` or ``None``; ``evidence`` holds
    the numbers (JSON-serialisable)."""

    kind: DynamicsCause | None
    evidence: dict[str, Any] = field(default_factory=dict)


def judge(
    history: Sequence[Evaluation],
    window_movement: float | None | Callable[[], float | None],
    *,
    window: int,
    warmup_steps: int,
    thrash_jitter: float,
    frozen_movement: float,
    improvement: float = 0.1,
    first_loss: float | None = None,
    best_loss: float | None = None,
    flip_rate: float = SETTLED_FLIP_RATE,
    alpha: float = 0.01,
    thrash_churn: float = 0.25,
    loss_jump: float = 0.05,
) -> DynamicsVerdict:
    """Decide on the last ``window`` evaluations of ``history``: the rules are in the module's docstring.

    ``window_movement`` may be a function that computes it: it is then called only when the frozen verdict
    needs it (the loss never improved), so a run that learns never pays for it. ``first_loss`` and
    ``best_loss`` (the first and the lowest loss of the whole run) default to scanning ``history``; a caller
    that keeps them can pass just the last ``2 * window + 1`` evaluations, and the cost stays flat over a long run.
    """
    if len(history) < window + 1:
        return DynamicsVerdict(None)
    first_loss = history[0].loss if first_loss is None else first_loss
    best_loss = min(e.loss for e in history) if best_loss is None else best_loss
    wobble = _wobble(history[-window:], window, thrash_jitter, thrash_churn, flip_rate, alpha)
    trend = _loss_trend(history, window, best_loss, improvement, loss_jump)
    never_improved = not (best_loss < (1 - improvement) * first_loss)
    moved = window_movement() if callable(window_movement) and never_improved else window_movement
    evidence: dict[str, Any] = {
        "window_steps": [history[-window - 1].step, history[-1].step],
        **wobble.evidence,
        "first_loss": first_loss,
        "best_loss": best_loss,
        "window_movement": None if callable(moved) else moved,
        "thrash_jitter": thrash_jitter,
        "frozen_movement": frozen_movement,
        **trend.evidence,
    }
    if history[-1].step >= warmup_steps and wobble.sustained and wobble.significant and trend.stalled:
        return DynamicsVerdict("thrashing", evidence)
    if isinstance(moved, float) and moved < frozen_movement and never_improved:
        return DynamicsVerdict("frozen", evidence)
    return DynamicsVerdict(None, evidence)


@dataclass(frozen=True)
class _Wobble:
    """How the window's predictions moved: ``sustained`` (enough evaluations wobble), ``significant`` (more
    label flips than chance), and the numbers."""

    sustained: bool
    significant: bool
    evidence: dict[str, Any]


def _wobble(
    recent: Sequence[Evaluation],
    window: int,
    thrash_jitter: float,
    thrash_churn: float,
    flip_rate: float,
    alpha: float,
) -> _Wobble:
    jitters = [e.jitter for e in recent if math.isfinite(e.jitter)]
    churns = [e.churn for e in recent if e.churn is not None and math.isfinite(e.churn)]
    counted = [e for e in recent if e.churn is not None and e.labels and math.isfinite(e.churn)]
    flips = sum(_flips(e) for e in counted)
    trials = sum(e.labels or 0 for e in counted)
    wobbling = sum(
        (math.isfinite(e.jitter) and e.jitter >= thrash_jitter)
        or (
            e in counted
            and (e.churn or 0.0) >= thrash_churn
            and flips_beyond_chance(_flips(e), e.labels or 0, flip_rate, alpha)
        )
        for e in recent
    )
    # with labels, the flip count tells a spike (there and back: two evaluations) from a persistent wobble; without
    # (regression) only the count of wobbling evaluations can, so it must be a strict majority there
    return _Wobble(
        sustained=2 * wobbling >= window if counted else 2 * wobbling > window,
        significant=not counted or flips_beyond_chance(flips, trials, flip_rate, alpha),
        evidence={
            "mean_jitter": _mean(jitters) if jitters else math.nan,
            "mean_churn": _mean(churns) if churns else None,
            "wobbling_evaluations": wobbling,
            "flips": flips if counted else None,
            "flip_trials": trials if counted else None,
        },
    )


@dataclass(frozen=True)
class _LossTrend:
    """Whether the loss is ``stalled`` and jumping over the window (not improving, not setting the run's best,
    not trending down across windows), and the numbers."""

    stalled: bool
    evidence: dict[str, Any]


def _loss_trend(
    history: Sequence[Evaluation], window: int, best_loss: float, improvement: float, loss_jump: float
) -> _LossTrend:
    # each end of the window the mean of two evaluations, so one lucky evaluation does not decide
    loss_start = _mean([e.loss for e in history[-window - 1 :][:2]])
    loss_end = _mean([e.loss for e in history[-window:][-2:]])
    losses = [e.loss for e in history[-window - 1 :]]
    level = _mean(losses)
    jump = _mean([abs(b - a) for a, b in zip(losses[:-1], losses[1:], strict=True)]) / level if level > 0 else 0.0
    record = history[-1].loss <= best_loss  # the best loss of the run just now: it is learning
    # the trend across windows: a jumpy run that cuts its typical loss 4x from one window to the next is learning
    # (SGD near its stability edge on a polynomial regression: 980 -> 170 -> 20, with jumps of 14x between; a
    # learning rate too high on the MLP goes from ~1.1 to ~0.5 between its first windows, then stays)
    before = [e.loss for e in history[-2 * window - 1 : -window - 1]]
    trending = len(before) >= 2 and _median(losses) < TRENDING * _median(before)
    stalled = not (loss_end < (1 - improvement) * loss_start) and jump >= loss_jump and not record and not trending
    return _LossTrend(
        stalled,
        {
            "loss_window_start": loss_start,
            "loss_window_end": loss_end,
            "loss_jump": jump,
            "loss_median_before_window": _median(before) if len(before) >= 2 else None,
        },
    )


def _flips(e: Evaluation) -> int:
    return round((e.churn or 0.0) * (e.labels or 0))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float(ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2) if n else math.nan


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
