"""Reading a task from what a model returns and what it is trained on: which outputs are compared with which
targets, and how.

Every component reads tasks here: InitLossCheck (the loss at init), OverfitOneBatch (are the labels
predicted), BatchLeakageProbe (integer token ids) and PredictionDynamicsLogger (churn and jitter on a fixed
batch). :func:`task_views` says which task the shapes and dtypes of ``(outputs, targets)`` fit (multiclass,
binary, multilabel, regression; per position for sequences and segmentation; flattened language-model logits),
as 2-D rows, with ``ignore_index`` left out; the predicates beside it (:func:`is_probabilities`,
:func:`is_binary`, :func:`is_int`) are the one test of each property that every component uses.

Two questions built on these have their own modules: predicted against true labels, and the labels no model
can get right, in :mod:`lightning_recipe.diagnostics.labels`; which target each output position is trained
towards (next-token training, read from the user's own loss) in :mod:`lightning_recipe.diagnostics.alignment`.

Example::

    >>> import torch
    >>> [(v.task, v.loss_kind) for v in task_views(torch.zeros(4, 3), torch.tensor([0, 2, 1, 2]))]
    [('multiclass', 'cross_entropy')]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "TaskNotInferred",
    "TaskView",
    "is_binary",
    "is_int",
    "is_probabilities",
    "task_views",
]

TASKS = ("auto", "multiclass", "binary", "multilabel", "regression")
IGNORE_INDEX = -100


# -- predicates ---------------------------------------------------------------------------------------


def is_binary(t: Tensor) -> bool:
    """Every value is 0 or 1 (labels for BCE, one-hot rows)."""
    return t.numel() > 0 and bool(((t == 0) | (t == 1)).all())


def is_probabilities(t: Tensor, dim: int = -1, atol: float = 1e-3) -> bool:
    """Values in [0, 1] that sum to one along ``dim`` (more than one entry there): softmax outputs, soft
    class targets. The one test every component uses."""
    if t.ndim == 0 or t.numel() == 0 or t.shape[dim] < 2:
        return False
    t = t.detach().float()
    if float(t.min()) < 0 or float(t.max()) > 1:  # logits fail here, after one reduction
        return False
    return bool(torch.allclose(t.sum(dim), torch.ones((), device=t.device), atol=atol))


def is_int(t: Tensor) -> bool:
    """An integer tensor: class labels, token ids (not float, complex or bool)."""
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


# -- task views ---------------------------------------------------------------------------------------


class TaskNotInferred(ValueError):
    """The output and target shapes fit no known task; the message says what to pass."""


@dataclass(frozen=True)
class TaskView:
    """Outputs and targets of one task, flattened to one row per prediction.

    Attributes:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        loss_kind: ``"cross_entropy"``, ``"bce"``, ``"mse"`` or ``"l1"``.
        outputs: ``(M, C)`` float32: logits over C classes, K label logits, or D regression outputs.
        targets: ``(M,)`` class indices or ``(M, C)`` class probabilities (cross-entropy); ``(M, K)`` 0/1
            floats (BCE); ``(M, D)`` floats (regression). Ignored positions are already removed.
        layout: how the shapes were read, e.g. ``"(N, T, C) logits vs (N, T) labels"``.
    """

    task: str
    loss_kind: str
    outputs: Tensor
    targets: Tensor
    layout: str

    @property
    def width(self) -> int:
        """C classes, K labels or D regression outputs."""
        return int(self.outputs.shape[1])

    @property
    def rows(self) -> int:
        return int(self.outputs.shape[0])


def _class_views(o: Tensor, t: Tensor, ignore_index: int) -> list[TaskView]:
    """Integer class labels ``t`` against logits ``o`` with one more dimension (or flattened)."""
    candidates: list[tuple[Tensor, Tensor, str]] = []
    if o.ndim == t.ndim + 1 and o.shape[:-1] == t.shape:
        candidates.append((o.reshape(-1, o.shape[-1]), t.reshape(-1), "class dim last"))
    elif o.ndim == t.ndim + 1 and o.ndim >= 3 and o.shape[0] == t.shape[0] and o.shape[2:] == t.shape[1:]:
        candidates.append((o.movedim(1, -1).reshape(-1, o.shape[1]), t.reshape(-1), "class dim 1"))
    elif o.ndim == 2 and t.ndim >= 2 and o.shape[0] == t.numel():
        candidates.append((o, t.reshape(-1), "flattened"))
    views = []
    for logits, labels, how in candidates:
        keep = labels != ignore_index
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= logits.shape[1] or logits.shape[1] < 2:
            continue
        layout = f"{_shape(o)} logits vs {_shape(t)} labels ({how})"
        views.append(TaskView("multiclass", "cross_entropy", logits, labels.long(), layout))
    return views


def _same_shape_views(o: Tensor, t: Tensor) -> list[TaskView]:
    """Outputs with one value per target value: BCE labels, soft class targets, or regression.

    The columns of the rows follow the outputs, where the final layer's bias is: ``(N, D)`` and ``(N, T, D)``
    give D columns, ``(N, C, H, W)`` (a conv output) gives one column per channel C."""
    layout = f"{_shape(o)} outputs vs {_shape(t)} targets"
    tt = t.reshape(o.shape)
    if o.ndim >= 4:
        o2 = o.movedim(1, -1).reshape(-1, o.shape[1])
        t2 = tt.movedim(1, -1).reshape(o2.shape).float()
    else:
        o2 = o.reshape(-1, 1) if o.ndim <= 1 else o.reshape(-1, o.shape[-1])
        t2 = tt.reshape(o2.shape).float()
    views = []
    if t.is_floating_point() and t.ndim >= 2 and o2.shape[1] == t.shape[-1] and is_probabilities(t, atol=1e-4):
        views.append(TaskView("multiclass", "cross_entropy", o2, t2, layout + " (class probabilities)"))
    if is_binary(t):
        task = "binary" if o2.shape[1] == 1 else "multilabel"
        # one-hot rows read as cross-entropy first; 0/1 labels otherwise read as BCE first
        views.append(TaskView(task, "bce", o2, t2, layout + " (0/1 labels)"))
    views += [TaskView("regression", kind, o2, t2, layout) for kind in ("mse", "l1")]
    return views


def task_views(
    outputs: Tensor,
    targets: Tensor,
    task: str = "auto",
    regression_loss: str = "auto",
    ignore_index: int = IGNORE_INDEX,
) -> list[TaskView]:
    """Every reading of ``(outputs, targets)`` that fits their shapes and dtypes, most likely first.

    Integer targets with one fewer dimension than the outputs are class labels: ``(N, C)`` vs ``(N,)``,
    per position ``(N, T, C)`` vs ``(N, T)``, segmentation ``(N, C, H, W)`` vs ``(N, H, W)``, or flattened
    language-model logits ``(N*T, V)`` vs ``(N, T)``; labels equal to ``ignore_index`` are left out.
    Targets with as many values as the outputs are 0/1 labels for BCE (binary ``(N,)``/``(N, 1)``,
    multilabel ``(N, K)``), class probabilities (rows summing to one), or regression targets (MSE, L1).

    Raises:
        TaskNotInferred: no reading fits; the message shows the shapes and what to pass.
    """
    o = outputs.detach().float()
    t = targets.detach()
    if not t.is_floating_point() and t.dtype != torch.bool and o.ndim >= 2:
        views = _class_views(o, t, ignore_index)
    else:
        views = []
    if o.numel() == t.numel() and not views:
        views = _same_shape_views(o, t if t.dtype != torch.bool else t.float())
    if task != "auto":
        views = [v for v in views if v.task == task or (task in ("binary", "multilabel") and v.loss_kind == "bce")]
    if regression_loss != "auto":
        views = [v for v in views if v.task != "regression" or v.loss_kind == regression_loss]
    if not views:
        asked = "" if task == "auto" else f" as task={task!r}"
        raise TaskNotInferred(
            f"Expected model outputs and targets whose shapes fit a known task{asked}, but got outputs of shape "
            f"{tuple(outputs.shape)} ({outputs.dtype}) and targets of shape {tuple(targets.shape)} "
            f"({targets.dtype}). Pass `task=` (one of {list(TASKS[1:])}), `forward=`/`targets=` returning "
            "the logits and labels, or `expected=` with the loss you expect at initialisation."
        )
    return views
