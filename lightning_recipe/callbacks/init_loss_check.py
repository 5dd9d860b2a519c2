"""InitLossCheck: the loss at initialisation is where a model that knows nothing should start.

Recipe items "verify loss @ init" and "init well". The math is in
:mod:`lightning_recipe.diagnostics.init_loss`; this file gathers outputs, targets and the user's own loss,
and words the verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import check_choice, check_int, check_integer
from lightning_recipe.callbacks._context import CheckContext, shifted_twice_text
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.diagnostics.batch import (
    BatchNotUnderstood,
    ChildForward,
    ForwardFn,
    InputsFn,
    TargetsFn,
    all_finite,
    default_forward,
    default_targets,
    first_tensor,
    is_sparse,
    select_output,
    tensors_of,
    value_stats,
)
from lightning_recipe.diagnostics.init_loss import (
    CONSISTENT_RATIO,
    OFFSET_STDS,
    REGRESSION_LOSSES,
    SECOND_PASS_RATIO,
    Assessment,
    Reading,
    References,
    assess,
    consistent_readings,
    loss_readings,
    loss_views,
    output_stats,
    references,
    standard_loss,
)
from lightning_recipe.diagnostics.task import IGNORE_INDEX, TASKS, Alignment, TaskNotInferred, TaskView, is_binary
from lightning_recipe.report import CheckResult

__all__ = ["InitLossCheck"]

#: biases with more entries than this are described, not listed, in messages and details
_MAX_LISTED = 100
#: inputs whose mean or std exceeds this are called unnormalised in the hint
_RAW_INPUT_SCALE = 5.0


class InitLossCheck(PreflightCheck):
    """Measures the loss at initialisation and holds it to *chance* and the *prior-optimal* constant.

    The loss is what your own ``training_step`` returns (``self.log`` silenced, no gradients), averaged
    over the first ``num_batches`` training batches. The task is read from the model's outputs and the
    targets (see :func:`~lightning_recipe.diagnostics.task.task_views`) or given as ``task=``, after the
    alignment the loss itself shows (a model that shifts ``labels = input_ids`` inside its loss).

    A reading is used only when it explains the loss: the standard loss of the outputs under that reading
    (cross-entropy, BCE on logits, BCE on probabilities, MSE, L1; by mean, by sum, or summed per example)
    must agree with the measured loss (see :func:`~lightning_recipe.diagnostics.init_loss.loss_readings`). A
    summed loss is held to the per-term references times the number of terms. With the default targets, a
    loss that compares the outputs with the inputs (an autoencoder whose batch carries an unused label) is
    read that way. A loss no reading explains (an ELBO, a contrastive or GAN loss, a weighted sum) is
    ``skipped``, naming ``expected=`` (and ``targets=`` when the outputs have an input's size): never failed
    on a misreading.

    Fails when the loss is far above chance (``ln C`` for softmax, ``ln 2`` per label for BCE, ``E[y^2]``
    for MSE, ``E|y|`` for L1: final layer too large, unnormalised inputs, a large bias), when a regression
    model's outputs start :data:`~lightning_recipe.diagnostics.init_loss.OFFSET_STDS` target standard
    deviations or more from the targets' mean, when the loss is far below the best input-independent
    constant (labels leaking into inputs), and when labels are shifted twice (by the user and again by the
    model's loss). Thresholds are in :func:`~lightning_recipe.diagnostics.init_loss.tolerance_above` and
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
        on_fail: str = "raise",
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
    ) -> None:
        super().__init__(on_fail=on_fail, inputs=inputs, targets=targets, forward=forward)
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
        module = ctx.module
        manual = not module.automatic_optimization
        losses: list[float] = []
        target_forms: list[list[tuple[str, TaskView]]] = []
        seen_pairs: list[tuple[Tensor, Any]] = []  # (outputs, inputs) per batch, read against the inputs if need be
        examples: list[int] = []
        not_inferred: TaskNotInferred | None = None
        first_inputs: Any = None
        per_channel = False
        misread = False  # the outputs have an input's size, not the targets': an autoencoder read as a classifier
        same_pass = True  # every batch's outputs are the ones its loss was computed from
        alignment = Alignment()
        with torch.no_grad():
            for index, batch in enumerate(ctx.batches):
                seen: Tensor | None = None
                if not manual:
                    loss, seen = self._loss_and_outputs(ctx, batch, index)
                    losses.append(loss)
                inputs = ctx.adapter.get_inputs(batch)
                first_inputs = inputs if first_inputs is None else first_inputs
                if seen is not None:
                    outputs = seen
                else:
                    same_pass = False
                    with ctx.autocast():
                        outputs = ctx.adapter.predict(module, inputs)
                seen_pairs.append((outputs, inputs))
                per_channel = outputs.ndim >= 4
                examples.append(int(outputs.shape[0]) if outputs.ndim else 1)
                try:
                    targets = ctx.adapter.get_targets(batch)
                    if index == 0 and not manual:
                        # the model's own loss may shift (labels = input_ids): read once, how the loss pairs them
                        alignment = ctx.alignment(batch) or Alignment()
                        if alignment.shifted_twice:
                            summary, hint = shifted_twice_text(alignment)
                            return self.failed(summary, hint, {"alignment": asdict(alignment)})
                    outputs, targets, _ = alignment.apply(outputs, targets)
                    misread |= targets.numel() != outputs.numel() and any(
                        x.numel() == outputs.numel() for x in _tensors(inputs)
                    )
                    if targets.ndim:
                        examples[-1] = int(targets.shape[0])
                    target_forms.append(
                        loss_views(outputs, targets, self.task, self.regression_loss, self.ignore_index)
                    )
                except (TaskNotInferred, BatchNotUnderstood) as error:
                    not_inferred = error if isinstance(error, TaskNotInferred) else TaskNotInferred(str(error))
        readings = loss_readings(target_forms, examples) if not_inferred is None else []
        if not readings and not_inferred is None and (self.expected is None or manual):
            raise CheckSkipped(
                "the batches disagree on how outputs and targets fit a task; pass `task=` or `expected=`."
            )
        if manual:
            # `training_step` steps the optimizer itself: the loss is the standard one of the likeliest reading
            if not readings:
                raise CheckSkipped(str(not_inferred))
            means = [r for r in readings if r.reduction == "mean"]
            losses = [means[0].value]
        measured = sum(losses) / len(losses)
        details: dict[str, Any] = {
            "alignment": asdict(alignment) if alignment.target_shift or alignment.input_shift is not None else None,
            "measured_loss": measured,
            "per_batch_losses": losses,
            "loss_source": "inferred" if manual else "training_step",
            "batches": len(ctx.batches),
            "expected": self.expected,
            "inputs": _input_stats(first_inputs),
            "readings": {f"{r.name} vs {r.against}": r.value for r in readings},
        }
        if not math.isfinite(measured):
            return self._non_finite(measured, details, first_inputs, readings[0].view if readings else None)
        ratio = CONSISTENT_RATIO if same_pass else SECOND_PASS_RATIO
        details["consistency_ratio"] = ratio
        tried = list(readings)
        reading = self._reading(readings, seen_pairs, examples, measured, manual, details, ratio, tried)
        if reading is None and self.expected is None:
            raise CheckSkipped(_unexplained(measured, tried, not_inferred, misread or not readings))
        view = reading.view if reading is not None else None
        refs = references(view) if view is not None else None
        scale = reading.scale if reading is not None else 1.0
        if view is not None and refs is not None and reading is not None:
            details.update(_view_details(view, refs, reading))
            details["per_channel"] = per_channel and view.loss_kind != "cross_entropy"
            with torch.no_grad():
                details["standard_loss"] = float(standard_loss(view))
            details["final_layer"] = _final_layer(module, view.width)
        elif not_inferred is not None:
            details["task_not_inferred"] = str(not_inferred)
        verdict = assess(
            measured if self.expected is not None else measured / scale,
            view.loss_kind if view is not None else None,
            refs,
            self.expected,
            rows=view.rows if view is not None else 0,
            width=view.width if view is not None else 1,
        )
        details.update(reason=verdict.reason, reference=verdict.reference, limit=verdict.limit)
        self._log(ctx, details)
        return self._verdict(measured, verdict, reading, refs, details)

    def explain(self, ctx: CheckContext, batch: Any) -> Reading | None:
        """The reading that explains the loss ``training_step`` returns on ``batch`` (against the targets, else
        an input), found as :meth:`run` finds it; ``None`` when none does, or the model optimizes manually.
        OverfitOneBatch asks it which targets the loss compares and how low the loss can go."""
        if not ctx.module.automatic_optimization:
            return None
        with torch.no_grad():
            measured, seen = self._loss_and_outputs(ctx, batch, 0)
            inputs = ctx.adapter.get_inputs(batch)
            if seen is None:
                with ctx.autocast():
                    seen_outputs = ctx.adapter.predict(ctx.module, inputs)
            else:
                seen_outputs = seen
            examples = [int(seen_outputs.shape[0]) if seen_outputs.ndim else 1]
            forms: list[list[tuple[str, TaskView]]] = []
            try:
                targets = ctx.adapter.get_targets(batch)
                outputs, targets, _ = (ctx.alignment(batch) or Alignment()).apply(seen_outputs, targets)
                examples = [int(targets.shape[0]) if targets.ndim else 1]
                forms = [loss_views(outputs, targets, self.task, self.regression_loss, self.ignore_index)]
            except (TaskNotInferred, BatchNotUnderstood):
                pass
        readings = loss_readings(forms, examples) if forms else []
        ratio = CONSISTENT_RATIO if seen is not None else SECOND_PASS_RATIO
        return self._reading(readings, [(seen_outputs, inputs)], examples, measured, False, {"readings": {}}, ratio, [])

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
        self,
        readings: list[Reading],
        seen_pairs: list[tuple[Tensor, Any]],
        examples: list[int],
        measured: float,
        manual: bool,
        details: dict[str, Any],
        ratio: float,
        tried: list[Reading],
    ) -> Reading | None:
        """The reading that explains the measured loss: against the targets first, else against an input
        (only with the default targets). With ``expected=`` and nothing explaining the loss, ``None``."""
        if manual:
            return next(r for r in readings if r.reduction == "mean")
        found = consistent_readings(readings, measured, ratio)
        if found:
            return found[0]
        input_forms = [self._forms_against_inputs(outputs, inputs) for outputs, inputs in seen_pairs]
        count = min((len(forms) for forms in input_forms), default=0)
        for i in range(count):
            candidates = loss_readings([forms[i] for forms in input_forms], examples, against="inputs")
            details["readings"].update({f"{r.name} vs {r.against}": r.value for r in candidates})
            tried.extend(candidates)
            found = consistent_readings(candidates, measured, ratio)
            if found:
                return found[0]
        return None

    def _log(self, ctx: CheckContext, details: dict[str, Any]) -> None:
        scalars = {
            ctx.tag("measured_loss"): details["measured_loss"],
            ctx.tag("chance_loss"): details.get("chance_loss"),
            ctx.tag("prior_optimal_loss"): details.get("prior_optimal_loss"),
            ctx.tag("expected_loss"): details.get("expected"),
            ctx.tag("logit_std"): details.get("logit_std", details.get("output_std")),
        }
        _logging.log_scalars(ctx.trainer, {k: float(v) for k, v in scalars.items() if v is not None}, step=0)

    # -- wording -----------------------------------------------------------------------------------
    def _verdict(
        self,
        measured: float,
        verdict: Assessment,
        reading: Reading | None,
        refs: References | None,
        details: dict[str, Any],
    ) -> CheckResult:
        view = reading.view if reading is not None else None
        what = _describe_task(reading)
        per = measured / reading.scale if reading is not None else measured
        if self.expected is not None:
            head = f"measured {measured:.4g} vs expected ~{self.expected:.4g} (`expected=`){what}"
        else:
            assert refs is not None and view is not None and reading is not None
            if reading.reduction == "mean":
                head = f"measured {measured:.4g} vs expected ~{refs.chance:.4g} ({_chance_name(view)})"
            else:
                head = (
                    f"measured {measured:.4g} = {per:.4g} x {reading.scale:.4g} terms ({reading.name}) vs expected "
                    f"~{refs.chance:.4g} per term ({_chance_name(view)})"
                )
            head += f", prior-optimal {refs.prior_optimal:.4g}{what}"
        if verdict.ok:
            channels = bool(details.get("per_channel"))
            hint = _bias_advice(view, refs, per, channels) if verdict.bias_advice and view and refs else None
            return self.passed(f"{head}: within the healthy range.", details, hint)
        summary, hint = _failure_text(verdict, measured, per, view, refs, details, head)
        return self.failed(summary, hint, details)

    def _non_finite(self, measured: float, details: dict[str, Any], inputs: Any, view: TaskView | None) -> CheckResult:
        if not all_finite(inputs):
            cause = "the inputs contain NaN or inf: clean the data (or the transform that produces them)"
        elif view is not None and not bool(torch.isfinite(view.outputs).all()):
            cause = (
                "the model's outputs are already NaN/inf at initialisation: look for a log/sqrt/division of "
                "zero or a broken init in forward"
            )
        elif view is not None and not bool(torch.isfinite(view.targets).all()):
            cause = "the targets contain NaN or inf: clean the labels"
        else:
            cause = "the loss in `training_step` produces it (log of zero, division by zero, a bad reduction)"
        return self.failed(
            f"measured a non-finite loss ({measured}) at initialisation; training cannot start from it.",
            f"Likely cause: {cause}. Run one batch by hand and check each step for NaN with torch.isfinite.",
            details,
        )


# -- helpers ---------------------------------------------------------------------------------------


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _describe_task(reading: Reading | None) -> str:
    if reading is None:
        return ""
    view = reading.view
    against = ", read against the model's inputs" if reading.against == "inputs" else ""
    if view.loss_kind == "cross_entropy":
        return f" for {view.width}-class cross-entropy{against}"
    if view.loss_kind == "bce":
        on = " on probabilities" if reading.form == "bce_probabilities" else ""
        if is_binary(view.targets):
            return f" for {view.task} BCE{on} over {view.width} label(s){against}"
        return f" for BCE{on} against targets in [0, 1] over {view.width} output(s){against}"
    return f" for {view.loss_kind.upper()} regression over {view.width} output(s){against}"


def _chance_name(view: TaskView) -> str:
    return {
        "cross_entropy": f"chance: ln {view.width}",
        "bce": "chance: ln 2 per label" if is_binary(view.targets) else "chance: ln 2 per output",
        "mse": "chance: E[y^2]",
        "l1": "chance: E|y|",
    }[view.loss_kind]


def _view_details(view: TaskView, refs: References, reading: Reading) -> dict[str, Any]:
    """The reading's numbers. ``chance_loss`` and ``prior_optimal_loss`` are in the units of the measured loss
    (times ``loss_scale`` for a summed loss), so they plot on one chart with it; ``*_per_term`` are per term."""
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
    if view.width <= _MAX_LISTED:
        details["prior"] = refs.prior
        details["suggested_final_bias"] = refs.suggested_bias
    return details


def _tensors(value: Any) -> list[Tensor]:
    """The dense tensors in ``value`` (sparse inputs, a graph's adjacency, are never read as targets)."""
    return [t for t in tensors_of(value) if not is_sparse(t)]


def _unexplained(measured: float, readings: list[Reading], not_inferred: TaskNotInferred | None, misread: bool) -> str:
    """Why no reading explains the measured loss, and what to pass: ``expected=``, and ``targets=`` when the
    targets do not look like what the loss compares the outputs with."""
    if not readings and not_inferred is not None:
        return str(not_inferred)
    nearest = sorted(readings, key=lambda r: r.distance(measured))[:3]
    listing = "; ".join(
        f"{r.name}{' against the inputs' if r.against == 'inputs' else ''} gives {r.value:.4g}" for r in nearest
    )
    text = (
        f"the loss `training_step` returns ({measured:.4g}) is not a standard loss of the outputs "
        f"(nearest readings: {listing}). It is likely a custom loss (an ELBO, a contrastive or GAN loss, a "
        "weighted sum of terms, a scaled loss), which has no chance level this check can derive; if it should "
        "be one of these, check the loss in `training_step` (its reduction, its scale, the `dim` of any "
        "softmax). Pass `InitLossCheck(expected=...)` with the loss you expect at initialisation"
    )
    if misread:
        text += (
            ", and `targets=lambda batch: ...` returning what the loss compares the outputs with (the outputs "
            "have the size of an input, not of the targets read from the batch: an autoencoder?)"
        )
    return text + "."


def _input_stats(inputs: Any) -> dict[str, Any] | None:
    """Statistics of the first input tensor, sparse ones included (their implicit zeros count)."""
    x = first_tensor(inputs)
    return None if x is None else value_stats(x)


def _final_layer(module: nn.Module, width: int) -> dict[str, Any] | None:
    """The last layer (in registration order) whose weight produces ``width`` outputs: the final layer."""
    found = None
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, nn.Embedding) or not isinstance(weight, Tensor) or weight.ndim < 2:
            continue
        if weight.shape[0] == width:
            found = (name, sub)
    if found is None:
        return None
    name, sub = found
    bias = getattr(sub, "bias", None)
    info: dict[str, Any] = {"name": name, "weight_std": float(sub.weight.detach().float().std())}
    if isinstance(bias, Tensor):
        b = bias.detach().float()
        info.update(bias_mean=float(b.mean()), bias_abs_max=float(b.abs().max()))
    return info


def _layer_name(details: dict[str, Any]) -> str:
    layer = details.get("final_layer")
    return f" `{layer['name']}`" if layer else ""


def _bias_values(view: TaskView, refs: References, per_channel: bool = False) -> str:
    """The bias that reaches the prior-optimal loss, as a noun phrase that completes "set the bias to ...":
    the values when there are few, else how to compute them (the batches read here are too small a sample).
    ``per_channel``: the outputs are ``(N, C, H, W)``, one bias per channel."""
    channel = " (one per output channel)" if per_channel else ""
    narrow = view.width <= _MAX_LISTED
    if view.loss_kind == "cross_entropy":
        if narrow:
            return f"the log class priors {_fmt(refs.suggested_bias)}"
        return (
            f"the log class priors, log(n_c / n) from the count n_c of each of the {view.width} classes in your "
            "training set (too many to list, and too few rows here to estimate them)"
        )
    if view.loss_kind == "bce":
        if narrow:
            return f"the log odds log(p/(1-p)) = {_fmt(refs.suggested_bias)}{channel}"
        return (
            f"the log odds log(p/(1-p)) of each of the {view.width} outputs, p its mean target over your training "
            "set (too many to list here)"
        )
    if narrow:
        return f"{_fmt(refs.suggested_bias)}{channel}"
    return (
        f"the {'mean' if view.loss_kind == 'mse' else 'median'} of each of the {view.width} target columns over your "
        "training set (too many to list here)"
    )


def _offset_text(view: TaskView, refs: References) -> str:
    o_mean = float(view.outputs.double().mean())
    # the spread offset_stds is measured in: within each output column (channel), not across them
    spread = float(view.targets.double().var(0, unbiased=False).mean().sqrt()) if view.rows > 1 else float("nan")
    return (
        f"the outputs start at mean {o_mean:.4g}, {refs.extra.get('offset_stds', float('nan')):.3g} target "
        f"standard deviations (std {spread:.4g}) from the targets' mean"
        + (f" {_fmt(refs.prior)}" if view.width <= _MAX_LISTED else "")
    )


def _bias_advice(view: TaskView, refs: References, measured: float, per_channel: bool = False) -> str:
    bias = _bias_values(view, refs, per_channel)
    narrow = view.width <= _MAX_LISTED
    if view.loss_kind == "cross_entropy":
        prior = (
            f"class prior {_fmt(refs.prior)}"
            if narrow
            else f"{view.width} classes, {refs.imbalance:.3g} nats from uniform"
        )
        return (
            f"the labels are imbalanced ({prior}), and the loss at init ({measured:.4g}) sits near chance rather "
            f"than the prior-optimal {refs.prior_optimal:.4g}. Set the final layer's bias to {bias} (e.g. "
            "`final.bias.data = torch.tensor(log_priors)`): training then skips the hockey stick."
        )
    if view.loss_kind == "bce":
        rate = f"mean target {_fmt(refs.prior)}" if narrow else f"{view.width} outputs"
        what = "labels are imbalanced" if is_binary(view.targets) else "targets' means are far from 0.5"
        return (
            f"the {what} ({rate}), and the loss at init ({measured:.4g}) sits near ln 2 rather than "
            f"the prior-optimal {refs.prior_optimal:.4g}. Set the final layer's bias to {bias}: training then "
            "skips the hockey stick."
        )
    return (
        f"{_offset_text(view, refs)}; setting the final bias to {bias} with `nn.init.constant_(final.bias, ...)`, or "
        f"standardising the targets starts the loss at ~{refs.prior_optimal:.4g} instead of ~{measured:.4g}. "
        f"Not a failure: an offset under {OFFSET_STDS:g} target stds is learnt in the first tens of steps."
    )


def _failure_text(
    verdict: Assessment,
    measured: float,
    per: float,
    view: TaskView | None,
    refs: References | None,
    details: dict[str, Any],
    head: str,
) -> tuple[str, str]:
    reason = verdict.reason
    layer = _layer_name(details)
    if reason in ("above_chance", "above_expected"):
        where = "chance" if reason == "above_chance" else "`expected=`"
        summary = f"{head}: far above {where} (limit {verdict.limit:.4g})."
        return summary, _too_high_hint(view, refs, details, layer, reason == "above_expected")
    if reason == "target_offset":
        assert view is not None and refs is not None
        stds = refs.extra.get("offset_stds", float("nan"))
        summary = (
            f"{head}: the outputs start {stds:.3g} target standard deviations from the targets' mean (limit "
            f"{verdict.limit:g}); the offset alone costs {stds**2:.3g}x the target variance."
        )
        hint = (
            f"{_offset_text(view, refs)}, so the first steps only learn the offset (hockey-stick loss). Set the "
            f"final bias to {_bias_values(view, refs, bool(details.get('per_channel')))} "
            f"with `nn.init.constant_(final.bias, value)` on the final "
            f"layer{layer}, or standardise the targets to zero mean and unit variance."
        )
        return summary, hint
    if reason == "below_prior":
        summary = (
            f"{head}: far below the prior-optimal loss (limit {verdict.limit:.4g}): the model predicts the "
            "targets before training."
        )
    else:
        summary = f"{head}: far below `expected=` (limit {verdict.limit:.4g})."
    hint = (
        "a model at initialisation cannot beat the best input-independent guess, so the labels probably leak "
        "into the inputs (a target column among the features, next-token targets not shifted, a copy path "
        "from input to output). Check what the model sees against what it predicts. If the model is "
        f"pretrained or warm-started this is expected: pass `InitLossCheck(expected={measured:.3g})` or "
        '`on_fail="warn"`.'
    )
    return summary, hint


def _too_high_hint(
    view: TaskView | None, refs: References | None, details: dict[str, Any], layer: str, vs_expected: bool
) -> str:
    causes: list[str] = []
    inputs = details.get("inputs") or {}
    scale = max(abs(inputs.get("mean", 0.0)), inputs.get("std", 0.0))
    if scale > _RAW_INPUT_SCALE:
        causes.append(
            f"the inputs are not normalised (mean {inputs['mean']:.4g}, std {inputs['std']:.4g}): normalise "
            "inputs to zero mean and unit variance (subtract the dataset mean, divide by its std; for 0..255 "
            "pixels divide by 255 first)"
        )
    if view is not None and view.task != "regression":
        offset, within = details.get("offset_std", 0.0), details.get("within_std", 0.0)
        std = details.get("logit_std", 0.0)
        final = details.get("final_layer") or {}
        large_bias = final["bias_abs_max"] > 2.0 if "bias_abs_max" in final else offset > within and offset > 1.0
        if large_bias:
            bias = _bias_values(view, refs) if refs is not None else "zeros"
            causes.append(
                f"a large constant offset in the logits (per-class mean logits spread {offset:.3g}, more "
                f"than the {within:.3g} the inputs move them): the final layer's bias{layer} is too large. "
                f"Set the final bias to zeros, or to {bias}"
            )
        if std > 1.0 or not causes:
            weight_std = (details.get("final_layer") or {}).get("weight_std", float("nan"))
            causes.append(
                f"the logits are too large (std {std:.3g}; a default init gives ~0.3-1, a uniform guess 0): "
                f"the final layer{layer}'s weights are too large (weight std {weight_std:.3g}). Scale the "
                "final layer's weights down: `nn.init.zeros_(final.weight)` or multiply them by 0.01 at init"
            )
    elif view is not None:
        causes.append(
            f"the outputs (std {details.get('output_std', float('nan')):.3g}) are much larger than the targets "
            f"(std {(refs.extra.get('target_std', float('nan')) if refs else float('nan')):.3g}): scale the "
            f"final layer{layer}'s weights down (`nn.init.zeros_` or multiply by 0.01), or standardise the targets"
        )
    else:
        causes.append("the final layer's weights are too large, or the inputs are not normalised")
    if vs_expected:
        causes.append("or `expected=` is not the loss this model has at init: check the value")
    if len(causes) == 1:
        return f"Likely cause: {causes[0]}."
    return "Likely causes, most likely first: " + "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1)) + "."
