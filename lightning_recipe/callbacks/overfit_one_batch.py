"""OverfitOneBatch: the recipe's "overfit one batch", run before the first optimizer step of ``fit``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_recipe import _logging
from lightning_recipe._args import check_fraction, check_int, check_positive
from lightning_recipe.callbacks._preflight import CheckContext, CheckSkipped, PreflightCheck, shifted_twice_text
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.diagnostics.batch import (
    BatchNotUnderstood,
    ForwardFn,
    InputsFn,
    TargetsFn,
    batch_size_of,
    examples_in_loss,
    graph_adjacency,
    map_tensors,
    take_along,
    tensors_of,
)
from lightning_recipe.diagnostics.dependence import output_dependence
from lightning_recipe.diagnostics.init_loss import loss_floor
from lightning_recipe.diagnostics.overfit import (
    DEFAULT_LOSS_FRACTION,
    DEFAULT_LRS,
    DEFAULT_MAX_STEPS,
    Attempt,
    OverfitEvidence,
    overfit_batch,
)
from lightning_recipe.diagnostics.state import TrainingState
from lightning_recipe.diagnostics.task import (
    IGNORE_INDEX,
    Alignment,
    decode_predictions,
    is_binary,
    looks_like_probabilities,
)
from lightning_recipe.report import CheckResult

__all__ = ["OverfitOneBatch"]

_CURVE_POINTS = 50  # loss-curve samples kept in ``details``
_NAMES_SHOWN = 6


class OverfitOneBatch(PreflightCheck):
    """Train on one fixed batch of a few examples and demand that the model fits it.

    A healthy model and loss drive the loss on a handful of examples close to zero and predict every
    label; a model that cannot has a bug that no amount of data will fix: a loss floor (softmax applied
    twice, a clamped loss), parameters that never get a gradient (a ``.detach()``, frozen layers), a loss
    that turns NaN.

    How: the first ``num_examples`` examples of the first training batch, the loss from your own
    ``training_step``, and a fresh Adam of our own on the trainable parameters. Each learning rate in ``lrs``
    is tried from the same starting point until one fits; when none does, a fresh copy of your own optimizer
    (its class and settings, not its state or schedule) gets one more attempt: Adam moves a parameter by about
    its learning rate per step, too slowly for a bias that must travel far, where the optimizer the model was
    tuned with may not be. An attempt stops early as soon as the batch is fitted, or when the loss has
    plateaued. The model runs in eval mode, so dropout (attention dropout too) is off: a regulariser,
    not part of what must fit; BatchNorm
    stays in train mode, as in training, and predictions are read in that same mode. Everything
    (weights, buffers, optimizer, RNGs, modes) is restored afterwards.

    Cost: at most ``(len(lrs) + 1) * max_steps`` training steps on ``num_examples`` examples; a healthy model
    usually fits within the first learning rate in a few dozen steps, a broken one stops at a plateau.

    Args:
        num_examples: how many examples of the first batch to fit (at least 2).
        max_steps: optimizer steps per learning rate at most.
        lrs: Adam learning rates to try, in order (``lr=`` tries just one).
        lr: a single learning rate; shorthand for ``lrs=(lr,)``.
        loss_fraction: the loss must fall to this fraction of its starting value.
        on_fail, inputs, targets, forward: see :class:`PreflightCheck`.

    Logged (TensorBoard, rank zero): ``recipe/overfit_one_batch/loss`` per inner step,
    ``recipe/overfit_one_batch/loss_curve`` and ``recipe/overfit_one_batch/predictions`` figures.

    Example::

        trainer = L.Trainer(callbacks=[OverfitOneBatch()])
        trainer.fit(model, datamodule)  # RecipeCheckError if the model cannot fit 4 examples
    """

    needs_loss = True  # passes over batches on which `training_step` returns None

    def __init__(
        self,
        num_examples: int = 4,
        max_steps: int = DEFAULT_MAX_STEPS,
        lrs: Sequence[float] = DEFAULT_LRS,
        lr: float | None = None,
        loss_fraction: float = DEFAULT_LOSS_FRACTION,
        *,
        on_fail: str = "raise",
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
    ) -> None:
        super().__init__(on_fail=on_fail, inputs=inputs, targets=targets, forward=forward)
        check_int("num_examples", num_examples, 2)
        check_int("max_steps", max_steps, 1)
        check_fraction("loss_fraction", loss_fraction)
        if lr is not None:
            check_positive("lr", lr)
            lrs = (lr,)
        if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or not lrs:
            raise ValueError(f"Expected `lrs` to be a non-empty sequence of positive numbers, but got {lrs!r}.")
        for value in lrs:
            check_positive("lrs", value)
        self.num_examples = num_examples
        self.max_steps = max_steps
        self.lrs = tuple(float(v) for v in lrs)
        self.loss_fraction = loss_fraction
        self._graph_note: str | None = None  # set by _fixed_batch when the batch is one graph

    # -- the check --------------------------------------------------------------------------------
    def run(self, ctx: CheckContext) -> CheckResult:
        module = ctx.module
        if not module.automatic_optimization:
            raise CheckSkipped(
                "the model uses manual optimization (`automatic_optimization = False`): its `training_step` "
                "steps its own optimizer, so the check cannot drive training on one batch. Overfit one batch by "
                "hand: `Trainer(overfit_batches=1)` with a few examples per batch."
            )
        batch, used, full = self._fixed_batch(ctx)
        switched = _stochastic_layers_off(module)

        def loss_fn() -> Tensor:
            return ctx.training_step_loss(batch, 0)

        targets: Tensor | None
        try:
            targets = ctx.adapter.get_targets(batch)
        except BatchNotUnderstood:
            targets = None  # the loss criterion still applies; no label check
        if self._graph_note is not None and targets is not None:
            targets = self._labelled_nodes(module, loss_fn, targets)

        def predict() -> Tensor | None:
            # the labels are a second opinion on the loss: a model whose forward the adapter cannot call
            # (or whose outputs it cannot read) is judged on the loss alone rather than skipped
            try:
                with torch.no_grad(), ctx.autocast():
                    return ctx.adapter.predict(module, ctx.adapter.get_inputs(batch))
            except Exception:  # noqa: BLE001
                return None

        try:
            inputs = ctx.adapter.get_inputs(batch)
        except BatchNotUnderstood:
            inputs = None
        # a single input tensor lets identical inputs with different labels be told apart from a failure
        # (not for the nodes of a graph: equal features with different labels are told apart by the edges)
        plain_inputs = inputs if isinstance(inputs, Tensor) and self._graph_note is None else None
        # which label each output position is trained towards, as the loss pairs them (a shift inside the model)
        alignment = ctx.alignment(batch) or Alignment()
        if alignment.shifted_twice:
            summary, hint = shifted_twice_text(alignment)
            return self.failed(summary, hint, {"alignment": asdict(alignment)})
        time_dim = alignment.input_time_dim if alignment.input_time_dim is not None else 1
        # what the loss compares, and how low it can go: a VAE's loss reads its inputs (its labels are unused),
        # and BCE against pixel intensities cannot fall below their entropy
        user = self.adapter
        explainer = InitLossCheck(inputs=user.inputs, targets=user.targets, forward=user.forward)
        reading = explainer.explain(ctx, batch)
        floor = loss_floor(reading) if reading is not None else 0.0
        if reading is not None and reading.against == "inputs":
            targets = None  # predictions are held to what the loss compares, not to labels it never reads

        def labels() -> Any:
            outputs = None if targets is None else predict()
            if outputs is None or targets is None:
                return None
            return decode_predictions(*alignment.apply(outputs, targets, plain_inputs), time_dim=time_dim)

        start = TrainingState.capture(module)
        evidence = overfit_batch(
            module.named_parameters(),
            loss_fn,
            reset=start.restore,
            labels=labels,
            lrs=self.lrs,
            max_steps=self.max_steps,
            loss_fraction=self.loss_fraction,
            fallback=_own_optimizer(ctx.trainer.optimizers),
            floor=floor,
            depends=lambda params: output_dependence(module, loss_fn, params),
        )
        outputs = predict() if evidence.attempts and evidence.loss_has_graph else None
        if outputs is not None and targets is not None:
            outputs, targets, _ = alignment.apply(outputs, targets)
        self._log(ctx, evidence, outputs, targets)
        result = self._verdict(evidence, outputs, targets, used, full, switched)
        if alignment.target_shift or alignment.input_shift is not None:
            result.details["alignment"] = asdict(alignment)
        if reading is not None:
            result.details.update(loss_reading=f"{reading.name} vs the {reading.against}", loss_floor=floor)
        if self._graph_note is None:
            return result
        return replace(
            result,
            summary=result.summary + self._graph_note,
            details={**result.details, "graph_nodes": used, "fitted": "whole graph"},
        )

    def _fixed_batch(self, ctx: CheckContext) -> tuple[Any, int, bool]:
        """The first ``num_examples`` examples of the first batch; the whole batch if slicing breaks it."""
        batch = ctx.batches[0]
        size = batch_size_of(ctx.adapter.get_inputs(batch))
        try:
            target = ctx.adapter.get_targets(batch)
            if target.ndim >= 1:
                size = int(target.shape[0])  # inputs may be time-major (T, N, ...)
        except BatchNotUnderstood:
            pass
        if size < 2:
            raise CheckSkipped(f"the first training batch has {size} example; overfitting needs at least 2.")
        k = min(self.num_examples, size)
        self._graph_note = None
        inputs = ctx.adapter.get_inputs(batch)
        adjacency = graph_adjacency(inputs, size, ctx.module) if k < size else None
        if adjacency is not None:
            # the examples are the nodes of one graph: cutting nodes out cuts their edges (and the few nodes
            # kept may hold no training label under a mask), so the graph is fitted whole, as training sees it
            where = "among the inputs" if any(t is adjacency for t in tensors_of(inputs)) else "held by the model"
            what = (
                f"a {tuple(adjacency.shape)} edge list"
                if tuple(adjacency.shape) != (size, size)
                else f"an ({size}, {size}) adjacency"
            )
            self._graph_note = (
                f" The batch is one graph of {size} nodes ({what} {where}): "
                "the whole graph was fitted, since cutting nodes out would cut their edges."
            )
            return batch, size, True
        if k == size:
            return batch, size, True
        sliced = _take(batch, k, size)
        if id(batch) in ctx.positions:  # the slice has the place in the pass of the batch it was cut from
            ctx.positions[id(sliced)] = ctx.positions[id(batch)]
        try:
            with torch.no_grad():
                ctx.training_step_loss(sliced, 0)
        except (CheckSkipped, BatchNotUnderstood):
            raise
        except Exception:  # noqa: BLE001 - the batch layout was not what we guessed: fit the whole batch
            return batch, size, True
        return sliced, k, False

    def _labelled_nodes(self, module: nn.Module, loss_fn: Any, targets: Tensor) -> Tensor:
        """The node labels with the nodes the loss never reads (outside a train mask) set to the ignore
        index, so the label check holds the fitted graph to the labels it was trained on."""
        if targets.is_floating_point() or targets.ndim < 1:
            return targets
        read = examples_in_loss(module, loss_fn, int(targets.shape[0]))
        if read is None or bool(read.all()) or not bool(read.any()):
            return targets
        self._graph_note = (self._graph_note or "") + (
            f" The loss reads {int(read.sum())} of the {len(read)} node labels (a train mask): predictions "
            "were compared with those."
        )
        shape = (-1,) + (1,) * (targets.ndim - 1)
        return targets.masked_fill(~read.to(targets.device).reshape(shape), IGNORE_INDEX)

    # -- verdict ----------------------------------------------------------------------------------
    def _verdict(
        self,
        ev: OverfitEvidence,
        outputs: Tensor | None,
        targets: Tensor | None,
        used: int,
        full: bool,
        switched: int,
    ) -> CheckResult:
        details = _details(ev, used, full, switched)
        frac = f"{self.loss_fraction:.0%}"
        frozen_note = _frozen_note(ev)
        if not ev.attempts:
            return self.failed(
                f"Every parameter of the model is frozen (requires_grad=False, {ev.frozen_numel:,} weights): "
                "nothing can learn, so the batch cannot be fitted.",
                "A `requires_grad_(False)` (or freezing loop) caught more than intended. Leave the layers you "
                "mean to train trainable: `module.requires_grad_(True)` on them.",
                details,
            )
        first = ev.attempts[0]
        start = first.start_loss
        if not math.isfinite(start):
            return self.failed(
                f"The loss is {start} on the batch before any update (expected a finite number).",
                "Look for log(0) or division by zero in the loss, NaN/Inf in the inputs or targets (check the "
                "data pipeline), or a target out of range for the loss. Fix the loss or the data, e.g. "
                "`F.cross_entropy` on logits instead of `log` of probabilities, or `clamp_min(eps)` before `log`.",
                details,
            )
        if start <= 0:
            raise CheckSkipped(
                f"the loss starts at {start:.4g} <= 0, so 'fall to {frac} of its start' means nothing "
                "(a loss that can be negative). Overfit this model by hand with `Trainer(overfit_batches=1)`."
            )
        if not ev.loss_has_graph:
            return self.failed(
                f"The loss {start:.4g} returned by `training_step` has no gradient: it does not depend on any "
                "trainable parameter, so nothing can learn.",
                "Something cuts the graph between the parameters and the loss: `.detach()`, `.item()`, "
                "`.numpy()`, `.data`, `torch.no_grad()` or `torch.tensor(loss)` in `forward` or `training_step`. "
                "Compute the loss from the model's output tensors directly.",
                details,
            )
        if ev.no_grad_params:
            share = ev.no_grad_numel / max(ev.trainable_numel, 1)
            every = len(ev.no_grad_params) == len(ev.trainable_params)
            what = (
                "none of the trainable parameters received a gradient"
                if every
                else f"{len(ev.no_grad_params)} of {len(ev.trainable_params)} trainable parameter tensors "
                f"({share:.1%} of the trainable weights) never received a gradient"
            )
            attempt = ev.attempts[0]
            fitted = (
                "; the rest fitted the batch anyway"
                if attempt.reached
                else f" (loss {attempt.start_loss:.4g} -> best {attempt.best_loss:.4g} in {attempt.steps} steps)"
            )
            return self.failed(
                f"Backpropagating the loss, {what}: {_names(ev.no_grad_params)}{fitted}. They will never train.",
                "The gradient does not reach them: a `.detach()`, `.data`, `.item()`/`.numpy()` round trip or "
                "`torch.no_grad()` between them and the loss (a detached trunk), a layer created in `__init__` "
                "but not used in `forward`, or weights that are all zero so the gradient through them is "
                "exactly zero (zero init: use the default init). Remove the cut; if a layer is unused on "
                "purpose, delete it or freeze it with `requires_grad_(False)`.",
                details,
            )
        decisive = ev.decisive
        assert decisive is not None
        if ev.passed:
            labels = _label_text(decisive)
            return self.passed(
                f"Fitted {used} examples: loss {start:.4g} -> {decisive.final_loss:.4g} ({_goal_text(ev)}) "
                f"in {decisive.steps} steps at {decisive.setting}{labels}.{frozen_note}",
                details,
            )
        return self._failure(ev, decisive, outputs, targets, details, frozen_note)

    def _failure(
        self,
        ev: OverfitEvidence,
        best: Attempt,
        outputs: Tensor | None,
        targets: Tensor | None,
        details: dict[str, Any],
        frozen_note: str,
    ) -> CheckResult:
        start = ev.start_loss
        lrs = ", ".join(f"{a.lr:g}" for a in ev.attempts if a.optimizer == "Adam")
        lrs += "".join(f" and {a.setting}" for a in ev.attempts if a.optimizer != "Adam")
        steps = ev.total_steps
        if all(a.stop == "nonfinite" for a in ev.attempts):
            where = ", ".join(
                f"step {a.nonfinite_step} at {a.setting}" + (f" (the loss raised {a.raised})" if a.raised else "")
                for a in ev.attempts
            )
            return self.failed(
                f"The loss became non-finite while fitting one batch at every learning rate tried ({where}); "
                f"it started at {start:.4g}.",
                "A loss that turns NaN/Inf on a few examples under Adam is numerically unstable: log of a "
                "probability that reaches 0, division by a norm or std that reaches 0, exp() of a growing "
                "value. Use the fused stable forms (`F.cross_entropy` / `F.binary_cross_entropy_with_logits` "
                "on logits, `logsumexp`), add eps to denominators, clamp before log.",
                details,
            )
        seen = (
            f"loss {start:.4g} -> best {best.best_loss:.4g} ({best.best_loss / start:.0%} of its start), final "
            f"{best.final_loss:.4g}, after {steps} steps at lr {lrs}; it must reach {ev.target_loss:.4g} "
            f"({_goal_text(ev)})"
        )
        labels_ok = best.all_match
        label_text = _label_text(best)
        probabilities = outputs is not None and targets is not None and looks_like_probabilities(outputs, targets)
        binary_probs = (
            outputs is not None
            and targets is not None
            and targets.is_floating_point()
            and is_binary(targets)
            and outputs.numel() == targets.numel()
            and bool(outputs.min() >= 0)
            and bool(outputs.max() <= 1)
        )
        flat_gradient = best.final_grad_norm is not None and best.final_grad_norm <= 1e-12
        if best.loss_fraction_met(ev.loss_fraction) and labels_ok is False:
            return self.failed(
                f"The loss fell ({seen.split(';')[0]}) but only {best.correct}/{best.total} labels are "
                "predicted: the loss is not fitting the labels the check reads.",
                "The loss optimises something other than the targets: a target column or key mix-up, labels "
                "shifted against the inputs, or outputs in another order than the targets. If your batch or "
                "output layout is unusual, pass `targets=` / `forward=` so the check reads the same labels and "
                "predictions as your loss.",
                details,
            )
        if probabilities or binary_probs:
            kind = "softmax" if probabilities else "sigmoid"
            loss = "cross_entropy" if probabilities else "binary_cross_entropy_with_logits"
            return self.failed(
                f"The loss stops at a floor: {seen}{label_text}. The model's outputs are already probabilities "
                f"(in [0, 1]{', summing to 1' if probabilities else ''}), so the loss applies {kind} a second "
                "time.",
                f"Double {kind}: `{loss}` applies {kind} itself, so the model must return raw logits. Remove "
                f"the `.{kind}()` at the end of `forward` (apply it only when you need probabilities, e.g. in "
                f"`predict_step`), or use the loss for probabilities (`nll_loss` on `log()` / `binary_cross_entropy`).",
                details,
            )
        if labels_ok:
            cause = (
                "the gradient is exactly zero there, so the loss is clamped or thresholded"
                if flat_gradient
                else "the loss cannot go lower"
            )
            return self.failed(
                f"Every prediction matches its label but the loss stops at a floor: {seen}; {cause}.",
                "A loss with a floor above zero: `.clamp(min=...)` / `max(loss, c)` on the loss, softmax or "
                "sigmoid applied before a loss that applies it again, label smoothing or a regulariser added to "
                "the loss. Remove the clamp or the extra activation; if the floor is on purpose (label "
                "smoothing, an auxiliary term), raise `loss_fraction` above it.",
                details,
            )
        if ev.frozen_params:
            share = ev.frozen_numel / max(ev.frozen_numel + ev.trainable_numel, 1)
            return self.failed(
                f"Could not fit {details['num_examples']} examples: {seen}{label_text}. "
                f"{len(ev.frozen_params)} parameter tensors ({share:.0%} of the weights) are frozen "
                f"(requires_grad=False): {_names(ev.frozen_params)}.",
                "The frozen parameters leave too little to learn with. If freezing them was not meant (a "
                "freezing loop matching too much, e.g. every '*weight'), make them trainable again with "
                "`requires_grad_(True)`; if it was, unfreeze enough of the model to fit a few examples.",
                details,
            )
        if flat_gradient:
            cause = "the gradient is exactly zero: the loss or the outputs are clamped/saturated"
        else:
            cause = "the loss plateaus above a floor"
        bounded = _bounded_outputs(outputs, targets)
        return self.failed(
            f"Could not fit {details['num_examples']} examples: {seen}{label_text}; {cause}.{bounded}",
            "A model that cannot memorise a few examples has a bug: outputs clamped or squashed (a final ReLU, "
            "sigmoid or tanh on a regression output, `.clamp` on outputs or loss), a loss floor, inputs that "
            "do not reach the model (zeroed, constant), targets that do not match the inputs. Inspect the "
            "`predictions` figure in TensorBoard, remove the clamp or squashing, and check what `training_step` "
            "compares.",
            details,
        )

    # -- logging ----------------------------------------------------------------------------------
    def _log(self, ctx: CheckContext, ev: OverfitEvidence, outputs: Tensor | None, targets: Tensor | None) -> None:
        trainer = ctx.trainer
        decisive = ev.decisive
        if decisive is None:
            return
        for step, value in enumerate(decisive.curve):
            if math.isfinite(value):
                _logging.log_scalars(trainer, {ctx.tag("loss"): value}, step=step)
        if trainer.global_rank != 0 or not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            return  # figures cost ~0.1 s each; skip them when nobody draws them
        _logging.log_figure(trainer, ctx.tag("loss_curve"), _loss_figure(ev), step=0)
        if outputs is not None and targets is not None:
            _logging.log_figure(
                trainer, ctx.tag("predictions"), _predictions_figure(outputs, targets, ev.attempts[-1].lr), step=0
            )


# -- helpers ----------------------------------------------------------------------------------------


def _own_optimizer(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[str, float, Any] | None:
    """The run's first optimizer as an attempt of its own: same class and settings, fresh state, on the
    trainable parameters. ``None`` when there is none or it has no learning rate."""
    if not optimizers or not isinstance(optimizers[0], torch.optim.Optimizer):
        return None
    if isinstance(optimizers[0], torch.optim.LBFGS):
        return None  # its step needs a closure
    opt = optimizers[0]
    defaults = dict(opt.defaults)
    lr = defaults.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        return None
    kind = type(opt)

    def make(params: list[nn.Parameter], rate: float) -> torch.optim.Optimizer:
        return kind(params, **{**defaults, "lr": rate})

    return f"your {kind.__name__}", float(lr), make


def _goal_text(ev: OverfitEvidence) -> str:
    """How low the loss must go, in words: a fraction of its start, or of the way down to its floor."""
    if ev.floor > 0:
        return (
            f"<= {ev.loss_fraction:.0%} of the way from its floor {ev.floor:.4g}, the entropy of the soft "
            "targets, to its start"
        )
    return f"<= {ev.loss_fraction:.0%} of its start"


def _label_text(attempt: Attempt) -> str:
    if attempt.total is None:
        return ""
    text = f"; {attempt.correct}/{attempt.total} labels predicted"
    if attempt.ambiguous:
        text += (
            f" ({attempt.ambiguous} undecidable, counted as predicted: another example has the same input "
            "and a different label)"
        )
    return text


def _stochastic_layers_off(module: nn.Module) -> int:
    """Eval mode for every module but batch-statistics normalisation (restored by the snapshot).

    Dropout is a regulariser, not part of what must fit, and it hides in places an ``nn.Dropout`` search
    misses (``nn.MultiheadAttention`` reads ``self.training``). BatchNorm stays in train mode: its running
    statistics have seen nothing yet. Returns how many modules were switched to eval."""
    count = 0
    for sub in module.modules():
        if sub.training and not isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.training = False  # per module: .eval() would recurse into the BatchNorm children
            count += 1
    return count


def _take(value: Any, k: int, size: int) -> Any:
    """The first ``k`` examples: tensors with ``size`` on dim 0 are cut there, else on dim 1 (time-major).
    Sparse tensors are cut with ``index_select`` (they have no strided views)."""

    def cut(t: Tensor) -> Tensor:
        if t.ndim >= 1 and t.shape[0] == size:
            return take_along(t, slice(0, k), 0)
        if t.ndim >= 2 and t.shape[1] == size:
            return take_along(t, slice(0, k), 1)
        return t

    return map_tensors(value, cut)


def _bounded_outputs(outputs: Tensor | None, targets: Tensor | None) -> str:
    if outputs is None or targets is None or not targets.is_floating_point() or outputs.numel() != targets.numel():
        return ""
    lo, hi = float(outputs.min()), float(outputs.max())
    tlo, thi = float(targets.min()), float(targets.max())
    if hi < thi - 1e-3 * abs(thi) - 1e-6 or lo > tlo + 1e-3 * abs(tlo) + 1e-6:
        return (
            f" The outputs stay within [{lo:.3g}, {hi:.3g}] while the targets span [{tlo:.3g}, {thi:.3g}]: "
            "the output cannot reach them (clamp, ReLU, sigmoid or tanh on the output?)."
        )
    return ""


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _frozen_note(ev: OverfitEvidence) -> str:
    if not ev.frozen_params:
        return ""
    share = ev.frozen_numel / max(ev.frozen_numel + ev.trainable_numel, 1)
    return (
        f" Note: {len(ev.frozen_params)} parameter tensors ({share:.0%} of the weights) are frozen "
        f"(requires_grad=False): {_names(ev.frozen_params)}."
    )


def _subsample(curve: Sequence[float], points: int = _CURVE_POINTS) -> list[float]:
    if len(curve) <= points:
        return [round(v, 6) if math.isfinite(v) else v for v in curve]
    stride = (len(curve) - 1) / (points - 1)
    return [_subsample([curve[round(i * stride)]])[0] for i in range(points)]


def _details(ev: OverfitEvidence, used: int, full: bool, switched: int) -> dict[str, Any]:
    decisive = ev.decisive
    attempts = [
        {
            "lr": a.lr,
            "optimizer": a.optimizer,
            "start_loss": a.start_loss,
            "final_loss": a.final_loss,
            "best_loss": a.best_loss,
            "steps": a.steps,
            "stop": a.stop,
            "nonfinite_step": a.nonfinite_step,
            "raised": a.raised or None,
            "correct": a.correct,
            "total": a.total,
            "ambiguous": a.ambiguous,
        }
        for a in ev.attempts
    ]
    accuracy = None
    if decisive is not None and decisive.total:
        assert decisive.correct is not None  # an attempt sets correct and total together (diagnostics/overfit.py)
        accuracy = decisive.correct / decisive.total
    return {
        "num_examples": used,
        "whole_batch": full,
        "modules_in_eval_mode": switched,
        "loss_fraction": ev.loss_fraction,
        "start_loss": ev.start_loss,
        "target_loss": ev.target_loss,
        "final_loss": None if decisive is None else decisive.final_loss,
        "best_loss": None if decisive is None else decisive.best_loss,
        "steps": None if decisive is None else decisive.steps,
        "total_steps": ev.total_steps,
        "lr": None if decisive is None else decisive.lr,
        "lrs_tried": [a.lr for a in ev.attempts],
        "attempts": attempts,
        "accuracy": accuracy,
        "no_grad_params": list(ev.no_grad_params),
        "frozen_params": list(ev.frozen_params),
        "loss_curve": [] if decisive is None else _subsample(decisive.curve),
    }


def _loss_figure(ev: OverfitEvidence) -> Any:
    figure = _logging.new_figure()
    ax = figure.add_subplot()
    for attempt in ev.attempts:
        values = [v if math.isfinite(v) and v > 0 else float("nan") for v in attempt.curve]
        ax.plot(range(len(values)), values, label=f"{attempt.setting} ({attempt.stop})")
    ax.axhline(ev.target_loss, color="gray", linestyle="--", label=f"{ev.loss_fraction:.0%} of start")
    if ev.target_loss > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step on the fixed batch")
    ax.set_ylabel("training_step loss")
    ax.set_title("Overfit one batch: loss")
    ax.legend(fontsize="small")
    return figure


def _predictions_figure(outputs: Tensor, targets: Tensor, lr: float) -> Any:
    figure = _logging.new_figure()
    ax = figure.add_subplot()
    decoded = decode_predictions(outputs, targets)
    if decoded is not None:
        labels = decoded.labels[:256].cpu().numpy()
        predicted = decoded.predicted[:256].cpu().numpy()
        index = range(len(labels))
        ax.scatter(index, labels, marker="o", s=60, facecolors="none", edgecolors="tab:blue", label="label")
        ax.scatter(index, predicted, marker="x", color="tab:red", label="predicted")
        ax.set_xlabel("example (or position)")
        ax.set_ylabel("class")
        ax.set_title(f"Overfit one batch: {decoded.correct}/{decoded.total} labels predicted (lr {lr:g})")
    else:
        n = min(outputs.numel(), targets.numel(), 256)
        y = targets.detach().float().flatten()[:n].cpu().numpy()
        p = outputs.detach().float().flatten()[:n].cpu().numpy()
        ax.scatter(y, p, s=20)
        if n:
            lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--")
        ax.set_xlabel("target")
        ax.set_ylabel("prediction")
        ax.set_title(f"Overfit one batch: targets vs predictions (lr {lr:g})")
    if decoded is not None:
        ax.legend(fontsize="small")
    return figure
