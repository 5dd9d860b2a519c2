"""Overfit one fixed batch: the training loop, its early stops, and what a failure looked like.

Pure PyTorch, no Lightning: the caller passes closures for the loss (the user's own ``training_step``
on the fixed batch), for the label check, and for putting the model back to its starting state between
learning rates. :func:`overfit_batch` returns an :class:`OverfitEvidence` with everything it saw.

Why several learning rates: one fixed optimizer setting is too slow for some healthy models (BatchNorm,
LSTM, transformer) and would raise false alarms, while the real failures (a loss floor, no gradient,
a loss that does not depend on the parameters) fail at every learning rate. Each learning rate restarts
from the same state; the first one that fits ends the search.

Example::

    >>> import torch
    >>> from lightning_recipe.diagnostics.task import decode_predictions
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> evidence = overfit_batch(
    ...     model.named_parameters(),
    ...     loss_fn=lambda: torch.nn.functional.cross_entropy(model(x), y),
    ...     reset=lambda: None,
    ...     labels=lambda: decode_predictions(model(x), y),
    ... )
    >>> evidence.passed
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.batch import tensors_of
from lightning_recipe.diagnostics.task import Decoded

__all__ = [
    "DEFAULT_LOSS_FRACTION",
    "DEFAULT_LRS",
    "DEFAULT_MAX_STEPS",
    "Attempt",
    "OverfitEvidence",
    "overfit_batch",
]

#: tried in order, each from the same starting state, until one fits
DEFAULT_LRS: tuple[float, ...] = (3e-3, 3e-2, 3e-4)
#: the loss must fall to this fraction of the way from its floor to its start
DEFAULT_LOSS_FRACTION = 0.1
#: updates per learning rate at most
DEFAULT_MAX_STEPS = 200

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Attempt:
    """One learning rate's run on the batch.

    ``curve[i]`` is the loss before update ``i``; ``steps`` counts the updates made.
    """

    lr: float
    curve: tuple[float, ...]
    steps: int
    reached: bool  # loss criterion met and (for classification) every label predicted
    stop: str  # "fit" | "plateau" | "max_steps" | "nonfinite"
    nonfinite_step: int | None
    correct: int | None
    total: int | None
    final_grad_norm: float | None
    ambiguous: int = 0
    optimizer: str = "Adam"
    floor: float = 0.0
    raised: str = ""  # the error the loss raised on this attempt's diverged weights ("nonfinite" stop)

    @property
    def setting(self) -> str:
        """``"lr 0.003"``, or ``"your SGD at lr 0.1"`` for the run's own optimizer."""
        return f"lr {self.lr:g}" if self.optimizer == "Adam" else f"{self.optimizer} at lr {self.lr:g}"

    @property
    def start_loss(self) -> float:
        return self.curve[0]

    @property
    def final_loss(self) -> float:
        return self.curve[-1]

    @property
    def best_loss(self) -> float:
        finite = [v for v in self.curve if math.isfinite(v)]
        return min(finite) if finite else math.nan

    def loss_fraction_met(self, fraction: float) -> bool:
        return math.isfinite(self.best_loss) and self.best_loss <= goal(self.start_loss, fraction, self.floor)

    @property
    def all_match(self) -> bool | None:
        return None if self.total is None else self.correct == self.total


@dataclass(frozen=True)
class OverfitEvidence:
    """Everything :func:`overfit_batch` saw, for the verdict and the report."""

    attempts: tuple[Attempt, ...]
    loss_fraction: float
    no_grad_params: tuple[str, ...]
    frozen_params: tuple[str, ...]
    trainable_params: tuple[str, ...]
    no_grad_numel: int = 0
    trainable_numel: int = 0
    frozen_numel: int = 0
    loss_has_graph: bool = True
    floor: float = 0.0

    @property
    def passed(self) -> bool:
        return any(a.reached for a in self.attempts) and not self.no_grad_params and self.loss_has_graph

    @property
    def start_loss(self) -> float:
        return self.attempts[0].start_loss if self.attempts else math.nan

    @property
    def target_loss(self) -> float:
        return goal(self.start_loss, self.loss_fraction, self.floor)

    @property
    def decisive(self) -> Attempt | None:
        """The attempt that fitted, else the one that came closest (lowest best loss)."""
        if not self.attempts:
            return None
        for attempt in self.attempts:
            if attempt.reached:
                return attempt
        finite = [a for a in self.attempts if math.isfinite(a.best_loss)]
        return min(finite, key=lambda a: a.best_loss) if finite else self.attempts[0]

    @property
    def total_steps(self) -> int:
        return sum(a.steps for a in self.attempts)


def overfit_batch(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    loss_fn: Callable[[], Tensor],
    reset: Callable[[], None],
    labels: Callable[[], Decoded | None] | None = None,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    max_steps: int = DEFAULT_MAX_STEPS,
    loss_fraction: float = DEFAULT_LOSS_FRACTION,
    patience: int = 50,
    min_improvement: float = 0.01,
    optimizer: OptimizerFactory | None = None,
    fallback: tuple[str, float, OptimizerFactory] | None = None,
    floor: float = 0.0,
    depends: Callable[[list[nn.Parameter]], list[bool]] | None = None,
) -> OverfitEvidence:
    """Train on one fixed batch until the loss is ``loss_fraction`` of its start and every label is
    predicted, trying each learning rate in ``lrs`` from the same starting state.

    Args:
        named_parameters: the model's parameters; those with ``requires_grad`` are trained, the others
            are reported as frozen.
        loss_fn: computes the loss on the fixed batch (a scalar tensor with a graph).
        reset: puts the model (and RNGs) back to the starting state; called before every attempt.
        labels: returns the decoded predictions and labels on the batch (``None`` for regression); only
            called when the loss criterion is met, so it costs one forward per candidate stop.
        lrs: learning rates to try, in order; the first that fits ends the search.
        max_steps: updates per learning rate at most.
        loss_fraction: the loss must fall to this fraction of its starting value.
        patience: an attempt stops early when its best loss improved by less than ``min_improvement``
            of the starting loss over the last ``patience`` steps (a plateau). Once the loss target is
            reached and only labels are left to line up, the attempt runs to ``max_steps``.
        optimizer: ``(params, lr) -> Optimizer``; default ``torch.optim.Adam``.
        floor: the lowest loss any model can reach on the batch (the entropy of soft targets; 0 for hard
            labels): the loss must close ``1 - loss_fraction`` of the gap between its start and the floor.
        fallback: ``(name, lr, factory)``, one more attempt when no learning rate in ``lrs`` fits: the run's own
            optimizer. Adam moves each parameter by about ``lr`` per step, so a parameter that must travel far (a
            bias towards targets of mean -5) cannot get there in ``max_steps`` at any of them, where the
            optimizer the model was tuned with can.
        depends: ``params -> [bool]``, whether the model's outputs depend on each parameter (see
            :func:`output_dependence`). A loss gradient can be exactly 0 by value: the bias of an L1 regression
            whose errors are as often positive as negative. Such a parameter is not reported as gradient-free
            when the outputs depend on it; one behind all-zero weights or a ``detach`` is.
    """
    make_optimizer = optimizer or (lambda params, lr: torch.optim.Adam(params, lr=lr))
    named = list(named_parameters)
    seen_ids: set[int] = set()
    trainable: list[tuple[str, nn.Parameter]] = []
    frozen: list[tuple[str, nn.Parameter]] = []
    for name, param in named:
        if id(param) in seen_ids:
            continue
        seen_ids.add(id(param))
        (trainable if param.requires_grad else frozen).append((name, param))
    params = [p for _, p in trainable]
    got_grad = [False] * len(params)
    attempts: list[Attempt] = []
    loss_has_graph = True
    common: dict[str, Any] = dict(  # the fields both returns share
        frozen_params=tuple(n for n, _ in frozen),
        trainable_params=tuple(n for n, _ in trainable),
        trainable_numel=sum(p.numel() for p in params),
        frozen_numel=sum(p.numel() for _, p in frozen),
        loss_fraction=loss_fraction,
        floor=floor,
    )
    if not params:
        return OverfitEvidence(attempts=(), no_grad_params=(), **common)

    plan = [("Adam", lr, make_optimizer) for lr in lrs] + ([fallback] if fallback is not None else [])
    index = -1
    while index + 1 < len(plan):
        index += 1
        name, lr, factory = plan[index]
        reset()
        for p in params:
            p.grad = None
        try:
            opt = factory(params, lr)
        except Exception:  # the run's own optimizer may not take a plain parameter list
            if name == "Adam":
                raise
            break
        curve: list[float] = []
        stop, nonfinite_step, decoded, grad_norm, raised = "max_steps", None, None, None, ""
        best, best_at_window_start = math.inf, math.inf
        reached = False
        for step in range(max_steps + 1):
            opt.zero_grad(set_to_none=True)
            try:
                loss = loss_fn()
            except Exception as error:  # judged below
                if step == 0:
                    raise  # on the starting weights: the loss's own error, not this attempt's
                # the same call ran on the starting weights; on the weights this learning rate made it raises (a VAE's
                # BCE refuses the NaN its exploded log-variance gives): this attempt diverged, as with a NaN loss
                curve.append(math.nan)
                stop, nonfinite_step, raised = "nonfinite", step, f"{type(error).__name__}: {error}".splitlines()[0]
                break
            value = float(loss.detach().float())
            curve.append(value)
            if not math.isfinite(value):
                stop, nonfinite_step = "nonfinite", step
                break
            start = curve[0]
            if start <= floor:
                break  # nothing to take a fraction of; the caller reports it
            if value <= goal(start, loss_fraction, floor):
                decoded = labels() if labels is not None else None
                if decoded is None or decoded.correct == decoded.total:
                    reached, stop = True, "fit"
                    break
            if step == max_steps:
                break
            if not loss.requires_grad:
                loss_has_graph = False
                break
            loss.backward()
            if index == 0 and step < 5:
                _note_gradients(params, got_grad)
                if step == 0 and depends is not None and not all(got_grad):
                    _note_dependence(params, got_grad, depends)
            grad_norm = _grad_norm(params)
            opt.step()
            best = min(best, value)
            # a plateau is judged only above the loss target: below it the labels may still be aligning
            if step % patience == 0 and best > goal(start, loss_fraction, floor):
                if step > 0 and best_at_window_start - best < min_improvement * start:
                    stop = "plateau"
                    break
                best_at_window_start = best
        if not reached and labels is not None and stop != "nonfinite" and curve and curve[0] > 0:
            decoded = labels()
        attempts.append(
            Attempt(
                lr=lr,
                curve=tuple(curve),
                steps=max(len(curve) - 1, 0),
                reached=reached,
                stop=stop,
                nonfinite_step=nonfinite_step,
                correct=None if decoded is None else decoded.correct,
                total=None if decoded is None else decoded.total,
                final_grad_norm=None if grad_norm is None else float(grad_norm),
                ambiguous=0 if decoded is None else decoded.num_ambiguous,
                optimizer=name,
                floor=floor,
                raised=raised,
            )
        )
        if not loss_has_graph or not math.isfinite(curve[0]) or curve[0] <= 0 or reached:
            break
        if index == 0 and len(curve) > 1 and not all(got_grad):
            break  # parameters without a gradient fail at every learning rate: no need to try others
        if index == len(plan) - 1 and lrs:
            plan.extend(_larger_step(attempts, lrs, make_optimizer, loss_fraction))

    no_grad = [(n, p) for (n, p), flag in zip(trainable, got_grad, strict=True) if not flag] if loss_has_graph else []
    if not attempts[0].steps:  # never got to a backward: nothing known about gradients
        no_grad = []
    return OverfitEvidence(
        attempts=tuple(attempts),
        no_grad_params=tuple(n for n, _ in no_grad),
        no_grad_numel=sum(p.numel() for _, p in no_grad),
        loss_has_graph=loss_has_graph,
        **common,
    )


def _larger_step(
    attempts: list[Attempt], lrs: Sequence[float], factory: OptimizerFactory, fraction: float
) -> list[tuple[str, float, OptimizerFactory]]:
    """One more Adam attempt at 10x the largest learning rate, when that rate ran out of steps still descending (it
    never plateaued) short of the goal. Adam moves each parameter by about ``lr`` per step, so a fit that must move
    a parameter far (a bias 20 away, polynomial features up to ``x^4``) cannot finish in ``max_steps`` at the default
    rates; a loss held above the goal by a floor plateaus at the larger rate too, which the report then shows."""
    top = max(lrs)
    if any(a.optimizer == "Adam" and a.lr == top * 10 for a in attempts):
        return []
    last = next((a for a in attempts if a.optimizer == "Adam" and a.lr == top), None)
    if last is None or last.stop != "max_steps" or last.loss_fraction_met(fraction):
        return []
    return [("Adam", top * 10, factory)]


def goal(start: float, fraction: float, floor: float = 0.0) -> float:
    """The loss an attempt must reach: ``fraction`` of the way from ``floor`` to ``start``."""
    return floor + fraction * (start - floor)


def _note_gradients(params: list[nn.Parameter], got_grad: list[bool]) -> None:
    pending = [i for i, flag in enumerate(got_grad) if not flag]
    checks = [(i, grad) for i in pending if (grad := params[i].grad) is not None]
    if not checks:
        return
    nonzero = torch.stack([g.detach().ne(0).any() for _, g in checks]).tolist()
    for (i, _), flag in zip(checks, nonzero, strict=True):
        got_grad[i] = got_grad[i] or bool(flag)


def _note_dependence(
    params: list[nn.Parameter], got_grad: list[bool], depends: Callable[[list[nn.Parameter]], list[bool]]
) -> None:
    # only for a gradient that is there and exactly 0: a missing one (None) means the loss never reaches it
    pending = [i for i, flag in enumerate(got_grad) if not flag and params[i].grad is not None]
    if pending:
        for i, flag in zip(pending, depends([params[i] for i in pending]), strict=True):
            got_grad[i] = got_grad[i] or flag


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


def _grad_norm(params: list[nn.Parameter]) -> Tensor | None:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else None
