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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe.diagnostics.alignment import Alignment
from lightning_recipe.diagnostics.init_loss import standard_loss
from lightning_recipe.diagnostics.task import TaskView, is_probabilities, task_views

__all__ = [
    "OutputReading",
    "Snapshot",
    "churn",
    "jitter",
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
class OutputReading:
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
    ) -> OutputReading | None:
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
    reading: OutputReading | None = None,
) -> Snapshot:
    """Read ``outputs`` against ``targets`` (shapes as :func:`task_views` understands them) into a
    :class:`Snapshot`. A :class:`OutputReading` resolved for these targets and this shape of outputs skips the task
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
