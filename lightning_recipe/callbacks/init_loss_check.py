"""InitLossCheck: the loss at initialisation is where a model that knows nothing should start.

Recipe items "verify loss @ init" and "init well". The math is in
:mod:`lightning_recipe.diagnostics.init_loss` (the references), :mod:`~lightning_recipe.diagnostics.loss_reading`
(which standard loss the measured one is) and :mod:`~lightning_recipe.diagnostics.init_loss_cause` (the verdict
and its causes); the words in :mod:`lightning_recipe.callbacks._init_loss_text`. This file gathers outputs,
targets and the user's own loss, and hands them from one to the next.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_choice, check_int, check_integer
from lightning_recipe.callbacks._context import CheckContext, shifted_twice_text
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._init_loss_text import MAX_LISTED, non_finite_text, unexplained, wording
from lightning_recipe.callbacks._preflight import CheckOptions, PreflightCheck
from lightning_recipe.diagnostics.alignment import Alignment
from lightning_recipe.diagnostics.batch import (
    BatchNotUnderstood,
    ChildForward,
    default_forward,
    default_targets,
    select_output,
)
from lightning_recipe.diagnostics.init_loss import (
    REGRESSION_LOSSES,
    References,
    output_stats,
    references,
    standard_loss,
)
from lightning_recipe.diagnostics.init_loss_cause import (
    FinalLayer,
    InitLossCause,
    diagnose_high_loss,
    final_layer,
    judge_init_loss,
    non_finite_cause,
)
from lightning_recipe.diagnostics.loss_reading import (
    CONSISTENT_RATIO,
    SECOND_PASS_RATIO,
    Reading,
    consistent_readings,
    loss_readings,
    loss_views,
)
from lightning_recipe.diagnostics.sparse import all_finite, is_sparse, value_stats
from lightning_recipe.diagnostics.task import IGNORE_INDEX, TASKS, TaskNotInferred, TaskView
from lightning_recipe.diagnostics.walk import first_tensor, tensors_of
from lightning_recipe.report import CheckResult

__all__ = ["InitLossCheck"]


@dataclass
class _Seen:
    """What one pass over the check's batches saw, batch by batch: the losses ``training_step`` returned, the
    outputs each was computed from (with the inputs, read against them if the targets explain nothing), and
    the task views of outputs against targets."""

    losses: list[float] = field(default_factory=list)
    forms: list[list[tuple[str, TaskView]]] = field(default_factory=list)
    pairs: list[tuple[Tensor, Any]] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    alignment: Alignment = field(default_factory=Alignment)
    not_inferred: TaskNotInferred | None = None
    first_inputs: Any = None
    per_channel: bool = False
    misread: bool = False  # the outputs have an input's size, not the targets': an autoencoder read as a classifier
    same_pass: bool = True  # every batch's outputs are the ones its loss was computed from

    @property
    def ratio(self) -> float:
        """How close a reading must land to the measured loss: closer when the outputs are the loss's own."""
        return CONSISTENT_RATIO if self.same_pass else SECOND_PASS_RATIO


class InitLossCheck(PreflightCheck):
    """Measures the loss at initialisation and holds it to *chance* and the *prior-optimal* constant.

    The loss is what your own ``training_step`` returns (``self.log`` silenced, no gradients), averaged
    over the first ``num_batches`` training batches. The task is read from the model's outputs and the
    targets (see :func:`~lightning_recipe.diagnostics.task.task_views`) or given as ``task=``, after the
    alignment the loss itself shows (a model that shifts ``labels = input_ids`` inside its loss).

    A reading is used only when it explains the loss: the standard loss of the outputs under that reading
    (cross-entropy, BCE on logits, BCE on probabilities, MSE, L1; by mean, by sum, or summed per example)
    must agree with the measured loss (see :func:`~lightning_recipe.diagnostics.loss_reading.loss_readings`). A
    summed loss is held to the per-term references times the number of terms. With the default targets, a
    loss that compares the outputs with the inputs (an autoencoder whose batch carries an unused label) is
    read that way. A loss no reading explains (an ELBO, a contrastive or GAN loss, a weighted sum) is
    ``skipped``, naming ``expected=`` (and ``targets=`` when the outputs have an input's size): never failed
    on a misreading.

    Fails when the loss is far above chance (``ln C`` for softmax, ``ln 2`` per label for BCE, ``E[y^2]``
    for MSE, ``E|y|`` for L1: final layer too large, unnormalised inputs, a large bias), when a regression
    model's outputs start :data:`~lightning_recipe.diagnostics.init_loss_cause.OFFSET_STDS` target standard
    deviations or more from the targets' mean, when the loss is far below the best input-independent
    constant (labels leaking into inputs), and when labels are shifted twice (by the user and again by the
    model's loss). Thresholds are in :func:`~lightning_recipe.diagnostics.init_loss_cause.tolerance_above` and
    ``tolerance_below``. Imbalanced labels and smaller target offsets pass, with a hint giving the exact
    bias values (one per class, label, output column, or output channel of an ``(N, C, H, W)`` output).

    Args:
        task: ``"auto"`` (default), ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        expected: the loss you expect at init (a custom loss, a pretrained or warm-started model); replaces
            chance and prior-optimal as the reference.
        regression_loss: ``"auto"`` (MSE or L1, whichever explains the measured loss), ``"mse"`` or ``"l1"``.
        num_batches: how many training batches to average over.
        ignore_index: class label left out of classification targets (``-100``, as in PyTorch).
        on_fail, inputs, targets, forward: see :class:`~lightning_recipe.callbacks._preflight.PreflightCheck`.

    Example::

        trainer = L.Trainer(callbacks=[InitLossCheck()])
        trainer.fit(model, datamodule)  # RecipeCheckError with the fix when the init is off

    Logged (step 0): ``recipe/init_loss_check/{measured_loss, chance_loss, prior_optimal_loss, logit_std}``.
    """

    needs_loss = True  # passes over batches on which `training_step` returns None

    def __init__(
        self,
        *,
        task: str = "auto",
        expected: float | None = None,
        regression_loss: str = "auto",
        num_batches: int = 4,
        ignore_index: int = IGNORE_INDEX,
        **options: Unpack[CheckOptions],
    ) -> None:
        super().__init__(**options)
        check_choice("task", task, TASKS)
        check_choice("regression_loss", regression_loss, REGRESSION_LOSSES)
        check_int("num_batches", num_batches, 1)
        if expected is not None and (
            isinstance(expected, bool) or not isinstance(expected, (int, float)) or not 0 <= expected < math.inf
        ):
            raise ValueError(
                f"Expected `expected` to be the loss at initialization, a finite number >= 0, or None, but got "
                f"{expected!r}."
            )
        check_integer("ignore_index", ignore_index)
        self.task = task
        self.expected = None if expected is None else float(expected)
        self.regression_loss = regression_loss
        self.num_batches = num_batches  # type: ignore[misc]  # per instance; the base reads self.num_batches
        self.ignore_index = ignore_index

    # -- measuring ---------------------------------------------------------------------------------
    @override
    def run(self, ctx: CheckContext) -> CheckResult:
        """Measure the loss over the batches, find the reading that explains it, and judge it: a non-finite loss
        fails before any reading is needed, and a loss nothing explains is skipped unless ``expected=`` is given."""
        manual = not ctx.module.automatic_optimization
        seen = _Seen()
        with torch.no_grad():
            for index, batch in enumerate(ctx.batches):
                shifted_twice = self._read_batch(ctx, batch, index, manual, seen)
                if shifted_twice is not None:
                    return shifted_twice
        readings = self._candidate_readings(seen, manual)
        measured = sum(seen.losses) / len(seen.losses)
        details = self._measured_details(ctx, seen, readings, measured, manual)
        if not math.isfinite(measured):
            view = readings[0].view if readings else None
            summary, hint = non_finite_text(non_finite_cause(all_finite(seen.first_inputs), view), measured)
            return self.failed(summary, hint, details)
        details["consistency_ratio"] = seen.ratio
        reading, against_inputs = self._reading(readings, seen, measured, manual)
        details["readings"].update({f"{r.name} vs {r.against}": r.value for r in against_inputs})
        if reading is None and self.expected is None:
            tried = readings + against_inputs
            raise CheckSkipped(unexplained(measured, tried, seen.not_inferred, seen.misread or not readings))
        return self._judge(ctx, measured, reading, seen, details)

    def _read_batch(self, ctx: CheckContext, batch: Any, index: int, manual: bool, seen: _Seen) -> CheckResult | None:
        """Add ``batch``'s loss, outputs and task views to ``seen``; the failure of labels shifted twice, read
        on the first batch from how the model's own loss pairs outputs and labels (``labels = input_ids``)."""
        outputs: Tensor | None = None
        if not manual:
            loss, outputs = self._loss_and_outputs(ctx, batch, index)
            seen.losses.append(loss)
        inputs = ctx.adapter.get_inputs(batch)
        seen.first_inputs = inputs if seen.first_inputs is None else seen.first_inputs
        if outputs is None:
            seen.same_pass = False
            with ctx.autocast():
                outputs = ctx.adapter.predict(ctx.module, inputs)
        seen.pairs.append((outputs, inputs))
        seen.per_channel = outputs.ndim >= 4
        seen.examples.append(int(outputs.shape[0]) if outputs.ndim else 1)
        try:
            targets = ctx.adapter.get_targets(batch)
            if index == 0 and not manual:
                seen.alignment = ctx.alignment(batch) or Alignment()
                if seen.alignment.shifted_twice:
                    summary, hint = shifted_twice_text(seen.alignment)
                    return self.failed(summary, hint, {"alignment": asdict(seen.alignment)})
            self._read_targets(outputs, targets, inputs, seen)
        except (TaskNotInferred, BatchNotUnderstood) as error:
            seen.not_inferred = error if isinstance(error, TaskNotInferred) else TaskNotInferred(str(error))
        return None

    def _read_targets(self, outputs: Tensor, targets: Tensor, inputs: Any, seen: _Seen) -> None:
        """The task views of ``outputs`` against ``targets``, aligned as the loss pairs them."""
        outputs, targets, _ = seen.alignment.apply(outputs, targets)
        seen.misread |= targets.numel() != outputs.numel() and any(
            x.numel() == outputs.numel() for x in _tensors(inputs)
        )
        if targets.ndim:
            seen.examples[-1] = int(targets.shape[0])
        seen.forms.append(loss_views(outputs, targets, self.task, self.regression_loss, self.ignore_index))

    def _candidate_readings(self, seen: _Seen, manual: bool) -> list[Reading]:
        """Every reading of the outputs against the targets, the likeliest first. Under manual optimization
        `training_step` steps the optimizer itself and is never called: the loss is then the standard one of the
        likeliest reading, and nothing to read is a skip."""
        readings = loss_readings(seen.forms, seen.examples) if seen.not_inferred is None else []
        if not readings and seen.not_inferred is None and (self.expected is None or manual):
            raise CheckSkipped(
                "the batches disagree on how outputs and targets fit a task; pass `task=` or `expected=`."
            )
        if manual:
            if not readings:
                raise CheckSkipped(str(seen.not_inferred))
            means = [r for r in readings if r.reduction == "mean"]
            seen.losses = [means[0].value]
        return readings

    def _measured_details(
        self, ctx: CheckContext, seen: _Seen, readings: list[Reading], measured: float, manual: bool
    ) -> dict[str, Any]:
        """The numbers every result carries, whatever the reading: the loss, where it came from, the inputs."""
        alignment = seen.alignment
        return {
            "alignment": asdict(alignment) if alignment.target_shift or alignment.input_shift is not None else None,
            "measured_loss": measured,
            "per_batch_losses": seen.losses,
            "loss_source": "inferred" if manual else "training_step",
            "batches": len(ctx.batches),
            "expected": self.expected,
            "inputs": _input_stats(seen.first_inputs),
            "readings": {f"{r.name} vs {r.against}": r.value for r in readings},
        }

    def _judge(
        self, ctx: CheckContext, measured: float, reading: Reading | None, seen: _Seen, details: dict[str, Any]
    ) -> CheckResult:
        """Hold the measured loss to ``expected=`` or to the references of ``reading``, and word the verdict."""
        view = reading.view if reading is not None else None
        refs = references(view) if view is not None else None
        layer: FinalLayer | None = None
        if reading is not None and refs is not None:
            layer = final_layer(ctx.module, reading.view.width)
            details.update(_view_details(reading, refs, seen.per_channel, layer))
        elif seen.not_inferred is not None:
            details["task_not_inferred"] = str(seen.not_inferred)
        verdict = judge_init_loss(
            measured if self.expected is not None or reading is None else measured / reading.scale,
            view.loss_kind if view is not None else None,
            refs,
            self.expected,
            rows=view.rows if view is not None else 0,
            width=view.width if view is not None else 1,
        )
        details.update(reason=verdict.reason.value, reference=verdict.reference, limit=verdict.limit)
        self._log(ctx, details)
        high = None
        if verdict.reason in (InitLossCause.ABOVE_CHANCE, InitLossCause.ABOVE_EXPECTED):
            vs_expected = verdict.reason is InitLossCause.ABOVE_EXPECTED
            high = diagnose_high_loss(view, refs, details["inputs"], layer, vs_expected)
        layer_name = f" `{layer.name}`" if layer is not None else ""
        channels = bool(details.get("per_channel"))
        summary, hint = wording(verdict, measured, self.expected, reading, refs, high, layer_name, channels)
        if verdict.ok:
            return self.passed(summary, details, hint)
        assert hint is not None  # every failure has a hint
        return self.failed(summary, hint, details)

    def explain(self, ctx: CheckContext, batch: Any) -> Reading | None:
        """The reading that explains the loss ``training_step`` returns on ``batch`` (against the targets, else
        an input), found as :meth:`run` finds it; ``None`` when none does, or the model optimizes manually.
        OverfitOneBatch asks it which targets the loss compares and how low the loss can go."""
        if not ctx.module.automatic_optimization:
            return None
        seen = _Seen()
        with torch.no_grad():
            if self._read_batch(ctx, batch, 0, False, seen) is not None:
                return None  # labels shifted twice: no reading explains the loss until that is fixed
        readings = loss_readings(seen.forms, seen.examples) if seen.forms else []
        return self._reading(readings, seen, seen.losses[0], False)[0]

    def _loss_and_outputs(self, ctx: CheckContext, batch: Any, index: int) -> tuple[float, Tensor | None]:
        """The loss ``training_step`` returns on ``batch``, and the outputs that loss was computed from when
        ``training_step`` called the module once (``self(x)``, or the one model a module without ``forward``
        wraps) and the default ``forward`` reads them: the same
        dropout mask and the same VAE sample, so a standard loss of them equals the measured loss exactly.
        ``None`` for the outputs otherwise (a second forward pass is then needed)."""
        module: nn.Module = ctx.module
        forward = ctx.adapter.forward
        if isinstance(forward, ChildForward):  # no `forward`: training_step calls the model it wraps
            module = getattr(module, forward.name)
        hookable = self.adapter.forward is default_forward and getattr(module, "_compiled_call_impl", None) is None
        calls: list[Any] = []
        handle = module.register_forward_hook(lambda _m, _a, out: calls.append(out)) if hookable else None
        try:
            loss = float(ctx.training_step_loss(batch, index).detach().float())
        finally:
            if handle is not None:
                handle.remove()
        if len(calls) != 1:
            return loss, None
        try:
            return loss, select_output(calls[0]).detach()
        except BatchNotUnderstood:
            return loss, None

    def _forms_against_inputs(self, outputs: Tensor, inputs: Any) -> list[list[tuple[str, TaskView]]]:
        """The readings of the outputs against each input tensor: what an autoencoder's loss compares them
        with, or a loss that (by mistake) trains towards the inputs. Tried only with the default targets."""
        if self.adapter.targets is not default_targets:
            return []
        forms = []
        for x in _tensors(inputs):
            try:
                forms.append(loss_views(outputs, x, self.task, self.regression_loss, self.ignore_index))
            except TaskNotInferred:
                forms.append([])
        return forms

    def _reading(
        self, readings: list[Reading], seen: _Seen, measured: float, manual: bool
    ) -> tuple[Reading | None, list[Reading]]:
        """The reading that explains the measured loss: against the targets first, else against an input
        (only with the default targets); ``None`` when nothing does. Second, the readings against the inputs
        tried on the way, for the result's details and the skip message."""
        if manual:
            return next(r for r in readings if r.reduction == "mean"), []
        found = consistent_readings(readings, measured, seen.ratio)
        if found:
            return found[0], []
        tried: list[Reading] = []
        input_forms = [self._forms_against_inputs(outputs, inputs) for outputs, inputs in seen.pairs]
        count = min((len(forms) for forms in input_forms), default=0)
        for i in range(count):
            candidates = loss_readings([forms[i] for forms in input_forms], seen.examples, against="inputs")
            tried.extend(candidates)
            found = consistent_readings(candidates, measured, seen.ratio)
            if found:
                return found[0], tried
        return None, tried

    def _log(self, ctx: CheckContext, details: dict[str, Any]) -> None:
        scalars = {
            ctx.tag("measured_loss"): details["measured_loss"],
            ctx.tag("chance_loss"): details.get("chance_loss"),
            ctx.tag("prior_optimal_loss"): details.get("prior_optimal_loss"),
            ctx.tag("expected_loss"): details.get("expected"),
            ctx.tag("logit_std"): details.get("logit_std", details.get("output_std")),
        }
        _logging.log_scalars(ctx.trainer, {k: float(v) for k, v in scalars.items() if v is not None}, step=0)


# -- helpers ---------------------------------------------------------------------------------------


def _view_details(reading: Reading, refs: References, per_channel: bool, layer: FinalLayer | None) -> dict[str, Any]:
    """The reading's numbers. ``chance_loss`` and ``prior_optimal_loss`` are in the units of the measured loss
    (times ``loss_scale`` for a summed loss), so they plot on one chart with it; ``*_per_term`` are per term."""
    view = reading.view
    details: dict[str, Any] = {
        "task": view.task,
        "loss_kind": view.loss_kind,
        "loss_form": reading.form,
        "reduction": reading.reduction,
        "loss_scale": reading.scale,
        "read_against": reading.against,
        "layout": view.layout,
        "num_classes": view.width if view.task != "regression" else None,
        "num_outputs": view.width,
        "rows": view.rows,
        "chance_loss": refs.chance * reading.scale,
        "prior_optimal_loss": refs.prior_optimal * reading.scale,
        "chance_per_term": refs.chance,
        "prior_optimal_per_term": refs.prior_optimal,
        **output_stats(view),
        **refs.extra,
    }
    if view.task != "regression":
        details["imbalance_nats"] = refs.imbalance
    if view.width <= MAX_LISTED:
        details["prior"] = refs.prior
        details["suggested_final_bias"] = refs.suggested_bias
    details["per_channel"] = per_channel and view.loss_kind != "cross_entropy"
    with torch.no_grad():
        details["standard_loss"] = float(standard_loss(view))
    details["final_layer"] = layer.as_details() if layer is not None else None
    return details


def _tensors(value: Any) -> list[Tensor]:
    """The dense tensors in ``value`` (sparse inputs, a graph's adjacency, are never read as targets)."""
    return [t for t in tensors_of(value) if not is_sparse(t)]


def _input_stats(inputs: Any) -> dict[str, Any] | None:
    """Statistics of the first input tensor, sparse ones included (their implicit zeros count)."""
    x = first_tensor(inputs)
    return None if x is None else value_stats(x)
