"""Labels of a classification batch: predicted against true, and the ones no model can get right.

OverfitOneBatch asks whether a model that memorised one batch predicts its labels; the answer needs the labels
read the way the loss reads them (:func:`decode_predictions`: class dim last or on dim 1, flattened language
model logits, 0/1 labels thresholded as logits or probabilities, one-hot rows) and the labels that no model can
predict left out of the count (:func:`conflicting_labels`: the same input, or the same prefix of a sequence,
with a different label). :func:`looks_like_probabilities` tells a softmax applied before a loss that applies it
again.

Example::

    >>> import torch
    >>> decoded = decode_predictions(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> decoded.task, decoded.correct, decoded.total
    ('multiclass', 1, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_recipe.diagnostics.sparse import is_sparse
from lightning_recipe.diagnostics.task import is_binary, is_probabilities

__all__ = [
    "Decoded",
    "class_dim",
    "conflicting_labels",
    "decode_predictions",
    "looks_like_probabilities",
]


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


def _is_one_hot(targets: Tensor) -> bool:
    return bool((targets.sum(-1) == 1).all())
