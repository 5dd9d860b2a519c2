"""Which trainable parameters reach the loss and the outputs: the gradient bookkeeping of overfit one batch.

A parameter that never gets a nonzero gradient never trains (a ``.detach()``, an unused layer, weights behind
all-zero weights). A gradient can also be exactly 0 by value while the parameter matters: the bias of an L1
regression whose errors are as often positive as negative. :class:`GradientReach` tells the two apart with
:func:`output_dependence`. Pure PyTorch, no Lightning.

Example::

    >>> import torch
    >>> trunk, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    >>> params = list(trunk.parameters()) + list(head.parameters())
    >>> reach = GradientReach(params)
    >>> head(trunk(torch.randn(5, 3)).detach()).sum().backward()
    >>> reach.note(step=0)
    >>> reach.reached
    [False, False, True, True]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.walk import tensors_of

__all__ = ["NOTED_STEPS", "GradientReach", "grad_norm", "output_dependence"]

#: backwards after which a parameter still without a nonzero gradient counts as never reached
NOTED_STEPS = 5

Depends = Callable[[list[nn.Parameter]], list[bool]]


class GradientReach:
    """Which of ``params`` received a nonzero gradient over the first :data:`NOTED_STEPS` backwards.

    Args:
        params: the trainable parameters, in the order :attr:`reached` reports them.
        depends: ``params -> [bool]``, whether the model's outputs depend on each parameter (see
            :func:`output_dependence`), asked after the first backward about the parameters whose gradient is
            there and exactly 0; those it answers ``True`` for count as reached.
    """

    def __init__(self, params: list[nn.Parameter], depends: Depends | None = None) -> None:
        self.params = params
        self.depends = depends
        self.reached = [False] * len(params)

    def note(self, step: int) -> None:
        """Read the gradients the backward of ``step`` left in ``.grad`` (a no-op from step :data:`NOTED_STEPS`)."""
        if step >= NOTED_STEPS:
            return
        self._note_gradients()
        if step == 0 and self.depends is not None and not all(self.reached):
            self._note_dependence(self.depends)

    def _note_gradients(self) -> None:
        pending = [i for i, flag in enumerate(self.reached) if not flag]
        checks = [(i, grad) for i in pending if (grad := self.params[i].grad) is not None]
        if not checks:
            return
        nonzero = torch.stack([g.detach().ne(0).any() for _, g in checks]).tolist()
        for (i, _), flag in zip(checks, nonzero, strict=True):
            self.reached[i] = self.reached[i] or bool(flag)

    def _note_dependence(self, depends: Depends) -> None:
        # only for a gradient that is there and exactly 0: a missing one (None) means the loss never reaches it
        pending = [i for i, flag in enumerate(self.reached) if not flag and self.params[i].grad is not None]
        if pending:
            for i, flag in zip(pending, depends([self.params[i] for i in pending]), strict=True):
                self.reached[i] = self.reached[i] or flag


def output_dependence(module: nn.Module, loss_fn: Callable[[], Tensor], params: list[nn.Parameter]) -> list[bool]:
    """Whether the outputs ``module`` computes during ``loss_fn()`` depend on each of ``params``: the
    vector-Jacobian product of those outputs with a random cotangent is nonzero for it.

    The outputs are the tensors the last module to finish returned (the model's own outputs, their ``logits``
    when they have them), scalars left out (a loss). Where the loss's gradient misses a parameter by value
    (sign-balanced L1 errors cancel a bias's gradient exactly), a random weighting of the outputs does not; where
    the parameter sits behind all-zero weights, a dead layer or a ``detach``, nothing reaches it either way.
    Writes no ``.grad``. All ``False`` when no outputs could be read: the loss gradient's zero then stands."""
    last: list[Tensor] = []

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        found = [
            t
            for t in tensors_of(output.logits if hasattr(output, "logits") else output)
            if t.ndim > 0 and t.is_floating_point() and t.requires_grad
        ]
        if found:
            last[:] = found

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        loss_fn()
    finally:
        for handle in handles:
            handle.remove()
    if not last:
        return [False] * len(params)
    generator = torch.Generator().manual_seed(0)
    cotangents = [torch.randn(t.shape, generator=generator).to(t) for t in last]
    grads = torch.autograd.grad(last, params, cotangents, allow_unused=True)
    flags = [torch.zeros((), dtype=torch.bool) if g is None else g.detach().ne(0).any().cpu() for g in grads]
    return torch.stack(flags).tolist() if flags else []


def grad_norm(params: list[nn.Parameter]) -> Tensor | None:
    """The L2 norm of all the gradients in ``.grad`` together; ``None`` when there are none."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else None
