"""Alignment: which target each output position is trained towards, read from the user's own loss.

Next-token training shifts either in the batch (``y`` = ``x`` shifted by one) or inside the model's own loss
(Hugging Face and litgpt: ``labels = input_ids``, the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``).
BatchLeakageProbe needs to know which (causality applies to next-token training), and InitLossCheck,
OverfitOneBatch and PredictionDynamicsLogger must pair outputs with targets the way the loss does. The gradient
of the user's own loss with respect to the logits says which class each position is pushed towards
(cross-entropy's gradient is ``softmax - onehot``: its one negative entry is the target), so the shift is read
from the loss itself (:func:`gradient_at_outputs`, :func:`read_alignment`), not guessed from names. Labels
shifted twice (by the user and again by the model) show up as position ``t`` trained towards input token
``t + 2``.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.sparse import is_sparse
from lightning_recipe.diagnostics.task import is_int
from lightning_recipe.diagnostics.walk import tensors_of

__all__ = [
    "Alignment",
    "gradient_at_outputs",
    "looks_like_next_step",
    "may_shift",
    "read_alignment",
    "trained_classes",
]


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
