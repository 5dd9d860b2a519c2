"""How a model's predictions on a fixed batch move between evaluations, and what the movement says about
the learning rate.

Recipe item "visualize prediction dynamics": on a fixed held-out batch, predictions of a healthy run move
a lot early on and then settle while the loss falls. Predictions that keep jumping without the loss
improving say the learning rate is too high (*thrashing*); predictions that do not move at all say it is
too low, or that nothing trains (*frozen*).

Quantities, between two evaluations of the same batch:

- **churn**: fraction of predicted labels (rows: examples, or positions of a sequence) that changed.
- **jitter**: mean ``|Δ p(true class)|`` for classification (per label for BCE); for regression the mean
  ``|Δ prediction|`` divided by the standard deviation of the targets.
- **movement**: RMS change of the raw outputs divided by their RMS spread (logits centred per row for
  softmax), the scale-free "did anything move" number the frozen verdict uses; probabilities saturate on
  a converged model, logits keep moving.

No Lightning here. Example::

    >>> import torch
    >>> a = snapshot(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]), step=0)
    >>> b = snapshot(torch.tensor([[0.0, 2.0], [0.0, 2.0]]), torch.tensor([0, 1]), step=10)
    >>> churn(a, b)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe.diagnostics.alignment import Alignment
from lightning_recipe.diagnostics.init_loss import standard_loss
from lightning_recipe.diagnostics.task import TaskView, is_probabilities, task_views

__all__ = [
    "DynamicsVerdict",
    "Evaluation",
    "Reading",
    "Snapshot",
    "churn",
    "flips_beyond_chance",
    "jitter",
    "judge",
    "movement",
    "snapshot",
]

_EPS = 1e-8


@dataclass(frozen=True)
class Snapshot:
    """The model's predictions on the fixed batch at one optimizer step.

    Attributes:
        step: the optimizer step.
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        outputs: ``(M, C)`` float32 raw outputs, one row per prediction (as :func:`task_views` reads them).
        targets: ``(M,)`` labels or ``(M, C)`` targets.
        scores: ``(M, C')`` what is plotted: p(true class) ``(M, 1)``, p(true label) per BCE label, or the
            regression prediction.
        labels: ``(M, C')`` predicted labels (argmax, or thresholded at 0.5 for BCE); ``None`` for regression.
        loss: the standard loss of the task on the batch (cross-entropy, BCE or MSE).
        accuracy: the fraction of predicted labels that are right (torchmetrics' micro accuracy, computed
            directly: 10 us instead of 50), ``None`` for regression.
        finite: whether every output is finite.
        examples: N, the number of examples; rows per example is ``M // N``.
        target_scale: std of the regression targets (1 for classification), what jitter is divided by.
    """

    step: int
    task: str
    outputs: Tensor
    targets: Tensor
    scores: Tensor
    labels: Tensor | None
    loss: float
    accuracy: float | None
    finite: bool
    examples: int
    target_scale: float = 1.0

    def per_example(self) -> Tensor:
        """``(N,)`` one score per example: the mean over its rows and columns (positions, labels)."""
        n = max(self.examples, 1)
        scores = self.scores.reshape(-1)
        if scores.numel() == n:  # one score per example already: nothing to average
            return scores
        if scores.numel() % n:
            return scores[:n]
        return scores.reshape(n, -1).mean(1)

    def per_example_targets(self) -> Tensor:
        """``(N,)`` the regression target per example (mean over its rows and columns)."""
        n = max(self.examples, 1)
        t = self.targets.float().reshape(-1)
        return t[:n] if t.numel() % n else t.reshape(n, -1).mean(1)


_MAX_INDEXED = 2**24  # positions up to here are exact in float32, what task_views reads outputs as


@dataclass(frozen=True)
class Reading:
    """How the outputs of one fixed batch are read against its targets, resolved once.

    Which reading :func:`task_views` picks, and where each of its rows comes from, depends only on the targets
    and on the shape of the outputs, never on their values: for a fixed batch it is the same at every
    evaluation. :meth:`resolve` runs ``task_views`` once on the outputs' *positions* and keeps the result as an
    index, so each evaluation reads its view with one gather (a fresh inference costs ~10 small tensor ops).

    Attributes:
        shape: the shape of the outputs it applies to.
        task, loss_kind: as in :class:`~lightning_recipe.diagnostics.init_loss.TaskView`.
        index: ``(M, C)`` positions in ``outputs.reshape(-1)`` of the view's outputs.
        targets: ``(M,)`` or ``(M, C)``, the view's targets, on the host.
        layout: how the shapes were read, as in ``TaskView``.
    """

    shape: tuple[int, ...]
    task: str
    loss_kind: str
    index: Tensor
    targets: Tensor
    layout: str

    @classmethod
    def resolve(
        cls, outputs: Tensor, targets: Tensor, task: str = "auto", alignment: Alignment | None = None
    ) -> Reading | None:
        """The reading of outputs shaped like ``outputs``, positions paired with targets as ``alignment`` says
        the loss pairs them (a next-token shift inside the model); ``None`` for outputs with more than 2**24
        values (positions are not exact in float32 there: :func:`snapshot` then infers the view at each call).
        Raises :class:`~lightning_recipe.diagnostics.task.TaskNotInferred` when no task fits."""
        if outputs.numel() > _MAX_INDEXED:
            return None
        positions = torch.arange(outputs.numel(), dtype=torch.float32).reshape(outputs.shape)
        targets = targets.detach().cpu()
        if alignment is not None:
            positions, targets, _ = alignment.apply(positions, targets)
        view = task_views(positions, targets, task=task)[0]
        return cls(tuple(outputs.shape), view.task, view.loss_kind, view.outputs.long(), view.targets, view.layout)

    def read(self, outputs: Tensor) -> TaskView:
        """The view of ``outputs`` (which must have :attr:`shape`) that ``task_views`` would pick, on the host."""
        values = outputs.detach().float().cpu().reshape(-1)[self.index]
        return TaskView(self.task, self.loss_kind, values, self.targets, self.layout)


def snapshot(
    outputs: Tensor,
    targets: Tensor,
    step: int,
    task: str = "auto",
    examples: int | None = None,
    reading: Reading | None = None,
) -> Snapshot:
    """Read ``outputs`` against ``targets`` (shapes as :func:`task_views` understands them) into a
    :class:`Snapshot`. A :class:`Reading` resolved for these targets and this shape of outputs skips the task
    inference (same result, a fraction of the cost: what an evaluation of a fixed batch repeats). Raises
    :class:`~lightning_recipe.diagnostics.init_loss.TaskNotInferred` when the shapes fit no task."""
    outputs = outputs.detach().float()
    # a finite sum means every output is finite (NaN and inf propagate): one reduction in the common case
    finite = math.isfinite(float(outputs.sum())) or bool(torch.isfinite(outputs).all())
    safe = outputs if finite else torch.nan_to_num(outputs, nan=0.0, posinf=1e4, neginf=-1e4)
    if reading is not None and reading.shape == tuple(outputs.shape):
        view = reading.read(safe)
    else:
        view = task_views(safe, targets.detach(), task=task)[0]
    o, t = view.outputs.cpu(), view.targets.cpu()
    n = int(examples if examples is not None else targets.shape[0] if targets.ndim else 1)
    labels: Tensor | None
    scale = 1.0
    if view.loss_kind == "cross_entropy":
        probabilities = is_probabilities(o)
        p = o if probabilities else o.softmax(-1)
        hard = t if t.ndim == 1 else t.argmax(-1)
        scores = p.gather(1, hard[:, None])
        labels = p.argmax(-1, keepdim=True)
        loss = float(F.nll_loss(p.clamp_min(1e-12).log(), hard) if probabilities else standard_loss(view))
        accuracy = _accuracy(labels[:, 0], hard)
    elif view.loss_kind == "bce":
        p = torch.sigmoid(o)
        scores = torch.where(t > 0.5, p, 1 - p)
        labels = (p > 0.5).long()
        loss = float(standard_loss(view))
        accuracy = _accuracy(labels, t.long())
    else:
        scores, labels, accuracy = o, None, None
        loss = float(F.mse_loss(o, t))
        scale = float(t.std()) if t.numel() > 1 else 1.0
        scale = scale if math.isfinite(scale) and scale > _EPS else 1.0
    if not finite:
        loss = math.inf
    return Snapshot(step, view.task, o, t, scores, labels, loss, accuracy, finite, n, scale)


def _accuracy(predicted: Tensor, truth: Tensor) -> float:
    """Micro accuracy: the share of labels predicted right, over every example and label. Equal to
    ``torchmetrics.functional.accuracy`` with ``average="micro"`` for the three classification tasks (tested)."""
    return int((predicted == truth).sum()) / truth.numel() if truth.numel() else math.nan


def churn(previous: Snapshot, current: Snapshot) -> float | None:
    """Fraction of predicted labels that changed between the two snapshots; ``None`` for regression."""
    if previous.labels is None or current.labels is None or previous.labels.shape != current.labels.shape:
        return None
    return float((previous.labels != current.labels).float().mean())


def jitter(previous: Snapshot, current: Snapshot) -> float:
    """Mean ``|Δ score|``: p(true class) for classification, prediction / target std for regression."""
    if previous.scores.shape != current.scores.shape:
        return math.nan
    delta = (current.scores - previous.scores).abs().mean()
    return float(delta) / current.target_scale


def movement(previous: Snapshot, current: Snapshot) -> float:
    """RMS change of the raw outputs over their RMS spread: 0 when nothing moved, scale-free."""
    if previous.outputs.shape != current.outputs.shape:
        return math.nan
    a, b = previous.outputs.double(), current.outputs.double()
    if current.task == "multiclass":  # softmax ignores a per-row shift
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    spread = (b - b.mean(0)).pow(2).mean().sqrt() if current.task == "regression" else b.pow(2).mean().sqrt()
    if current.task == "regression":
        spread = torch.maximum(spread, torch.tensor(current.target_scale, dtype=torch.float64))
    return float((b - a).pow(2).mean().sqrt() / (spread + _EPS))


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


@dataclass(frozen=True)
class DynamicsVerdict:
    """What a window of evaluations says: ``kind`` is ``"thrashing"``, ``"frozen"`` or ``None``; ``evidence``
    holds the numbers (JSON-serialisable)."""

    kind: str | None
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
    """Decide on the last ``window`` evaluations of ``history``.

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

    Frozen: ``window_movement`` (:func:`movement` between the outputs ``window`` evaluations ago and now) is
    below ``frozen_movement`` and the loss never improved by ``improvement`` over the whole run (a model
    that learnt and then settled, e.g. at the end of a cosine schedule, is not frozen).

    ``window_movement`` may be a function that computes it: it is then called only when the frozen verdict
    needs it (the loss never improved), so a run that learns never pays for it. ``first_loss`` and
    ``best_loss`` (the first and the lowest loss of the whole run) default to scanning ``history``; a caller
    that keeps them can pass just the last ``2 * window + 1`` evaluations, and the cost stays flat over a long run.
    """
    if len(history) < window + 1:
        return DynamicsVerdict(None)
    recent = history[-window:]
    start = history[-window - 1 :][:2]
    end = recent[-2:]
    loss_start = _mean([e.loss for e in start])
    loss_end = _mean([e.loss for e in end])
    first_loss = history[0].loss if first_loss is None else first_loss
    best_loss = min(e.loss for e in history) if best_loss is None else best_loss
    jitters = [e.jitter for e in recent if math.isfinite(e.jitter)]
    churns = [e.churn for e in recent if e.churn is not None and math.isfinite(e.churn)]
    mean_jitter = _mean(jitters) if jitters else math.nan
    counted = [e for e in recent if e.churn is not None and e.labels and math.isfinite(e.churn)]
    flips = sum(_flips(e) for e in counted)
    trials = sum(e.labels for e in counted)  # type: ignore[misc]
    significant = not counted or flips_beyond_chance(flips, trials, flip_rate, alpha)
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
    sustained = 2 * wobbling >= window if counted else 2 * wobbling > window
    never_improved = not (best_loss < (1 - improvement) * first_loss)
    moved = window_movement() if callable(window_movement) and never_improved else window_movement
    evidence: dict[str, Any] = {
        "window_steps": [history[-window - 1].step, history[-1].step],
        "mean_jitter": mean_jitter,
        "mean_churn": _mean(churns) if churns else None,
        "loss_window_start": loss_start,
        "loss_window_end": loss_end,
        "first_loss": first_loss,
        "best_loss": best_loss,
        "window_movement": None if callable(moved) else moved,
        "wobbling_evaluations": wobbling,
        "flips": flips if counted else None,
        "flip_trials": trials if counted else None,
        "thrash_jitter": thrash_jitter,
        "frozen_movement": frozen_movement,
    }
    losses = [e.loss for e in history[-window - 1 :]]
    level = _mean(losses)
    jump = _mean([abs(b - a) for a, b in zip(losses[:-1], losses[1:], strict=True)]) / level if level > 0 else 0.0
    evidence["loss_jump"] = jump
    record = history[-1].loss <= best_loss  # the best loss of the run just now: it is learning
    # the trend across windows: a jumpy run that cuts its typical loss 4x from one window to the next is learning
    # (SGD near its stability edge on a polynomial regression: 980 -> 170 -> 20, with jumps of 14x between; a
    # learning rate too high on the MLP goes from ~1.1 to ~0.5 between its first windows, then stays)
    before = [e.loss for e in history[-2 * window - 1 : -window - 1]]
    trending = len(before) >= 2 and _median(losses) < TRENDING * _median(before)
    evidence["loss_median_before_window"] = _median(before) if len(before) >= 2 else None
    stalled = not (loss_end < (1 - improvement) * loss_start) and jump >= loss_jump and not record and not trending
    if history[-1].step >= warmup_steps and sustained and significant and stalled:
        return DynamicsVerdict("thrashing", evidence)
    if isinstance(moved, float) and moved < frozen_movement and never_improved:
        return DynamicsVerdict("frozen", evidence)
    return DynamicsVerdict(None, evidence)


def _flips(e: Evaluation) -> int:
    return round((e.churn or 0.0) * (e.labels or 0))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float(ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2) if n else math.nan


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
