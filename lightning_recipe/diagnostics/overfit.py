"""Overfit one fixed batch: the training loop, its early stops, and what a failure looked like.

Pure PyTorch, no Lightning: the caller passes closures for the loss (the user's own ``training_step``
on the fixed batch), for the label check, and for putting the model back to its starting state between
learning rates. :func:`overfit_batch` returns an :class:`OverfitEvidence` with everything it saw;
:func:`~lightning_recipe.diagnostics.overfit_cause.diagnose` names the cause of a failure from it.

Why several learning rates: one fixed optimizer setting is too slow for some healthy models (BatchNorm,
LSTM, transformer) and would raise false alarms, while the real failures (a loss floor, no gradient,
a loss that does not depend on the parameters) fail at every learning rate. Each learning rate restarts
from the same state; the first one that fits ends the search.

Example::

    >>> import torch
    >>> from lightning_recipe.diagnostics.labels import decode_predictions
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
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.dependence import Depends, GradientReach, grad_norm
from lightning_recipe.diagnostics.labels import Decoded

__all__ = [
    "DEFAULT_LOSS_FRACTION",
    "DEFAULT_LRS",
    "DEFAULT_MAX_STEPS",
    "Attempt",
    "OverfitEvidence",
    "Stop",
    "overfit_batch",
]

#: tried in order, each from the same starting state, until one fits
DEFAULT_LRS: tuple[float, ...] = (3e-3, 3e-2, 3e-4)
#: the loss must fall to this fraction of the way from its floor to its start
DEFAULT_LOSS_FRACTION = 0.1
#: updates per learning rate at most
DEFAULT_MAX_STEPS = 200

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
#: why an attempt ended: it fitted, its best loss stopped improving, it ran out of steps, its loss was not finite
Stop = Literal["fit", "plateau", "max_steps", "nonfinite"]


@dataclass(frozen=True)
class Attempt:
    """One learning rate's run on the batch.

    ``curve[i]`` is the loss before update ``i``; ``steps`` counts the updates made.
    """

    lr: float
    curve: tuple[float, ...]
    steps: int
    reached: bool  # loss criterion met and (for classification) every label predicted
    stop: Stop
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
    depends: Depends | None = None,
) -> OverfitEvidence:
    """Train on one fixed batch until the loss is ``loss_fraction`` of its start and every label is
    predicted, trying each learning rate in ``lrs`` from the same starting state.

    Args:
        named_parameters: the model's; those with ``requires_grad`` are trained, the others reported as frozen.
        loss_fn: computes the loss on the fixed batch (a scalar tensor with a graph).
        reset: puts the model (and RNGs) back to the starting state; called before every attempt.
        labels: returns the decoded predictions and labels on the batch (``None`` for regression); only
            called when the loss criterion is met, so it costs one forward per candidate stop.
        lrs: learning rates to try, in order; the first that fits ends the search.
        max_steps: updates per learning rate at most.
        loss_fraction: the loss must fall to this fraction of its starting value.
        patience: an attempt stops at a plateau, its best loss improved by less than ``min_improvement`` of the
            start over the last ``patience`` steps, while above the loss target (below it labels may still align).
        optimizer: ``(params, lr) -> Optimizer``; default ``torch.optim.Adam``.
        fallback: ``(name, lr, factory)``, the run's own optimizer: one more attempt when no rate in ``lrs`` fits,
            for a parameter that must travel farther than Adam's ~``lr`` per step allows (a bias 5 from its target).
        floor: the lowest loss any model can reach on the batch (the entropy of soft targets; 0 for hard
            labels): the loss must close ``1 - loss_fraction`` of the gap between its start and the floor.
        depends: ``params -> [bool]``, whether the outputs depend on each parameter (see
            :class:`~lightning_recipe.diagnostics.dependence.GradientReach`): a parameter whose loss gradient
            is exactly 0 by value (sign-balanced L1 errors) is then not reported as gradient-free.
    """
    trainable, frozen = _split(named_parameters)
    settings = _Settings(
        tuple(lrs), max_steps, loss_fraction, patience, min_improvement, optimizer or _adam, fallback, floor, depends
    )
    params = [p for _, p in trainable]
    attempts, reached, has_graph = _search(params, loss_fn, reset, labels, settings) if params else ([], [], True)
    no_grad = [(n, p) for (n, p), flag in zip(trainable, reached, strict=True) if not flag]
    if not has_graph or not attempts or not attempts[0].steps:
        no_grad = []  # the loss has no graph, or never got to a backward: nothing known about gradients
    return OverfitEvidence(
        attempts=tuple(attempts),
        loss_fraction=loss_fraction,
        no_grad_params=tuple(n for n, _ in no_grad),
        frozen_params=tuple(n for n, _ in frozen),
        trainable_params=tuple(n for n, _ in trainable),
        no_grad_numel=sum(p.numel() for _, p in no_grad),
        trainable_numel=sum(p.numel() for p in params),
        frozen_numel=sum(p.numel() for _, p in frozen),
        loss_has_graph=has_graph,
        floor=floor,
    )


@dataclass(frozen=True)
class _Settings:
    """The keyword arguments of :func:`overfit_batch`: what the search tries and when an attempt stops."""

    lrs: tuple[float, ...]
    max_steps: int
    loss_fraction: float
    patience: int
    min_improvement: float
    optimizer: OptimizerFactory
    fallback: tuple[str, float, OptimizerFactory] | None
    floor: float
    depends: Depends | None


def _search(
    params: list[nn.Parameter],
    loss_fn: Callable[[], Tensor],
    reset: Callable[[], None],
    labels: Callable[[], Decoded | None] | None,
    settings: _Settings,
) -> tuple[list[Attempt], list[bool], bool]:
    """Each learning rate in turn from the same starting state, then the fallback, until one fits, or a failure
    shows that no other would (a loss without a graph, a start that is not finite or not positive, parameters
    without a gradient). Returns the attempts, which parameters the gradient reached, and whether the loss had a
    graph."""
    reach = GradientReach(params, settings.depends)
    attempts: list[Attempt] = []
    plan = [("Adam", lr, settings.optimizer) for lr in settings.lrs]
    plan += [settings.fallback] if settings.fallback is not None else []
    index = -1
    while index + 1 < len(plan):
        index += 1
        name, lr, factory = plan[index]
        opt = _restart(reset, params, name, lr, factory)
        if opt is None:
            break
        run = _run_attempt(opt, params, loss_fn, labels, settings, reach.note if index == 0 else None)
        attempts.append(run.attempt(lr, name, settings.floor))
        if not run.has_graph:
            return attempts, reach.reached, False
        if not math.isfinite(run.curve[0]) or run.curve[0] <= 0 or run.reached:
            break
        if index == 0 and len(run.curve) > 1 and not all(reach.reached):
            break  # parameters without a gradient fail at every learning rate: no need to try others
        if index == len(plan) - 1 and settings.lrs:
            plan.extend(_larger_step(attempts, settings.lrs, settings.optimizer, settings.loss_fraction))
    return attempts, reach.reached, True


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    # Adam's eps of 1e-8 rounds to 0 in float16, where a gradient whose square underflows then divides by zero at
    # the first step (the loss goes NaN at every rate): float16's smallest normal number (6.1e-5) keeps it finite
    eps = max([1e-8, *(torch.finfo(p.dtype).tiny for p in params if p.is_floating_point())])
    return torch.optim.Adam(params, lr=lr, eps=eps)


def _split(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The trainable and the frozen parameters, each once (a tied weight is listed under its first name)."""
    seen_ids: set[int] = set()
    trainable: list[tuple[str, nn.Parameter]] = []
    frozen: list[tuple[str, nn.Parameter]] = []
    for name, param in named_parameters:
        if id(param) in seen_ids:
            continue
        seen_ids.add(id(param))
        (trainable if param.requires_grad else frozen).append((name, param))
    return trainable, frozen


def _restart(
    reset: Callable[[], None], params: list[nn.Parameter], name: str, lr: float, factory: OptimizerFactory
) -> torch.optim.Optimizer | None:
    """The starting state back and a fresh optimizer for one attempt; ``None`` when the run's own optimizer
    cannot be built on a plain parameter list (our Adam always can: its error propagates)."""
    reset()
    for p in params:
        p.grad = None
    try:
        return factory(params, lr)
    except Exception:  # the run's own optimizer may not take a plain parameter list
        if name == "Adam":
            raise
        return None


@dataclass
class _Run:
    """One attempt while it runs; :meth:`attempt` freezes it into an :class:`Attempt`."""

    curve: list[float] = field(default_factory=list)
    stop: Stop = "max_steps"
    nonfinite_step: int | None = None
    decoded: Decoded | None = None
    grad_norm: Tensor | None = None
    raised: str = ""
    reached: bool = False
    has_graph: bool = True

    def attempt(self, lr: float, optimizer: str, floor: float) -> Attempt:
        decoded = self.decoded
        return Attempt(
            lr=lr,
            curve=tuple(self.curve),
            steps=max(len(self.curve) - 1, 0),
            reached=self.reached,
            stop=self.stop,
            nonfinite_step=self.nonfinite_step,
            correct=None if decoded is None else decoded.correct,
            total=None if decoded is None else decoded.total,
            final_grad_norm=None if self.grad_norm is None else float(self.grad_norm),
            ambiguous=0 if decoded is None else decoded.num_ambiguous,
            optimizer=optimizer,
            floor=floor,
            raised=self.raised,
        )


def _run_attempt(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss_fn: Callable[[], Tensor],
    labels: Callable[[], Decoded | None] | None,
    rules: _Settings,
    after_backward: Callable[[int], None] | None,
) -> _Run:
    """One learning rate: up to ``max_steps`` updates from the starting state, stopping early at a fit, a
    non-finite loss, a loss without a graph, or a plateau. The labels are read when the loss target is met (a
    candidate fit) and once at the end of an attempt that did not fit."""
    run = _Run()
    best, best_at_window_start = math.inf, math.inf
    for step in range(rules.max_steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = _evaluate(loss_fn, step, run)
        if loss is None:
            break
        value, start = run.curve[-1], run.curve[0]
        if start <= rules.floor:
            break  # nothing to take a fraction of; the caller reports it
        if value <= goal(start, rules.loss_fraction, rules.floor) and _labels_fit(labels, run):
            break
        if step == rules.max_steps:
            break
        if not loss.requires_grad:
            run.has_graph = False
            break
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        run.grad_norm = grad_norm(params)
        opt.step()
        best = min(best, value)
        # a plateau is judged only above the loss target: below it the labels may still be aligning
        if step % rules.patience == 0 and best > goal(start, rules.loss_fraction, rules.floor):
            if step > 0 and best_at_window_start - best < rules.min_improvement * start:
                run.stop = "plateau"
                break
            best_at_window_start = best
    if not run.reached and labels is not None and run.stop != "nonfinite" and run.curve and run.curve[0] > 0:
        run.decoded = labels()
    return run


def _evaluate(loss_fn: Callable[[], Tensor], step: int, run: _Run) -> Tensor | None:
    """The loss at this step, its value appended to the curve; ``None`` when it is not finite or raised (the
    attempt diverged: ``run`` records where)."""
    try:
        loss = loss_fn()
    except Exception as error:  # judged below
        if step == 0:
            raise  # on the starting weights: the loss's own error, not this attempt's
        # the same call ran on the starting weights; on the weights this learning rate made it raises (a VAE's
        # BCE refuses the NaN its exploded log-variance gives): this attempt diverged, as with a NaN loss
        run.curve.append(math.nan)
        run.stop, run.nonfinite_step, run.raised = "nonfinite", step, f"{type(error).__name__}: {error}".splitlines()[0]
        return None
    value = float(loss.detach().float())
    run.curve.append(value)
    if not math.isfinite(value):
        run.stop, run.nonfinite_step = "nonfinite", step
        return None
    return loss


def _labels_fit(labels: Callable[[], Decoded | None] | None, run: _Run) -> bool:
    """At a loss that meets the target: whether every label is predicted too (always, without labels); a fit
    is recorded in ``run``."""
    run.decoded = labels() if labels is not None else None
    if run.decoded is None or run.decoded.correct == run.decoded.total:
        run.reached, run.stop = True, "fit"
        return True
    return False


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
