"""Reading a task from what a model returns and what it is trained on: the one place that knows which outputs
are compared with which targets, and how.

Every component reads tasks here: InitLossCheck (the loss at init), OverfitOneBatch (are the labels
predicted), BatchLeakageProbe (is this next-token training, so causality applies) and PredictionDynamicsLogger
(churn and jitter on a fixed batch). Three questions, three parts:

* **Task views** (:func:`task_views`): which task the shapes and dtypes of ``(outputs, targets)`` fit
  (multiclass, binary, multilabel, regression; per position for sequences and segmentation; flattened
  language-model logits), as 2-D rows, with ``ignore_index`` left out.
* **Labels** (:func:`decode_predictions`): predicted against true labels, and which labels no model can get
  right (:func:`conflicting_labels`).
* **Alignment** (:class:`Alignment`, :func:`read_alignment`): which target each output position is trained
  towards. Next-token training shifts either in the batch (``y`` = ``x`` shifted by one) or inside the model's
  own loss (Hugging Face and litgpt: ``labels = input_ids``, the loss compares ``logits[:, :-1]`` with
  ``labels[:, 1:]``). The gradient of the user's own loss with respect to the logits says which class each
  position is pushed towards (cross-entropy's gradient is ``softmax - onehot``: its one negative entry is the
  target), so the shift is read from the loss itself, not guessed from names. Labels shifted twice (by the
  user and again by the model) show up as position ``t`` trained towards input token ``t + 2``.

Example::

    >>> import torch
    >>> logits = torch.zeros(2, 4, 5, requires_grad=True)
    >>> tokens = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    >>> loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), tokens[:, 1:].reshape(-1))
    >>> (grad,) = torch.autograd.grad(loss, logits)
    >>> alignment = read_alignment(grad, targets=tokens, inputs=tokens)
    >>> alignment.target_shift, alignment.input_shift, alignment.next_token
    (1, 1, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.batch import is_sparse, tensors_of

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Alignment",
    "Decoded",
    "TaskNotInferred",
    "TaskView",
    "conflicting_labels",
    "decode_predictions",
    "gradient_at_outputs",
    "is_binary",
    "is_int",
    "is_probabilities",
    "looks_like_next_step",
    "looks_like_probabilities",
    "may_shift",
    "class_dim",
    "merge_views",
    "read_alignment",
    "task_views",
    "trained_classes",
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


def _is_one_hot(targets: Tensor) -> bool:
    return bool((targets.sum(-1) == 1).all())


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


def merge_views(per_batch: Sequence[Sequence[TaskView]]) -> list[TaskView]:
    """The readings found in every batch, with their rows concatenated across batches."""
    if not per_batch:
        return []
    merged = []
    for first in per_batch[0]:
        key = (first.task, first.loss_kind)
        parts = [next((v for v in views if (v.task, v.loss_kind) == key), None) for views in per_batch]
        if any(p is None or p.width != first.width for p in parts):
            continue
        outputs = torch.cat([p.outputs for p in parts if p is not None])
        targets = torch.cat([p.targets for p in parts if p is not None])
        merged.append(TaskView(first.task, first.loss_kind, outputs, targets, first.layout))
    return merged


# -- labels -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """Predicted and true labels of a classification batch, flattened to one entry per label."""

    task: str  # "multiclass" | "binary"
    predicted: Tensor
    labels: Tensor
    #: labels no model can predict: another example has the same input (context) and a different label
    ambiguous: Tensor | None = None

    @property
    def correct(self) -> int:
        """Labels predicted, counting the ambiguous ones as predicted."""
        right = self.predicted == self.labels
        if self.ambiguous is not None:
            right = right | self.ambiguous
        return int(right.sum())

    @property
    def num_ambiguous(self) -> int:
        return 0 if self.ambiguous is None else int(self.ambiguous.sum())

    @property
    def total(self) -> int:
        return int(self.labels.numel())


def decode_predictions(
    outputs: Tensor, targets: Tensor, inputs: Tensor | None = None, time_dim: int = 1
) -> Decoded | None:
    """Predicted vs true labels when ``targets`` are class labels, else ``None`` (regression, unknown).

    Integer targets: outputs ``(N, C)`` / ``(N, T, C)`` (class last), ``(N, C, H, W)`` (class on dim 1),
    or flattened ``(N*T, V)``; entries below 0 (``ignore_index``) are left out. Same-shape outputs with
    0/1 targets: binary or multilabel, thresholded at 0 for logits or 0.5 for probabilities. Float one-hot
    targets: argmax against argmax. With ``inputs`` (time on ``time_dim``), labels that
    :func:`conflicting_labels` finds undecidable are marked ``ambiguous``.
    """
    decoded = _decode(outputs.detach().float(), targets)
    if decoded is None or inputs is None:
        return None if decoded is None else decoded.labels_only
    conflicts = conflicting_labels(inputs, targets.argmax(-1) if decoded.one_hot else targets, time_dim)
    if conflicts is None:
        return decoded.labels_only
    ambiguous = conflicts.flatten()
    if decoded.keep is not None:
        ambiguous = ambiguous[decoded.keep]
    return replace(decoded.labels_only, ambiguous=ambiguous)


@dataclass(frozen=True)
class _Decoding:
    labels_only: Decoded
    keep: Tensor | None = None  # which flattened labels were kept (ignore_index dropped)
    one_hot: bool = False


def _decode(outputs: Tensor, targets: Tensor) -> _Decoding | None:
    if outputs.ndim == 0:
        return None
    if targets.is_floating_point():
        if not is_binary(targets):
            return None
        if outputs.shape == targets.shape and targets.ndim >= 2 and _is_one_hot(targets):
            decoded = Decoded("multiclass", outputs.argmax(-1).flatten(), targets.argmax(-1).flatten())
            return _Decoding(decoded, one_hot=True)
        return _binary(outputs, targets)
    if targets.dtype == torch.bool:
        return _binary(outputs, targets)
    targets = targets.long()
    dim = class_dim(outputs, targets)
    if dim is not None:
        predicted = outputs.argmax(dim).flatten()
        labels = targets.flatten()
    elif outputs.ndim == 2 and outputs.shape[0] == targets.numel() and outputs.shape[1] > 1:
        predicted, labels = outputs.argmax(-1), targets.flatten()
    elif outputs.numel() == targets.numel() and targets.numel() > 0 and is_binary(targets):
        return _binary(outputs, targets)
    else:
        return None
    keep = labels >= 0
    return _Decoding(Decoded("multiclass", predicted[keep], labels[keep]), keep=keep)


def conflicting_labels(inputs: Tensor, labels: Tensor, time_dim: int = 1) -> Tensor | None:
    """Where no model can be right: ``True`` at each label of ``labels`` (shape ``(N, ...)``) for which
    another example has the same input and a different label.

    Per-position labels ``(N, T)`` of a sequence input ``(N, T, ...)`` compare the prefix up to ``t`` (a
    causal model sees nothing else; the shared first token of language-model batches is the usual case);
    anything else compares whole examples (duplicated inputs with different labels: label noise). ``None``
    when ``inputs`` do not line up with ``labels`` on the batch dimension. Time-major inputs (``time_dim=0``,
    ``(T, N, ...)``) with labels ``(T, N)`` or flattened ``(T*N,)`` are read per position as well.
    """
    if time_dim == 0 and inputs.ndim >= 2 and labels.numel() == inputs.shape[0] * inputs.shape[1]:
        steps, batch = inputs.shape[0], inputs.shape[1]
        per = conflicting_labels(inputs.transpose(0, 1), labels.reshape(steps, batch).T)
        return None if per is None else per.T.reshape(labels.shape)
    n = labels.shape[0] if labels.ndim else 0
    if n < 2 or inputs.ndim == 0 or inputs.shape[0] != n:
        return None
    x = inputs.detach()
    x = (x.to_dense() if is_sparse(x) else x).reshape(n, *inputs.shape[1:])  # sparse rows too
    per_position = labels.ndim == 2 and x.ndim >= 2 and x.shape[1] == labels.shape[1]
    if per_position:
        flat = x.reshape(n, x.shape[1], -1)
        same_prefix = torch.ones(n, n, dtype=torch.bool, device=labels.device)
        conflicts = torch.zeros_like(labels, dtype=torch.bool)
        for t in range(labels.shape[1]):
            step = flat[:, t]
            same_prefix = same_prefix & (step[:, None, :] == step[None, :, :]).all(-1)
            differs = labels[:, None, t] != labels[None, :, t]
            conflicts[:, t] = (same_prefix & differs).any(1)
        return conflicts
    flat = x.reshape(n, -1)
    same = (flat[:, None, :] == flat[None, :, :]).all(-1)  # (N, N)
    differs = labels[:, None] != labels[None, :]  # (N, N, ...)
    same = same.reshape(n, n, *([1] * (labels.ndim - 1)))
    return (same & differs).any(1)


def looks_like_probabilities(outputs: Tensor, targets: Tensor) -> bool:
    """Whether class outputs read against integer ``targets`` are already probabilities (a softmax before a
    loss that applies it again): :func:`is_probabilities` over the class dim."""
    if targets.is_floating_point() or outputs.ndim == 0:
        return False
    dim = class_dim(outputs, targets.long())
    if dim is None:
        if outputs.ndim == 2 and outputs.shape[0] == targets.numel():
            dim = -1
        else:
            return False
    return is_probabilities(outputs, dim)


def class_dim(outputs: Tensor, targets: Tensor) -> int | None:
    """The class dimension of ``outputs`` against integer ``targets`` with one dimension fewer: last, or 1
    (segmentation ``(N, C, H, W)``); ``None`` when neither fits."""
    if outputs.ndim != targets.ndim + 1 or outputs.numel() == 0:
        return None
    for dim in (-1, 1):
        reduced = list(outputs.shape)
        del reduced[dim]
        if tuple(reduced) == tuple(targets.shape) and outputs.shape[dim] > 1:
            return dim
    return None


def _binary(outputs: Tensor, targets: Tensor) -> _Decoding | None:
    if outputs.numel() != targets.numel():
        return None
    outputs = outputs.reshape(targets.shape)
    # sigmoid outputs are thresholded at 0.5, logits at 0
    probabilities = bool(outputs.min() >= 0) and bool(outputs.max() <= 1)
    threshold = 0.5 if probabilities else 0.0
    return _Decoding(Decoded("binary", (outputs > threshold).long().flatten(), targets.long().flatten()))


# -- alignment: which target each output position is trained towards ---------------------------------


@dataclass(frozen=True)
class Alignment:
    """Which target each output position is trained towards, as read from the user's own loss.

    Output position ``t`` (along ``time_dim`` of the targets) is trained towards the target at
    ``t + target_shift``; the last ``target_shift`` positions are trained towards nothing.

    Attributes:
        target_shift: 0 when outputs and targets line up position by position (a shift, if any, is in the
            batch); 1 when the model's own loss shifts (``labels = input_ids``, as Hugging Face and litgpt do).
        time_dim: the targets' dimension the shift runs along (1 batch-first, 0 time-major).
        input_shift: the class position ``t`` is trained towards is the input token at ``t + input_shift``:
            1 is next-token training, 2 labels shifted twice; ``None`` when the targets are not input tokens.
        matched: positions with a gradient that were read.
        input_time_dim: the inputs' dimension ``input_shift`` runs along (``None`` with ``input_shift``).
    """

    target_shift: int = 0
    time_dim: int = 1
    input_shift: int | None = None
    matched: int = 0
    input_time_dim: int | None = None

    @property
    def next_token(self) -> bool:
        """Position ``t`` is trained to predict a later input token: causality applies."""
        return self.input_shift is not None and self.input_shift >= 1

    @property
    def shifted_twice(self) -> bool:
        """Position ``t`` is trained towards input token ``t + 2`` or later: labels shifted by the user and
        shifted again by the model's loss."""
        return self.input_shift is not None and self.input_shift >= 2

    def describe(self) -> str:
        """In words, e.g. "position t is trained towards input token t + 1 (the shift is inside the model)"."""
        where = "inside the model" if self.target_shift else "in the batch"
        if self.input_shift is None:
            return (
                "position t is trained towards target t"
                if not self.target_shift
                else (f"position t is trained towards target t + {self.target_shift} (the shift is {where})")
            )
        return f"position t is trained towards input token t + {self.input_shift} (the shift is {where})"

    def apply(self, outputs: Tensor, targets: Tensor, inputs: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        """``outputs``, ``targets`` and per-position ``inputs`` cut so that position ``t`` of each faces the
        others, as the loss pairs them; unchanged when there is no shift. Outputs with the class dim last
        ``(..., C)`` or flattened ``(M, C)`` (``M`` = the targets' size) keep their layout."""
        s = self.target_shift
        if s == 0 or targets.ndim <= self.time_dim or targets.shape[self.time_dim] <= s:
            return outputs, targets, inputs
        d, length = self.time_dim, targets.shape[self.time_dim] - s
        if outputs.shape[:-1] == targets.shape:
            cut_outputs = outputs.narrow(d, 0, length)
        elif outputs.ndim == 2 and outputs.shape[0] == targets.numel():
            cut_outputs = outputs.reshape(*targets.shape, -1).narrow(d, 0, length).reshape(-1, outputs.shape[-1])
        else:
            return outputs, targets, inputs
        cut_inputs = inputs
        if isinstance(inputs, Tensor) and inputs.shape[: targets.ndim] == targets.shape:
            cut_inputs = inputs.narrow(d, 0, length)
        return cut_outputs, targets.narrow(d, s, length), cut_inputs


#: the loss's targets are read at a shift when at least this share of the positions with a gradient agree with
#: it (an auxiliary term of the loss, a z-loss or label smoothing, may move a few)
_AGREEMENT = 0.98
#: the input tokens are read at a shift when this share agrees: padding breaks the match where a shifted
#: position runs into it (one position per shift per padded sequence)
_INPUT_AGREEMENT = 0.8


def trained_classes(grad: Tensor, shape: Sequence[int]) -> Tensor | None:
    """The class each row of ``grad`` (the gradient of a loss with respect to logits, class dim last) is
    pushed towards: the most negative entry, since cross-entropy's gradient is ``softmax - onehot`` up to a
    positive factor. ``-1`` where a row has no gradient (ignored positions, positions the loss leaves out).
    Reshaped to ``shape`` (the targets'); ``None`` when the sizes do not fit."""
    if grad.ndim < 2 or grad.shape[-1] < 2:
        return None
    rows = grad.detach().float().reshape(-1, grad.shape[-1])
    if rows.shape[0] != int(torch.Size(shape).numel()):
        return None
    classes = rows.argmin(-1)
    classes[(rows == 0).all(-1)] = -1
    return classes.reshape(*shape)


def _find_shift(
    trained: Tensor, reference: Tensor, max_shift: int, exact_tail: bool, agreement: float
) -> tuple[int, int] | None:
    """``(shift, dim)`` such that ``trained[t] == reference[t + shift]`` along ``dim`` for at least
    ``agreement`` of the positions where ``trained`` has a class, the best agreeing one (the smallest shift on a
    tie); with ``exact_tail`` the last ``shift`` positions must have none (the loss cuts them off)."""
    dims = [1, 0] if trained.ndim >= 2 else [0]
    best: tuple[float, int, int] | None = None
    for shift in range(max_shift + 1):
        for dim in dims if shift else dims[:1]:
            length = trained.shape[dim] - shift
            if length < 1:
                continue
            head = trained.narrow(dim, 0, length)
            read = head >= 0
            count = int(read.sum())
            if count == 0:
                continue
            rate = int(((head == reference.narrow(dim, shift, length)) & read).sum()) / count
            tail_empty = not exact_tail or shift == 0 or bool((trained.narrow(dim, length, shift) < 0).all())
            if rate >= agreement and tail_empty and (best is None or rate > best[0]):
                best = (rate, shift, dim)
    return None if best is None else (best[1], best[2])


def may_shift(targets: Tensor, inputs: Any = None) -> bool:
    """Whether the targets have positions a loss could shift along: a time dimension (``(N, T)``, ``(T, N)``), or
    flattened ``(N*T,)`` labels beside an integer input of that size (a time-major language model). One label per
    example (a classifier) has none, so :func:`read_alignment` has nothing to read there."""
    if is_sparse(targets) or targets.is_floating_point() or targets.dtype == torch.bool:
        return False
    if targets.ndim >= 2:
        return True
    return targets.ndim == 1 and any(
        is_int(x) and x.ndim >= 2 and x.numel() == targets.numel() for x in tensors_of(inputs)
    )


def read_alignment(grad: Tensor, targets: Tensor, inputs: Any = None, max_shift: int = 2) -> Alignment | None:
    """How the loss whose gradient with respect to the logits is ``grad`` pairs positions with ``targets``
    (integer class labels) and with the input tokens. ``None`` when the loss is not read as a classification
    loss over these targets (a custom loss, soft targets, another reading of the outputs)."""
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.ndim == 0:
        return None
    trained = trained_classes(grad, targets.shape)
    if trained is None:
        return None
    found = _find_shift(trained, targets.long(), max_shift, exact_tail=True, agreement=_AGREEMENT)
    if found is None:
        return None
    shift, dim = found
    matched = int((trained >= 0).sum())
    for x in tensors_of(inputs):
        if not is_int(x) or x.numel() != trained.numel() or x.ndim < 1:
            continue
        tokens = trained.reshape(x.shape)
        if x.ndim >= 2 and bool((x.narrow(1, 1, x.shape[1] - 1) == x.narrow(1, 0, x.shape[1] - 1)).all()):
            continue  # constant along time: any shift matches
        on_inputs = _find_shift(tokens, x.long(), max_shift, exact_tail=False, agreement=_INPUT_AGREEMENT)
        if on_inputs is not None:
            return Alignment(shift, dim, on_inputs[0], matched, on_inputs[1])
    return Alignment(shift, dim, None, matched)


def looks_like_next_step(inputs: Any, targets: Tensor | None, batch_dim: int = 0) -> bool:
    """Whether the targets are an input shifted by one position (next-token / next-step training):
    ``targets[:, :-1] == inputs[:, 1:]`` with the batch first, ignoring negative (ignore-index) targets."""
    if targets is None:
        return False
    for x in tensors_of(inputs):
        if (
            is_sparse(x)
            or is_sparse(targets)
            or x.shape != targets.shape
            or x.ndim < 2
            or x.shape[1 if batch_dim == 0 else 0] < 2
        ):
            continue
        xb, yb = x.movedim(batch_dim, 0), targets.movedim(batch_dim, 0)
        if is_int(x) and is_int(targets):
            same = (yb[:, :-1] == xb[:, 1:]) | (yb[:, :-1] < 0)
        elif x.is_floating_point() and targets.is_floating_point():
            same = torch.isclose(yb[:, :-1], xb[:, 1:])
        else:
            continue
        if bool(same.all()) and not bool((xb[:, 1:] == xb[:, :-1]).all()):
            return True
    return False


def gradient_at_outputs(module: nn.Module, loss_fn: Callable[[], Tensor], shape: Sequence[int]) -> Tensor | None:
    """The gradient of ``loss_fn()`` (the user's own loss) with respect to the logits it is computed from: the
    last tensor of ``shape`` that ``module`` or one of its submodules returned during the call (a
    ``nn.Linear`` head, a model's ``logits``). ``None`` when no submodule returned such a tensor or the loss does
    not depend on one. Writes no ``.grad``: the gradient comes from :func:`torch.autograd.grad`."""
    wanted = tuple(shape)
    seen: dict[int, Tensor] = {}

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        for t in tensors_of(output if not hasattr(output, "logits") else output.logits):
            if tuple(t.shape) == wanted and t.is_floating_point() and t.requires_grad:
                seen.setdefault(id(t), t)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        loss = loss_fn()
    finally:
        for handle in handles:
            handle.remove()
    if not loss.requires_grad:
        return None
    for candidate in reversed(list(seen.values())):  # nearest the loss first
        (grad,) = torch.autograd.grad(loss, candidate, retain_graph=True, allow_unused=True)
        if grad is not None and bool(grad.ne(0).any()):
            return grad
    return None
