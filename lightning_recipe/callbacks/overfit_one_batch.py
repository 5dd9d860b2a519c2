"""OverfitOneBatch: the recipe's "overfit one batch", run before the first optimizer step of ``fit``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from lightning_recipe._args import check_fraction, check_int, check_positive
from lightning_recipe.callbacks._context import CheckContext, shifted_twice_text
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._overfit_report import details, log_run
from lightning_recipe.callbacks._overfit_text import wording
from lightning_recipe.callbacks._preflight import CheckOptions, PreflightCheck
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.diagnostics.alignment import Alignment
from lightning_recipe.diagnostics.batch import BatchNotUnderstood, batch_size_of
from lightning_recipe.diagnostics.dependence import output_dependence
from lightning_recipe.diagnostics.labels import Decoded, decode_predictions
from lightning_recipe.diagnostics.loss_reading import loss_floor
from lightning_recipe.diagnostics.overfit import (
    DEFAULT_LOSS_FRACTION,
    DEFAULT_LRS,
    DEFAULT_MAX_STEPS,
    OverfitEvidence,
    overfit_batch,
)
from lightning_recipe.diagnostics.overfit_cause import Cause, OutputFacts, diagnose
from lightning_recipe.diagnostics.sparse import examples_in_loss, graph_adjacency, slice_batch
from lightning_recipe.diagnostics.state import TrainingState
from lightning_recipe.diagnostics.task import IGNORE_INDEX
from lightning_recipe.diagnostics.walk import tensors_of
from lightning_recipe.report import CheckResult

__all__ = ["OverfitOneBatch"]


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
        **options: Unpack[CheckOptions],
    ) -> None:
        super().__init__(**options)
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

        targets, plain_inputs = self._targets_and_inputs(ctx, batch, loss_fn)
        # which label each output position is trained towards, as the loss pairs them (a shift inside the model)
        alignment = ctx.alignment(batch) or Alignment()
        if alignment.shifted_twice:
            summary, hint = shifted_twice_text(alignment)
            return self.failed(summary, hint, {"alignment": asdict(alignment)})
        # what the loss compares, and how low it can go: a VAE's loss reads its inputs (its labels are unused),
        # and BCE against pixel intensities cannot fall below their entropy
        user = self.adapter
        reading = InitLossCheck(inputs=user.inputs, targets=user.targets, forward=user.forward).explain(ctx, batch)
        floor = loss_floor(reading) if reading is not None else 0.0
        if reading is not None and reading.against == "inputs":
            targets = None  # predictions are held to what the loss compares, not to labels it never reads
        predict = _predictor(ctx, batch)
        labels = _label_reader(predict, targets, plain_inputs, alignment)
        evidence = self._fit(ctx, loss_fn, labels, floor)
        outputs = predict() if evidence.attempts and evidence.loss_has_graph else None
        if outputs is not None and targets is not None:
            outputs, targets, _ = alignment.apply(outputs, targets)
        log_run(ctx, evidence, outputs, targets)
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

    def _targets_and_inputs(
        self, ctx: CheckContext, batch: Any, loss_fn: Callable[[], Tensor]
    ) -> tuple[Tensor | None, Tensor | None]:
        """The labels the predictions are checked against (``None`` when the batch has none we can read), and
        the input tensor when it is a single one: identical inputs with different labels are then told apart
        from a failure (not for the nodes of a graph: equal features with different labels differ by edges)."""
        targets: Tensor | None
        try:
            targets = ctx.adapter.get_targets(batch)
        except BatchNotUnderstood:
            targets = None  # the loss criterion still applies; no label check
        if self._graph_note is not None and targets is not None:
            targets = self._labelled_nodes(ctx.module, loss_fn, targets)
        try:
            inputs = ctx.adapter.get_inputs(batch)
        except BatchNotUnderstood:
            inputs = None
        return targets, inputs if isinstance(inputs, Tensor) and self._graph_note is None else None

    def _fit(
        self, ctx: CheckContext, loss_fn: Callable[[], Tensor], labels: Callable[[], Decoded | None], floor: float
    ) -> OverfitEvidence:
        """:func:`overfit_batch` from the model's current state, which every attempt starts from."""
        module = ctx.module
        start = TrainingState.capture(module)
        return overfit_batch(
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
        sliced = slice_batch(batch, slice(0, k), size, (0, 1))  # inputs may be time-major
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
        """The cause :func:`diagnose` names, in the words of ``_overfit_text.TEXT``."""
        numbers = details(ev, used, full, switched)
        facts = OutputFacts() if ev.passed else OutputFacts.read(outputs, targets)  # a pass needs no explaining
        diagnosis = diagnose(ev, facts)
        summary, hint = wording(diagnosis, ev, facts, used)
        if diagnosis.cause is Cause.NONPOSITIVE_START:
            raise CheckSkipped(summary)
        if diagnosis.cause is Cause.FITTED:
            return self.passed(summary, numbers)
        return self.failed(summary, hint, numbers)


# -- helpers ----------------------------------------------------------------------------------------


def _predictor(ctx: CheckContext, batch: Any) -> Callable[[], Tensor | None]:
    """The model's outputs on ``batch``, without a graph; ``None`` when they cannot be read."""

    def predict() -> Tensor | None:
        # the labels are a second opinion on the loss: a model whose forward the adapter cannot call
        # (or whose outputs it cannot read) is judged on the loss alone rather than skipped
        try:
            with torch.no_grad(), ctx.autocast():
                return ctx.adapter.predict(ctx.module, ctx.adapter.get_inputs(batch))
        except Exception:  # noqa: BLE001
            return None

    return predict


def _label_reader(
    predict: Callable[[], Tensor | None], targets: Tensor | None, plain_inputs: Tensor | None, alignment: Alignment
) -> Callable[[], Decoded | None]:
    """The predictions decoded against ``targets`` as the loss pairs them; ``None`` without labels or outputs."""
    time_dim = alignment.input_time_dim if alignment.input_time_dim is not None else 1

    def labels() -> Decoded | None:
        outputs = None if targets is None else predict()
        if outputs is None or targets is None:
            return None
        return decode_predictions(*alignment.apply(outputs, targets, plain_inputs), time_dim=time_dim)

    return labels


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
