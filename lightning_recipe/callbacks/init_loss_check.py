"""InitLossCheck: the loss at initialisation is where a model that knows nothing should start.

Recipe items "verify loss @ init" and "init well". The math is in
:mod:`lightning_recipe.diagnostics.init_loss`; this file gathers outputs, targets and the user's own loss,
and words the verdict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import check_choice, check_int
from lightning_recipe.callbacks._preflight import CheckContext, CheckSkipped, PreflightCheck
from lightning_recipe.diagnostics.batch import (
    BatchNotUnderstood,
    ForwardFn,
    InputsFn,
    TargetsFn,
    all_finite,
    first_tensor,
    value_stats,
)
from lightning_recipe.diagnostics.init_loss import (
    REGRESSION_LOSSES,
    Assessment,
    References,
    assess,
    choose_view,
    output_stats,
    references,
    standard_loss,
    tolerance_above,
)
from lightning_recipe.diagnostics.task import IGNORE_INDEX, TASKS, TaskNotInferred, TaskView, merge_views, task_views
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
    targets (see :func:`~lightning_recipe.diagnostics.init_loss.task_views`) or given as ``task=``.

    Fails when the loss is far above chance (``ln C`` for softmax, ``ln 2`` per label for BCE, ``E[y^2]``
    for MSE, ``E|y|`` for L1: final layer too large, unnormalised inputs, a large bias), when a regression
    model pays mostly for a target mean its bias does not have, and when the loss is far below the best
    input-independent constant (labels leaking into inputs). Thresholds are in
    :func:`~lightning_recipe.diagnostics.init_loss.tolerance_above` and ``tolerance_below``. Imbalanced
    labels with a bias that does not express them pass, with a hint giving the exact bias values.

    Args:
        task: ``"auto"`` (default), ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        expected: the loss you expect at init (a custom loss, a pretrained or warm-started model); replaces
            chance and prior-optimal as the reference.
        regression_loss: ``"auto"`` (MSE or L1, whichever chance is closer to the measured loss),
            ``"mse"`` or ``"l1"``.
        num_batches: how many training batches to average over.
        ignore_index: class label left out of classification targets (``-100``, as in PyTorch).
        on_fail, inputs, targets, forward: see :class:`~lightning_recipe.callbacks._preflight.PreflightCheck`.

    Example::

        trainer = L.Trainer(callbacks=[InitLossCheck()])
        trainer.fit(model, datamodule)  # RecipeCheckError with the fix when the init is off

    Logged (step 0): ``recipe/init_loss_check/{measured_loss, chance_loss, prior_optimal_loss, logit_std}``.
    """

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
            isinstance(expected, bool) or not isinstance(expected, (int, float)) or not math.isfinite(expected)
        ):
            raise ValueError(f"Expected `expected` to be a finite number or None, but got {expected!r}.")
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
        per_batch: list[list[TaskView]] = []
        not_inferred: TaskNotInferred | None = None
        first_inputs: Any = None
        with torch.no_grad():
            for index, batch in enumerate(ctx.batches):
                if not manual:
                    losses.append(float(ctx.training_step_loss(batch, index).detach().float()))
                inputs = ctx.adapter.get_inputs(batch)
                first_inputs = inputs if first_inputs is None else first_inputs
                try:
                    targets = ctx.adapter.get_targets(batch)
                    with ctx.autocast():
                        outputs = ctx.adapter.predict(module, inputs)
                    per_batch.append(
                        task_views(outputs, targets, self.task, self.regression_loss, self.ignore_index)
                    )
                except (TaskNotInferred, BatchNotUnderstood) as error:
                    if self.expected is None or manual:
                        raise CheckSkipped(str(error)) from error
                    not_inferred = error if isinstance(error, TaskNotInferred) else TaskNotInferred(str(error))
        views = merge_views(per_batch) if not_inferred is None else []
        if not views and (self.expected is None or manual):
            raise CheckSkipped(
                "the batches disagree on how outputs and targets fit a task; pass `task=` or `expected=`."
            )
        if manual:
            view = choose_view(views)
            with torch.no_grad():
                losses = [float(standard_loss(view))]
        measured = sum(losses) / len(losses)
        view = choose_view(views, measured) if views else None
        details: dict[str, Any] = {
            "measured_loss": measured,
            "per_batch_losses": losses,
            "loss_source": "inferred" if manual else "training_step",
            "batches": len(ctx.batches),
            "expected": self.expected,
            "inputs": _input_stats(first_inputs),
        }
        if not math.isfinite(measured):
            return self._non_finite(measured, details, first_inputs, view)
        refs = references(view) if view is not None else None
        if view is not None and refs is not None:
            details.update(_view_details(view, refs))
            with torch.no_grad():
                details["standard_loss"] = float(standard_loss(view))
            details["final_layer"] = _final_layer(module, view.width)
        elif not_inferred is not None:
            details["task_not_inferred"] = str(not_inferred)
        verdict = assess(
            measured,
            view.loss_kind if view is not None else None,
            refs,
            self.expected,
            rows=view.rows if view is not None else 0,
            width=view.width if view is not None else 1,
        )
        details.update(reason=verdict.reason, reference=verdict.reference, limit=verdict.limit)
        self._log(ctx, details)
        return self._verdict(measured, verdict, view, refs, details)

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
        view: TaskView | None,
        refs: References | None,
        details: dict[str, Any],
    ) -> CheckResult:
        what = _describe_task(view)
        if self.expected is not None:
            head = f"measured {measured:.4g} vs expected ~{self.expected:.4g} (`expected=`){what}"
        else:
            assert refs is not None and view is not None
            head = (
                f"measured {measured:.4g} vs expected ~{refs.chance:.4g} ({_chance_name(view)}), "
                f"prior-optimal {refs.prior_optimal:.4g}{what}"
            )
        if verdict.ok:
            hint = _bias_advice(view, refs, measured) if verdict.bias_advice and view and refs else None
            return self.passed(f"{head}: within the healthy range.", details, hint)
        summary, hint = _failure_text(verdict, measured, view, refs, details, head)
        return self.failed(summary, hint, details)

    def _non_finite(
        self, measured: float, details: dict[str, Any], inputs: Any, view: TaskView | None
    ) -> CheckResult:
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


def _describe_task(view: TaskView | None) -> str:
    if view is None:
        return ""
    if view.loss_kind == "cross_entropy":
        return f" for {view.width}-class cross-entropy"
    if view.loss_kind == "bce":
        return f" for {view.task} BCE over {view.width} label(s)"
    return f" for {view.loss_kind.upper()} regression over {view.width} output(s)"


def _chance_name(view: TaskView) -> str:
    return {
        "cross_entropy": f"chance: ln {view.width}",
        "bce": "chance: ln 2 per label",
        "mse": "chance: E[y^2]",
        "l1": "chance: E|y|",
    }[view.loss_kind]


def _view_details(view: TaskView, refs: References) -> dict[str, Any]:
    details: dict[str, Any] = {
        "task": view.task,
        "loss_kind": view.loss_kind,
        "layout": view.layout,
        "num_classes": view.width if view.task != "regression" else None,
        "num_outputs": view.width,
        "rows": view.rows,
        "chance_loss": refs.chance,
        "prior_optimal_loss": refs.prior_optimal,
        **output_stats(view),
        **refs.extra,
    }
    if view.task != "regression":
        details["imbalance_nats"] = refs.imbalance
    if view.width <= _MAX_LISTED:
        details["prior"] = refs.prior
        details["suggested_final_bias"] = refs.suggested_bias
    return details


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


def _bias_values(view: TaskView, refs: References) -> str:
    if view.width <= _MAX_LISTED:
        return _fmt(refs.suggested_bias)
    return "the log class frequencies of your training data (`details['prior']` is too short a sample here)"


def _bias_advice(view: TaskView, refs: References, measured: float) -> str:
    bias = _bias_values(view, refs)
    if view.loss_kind == "cross_entropy":
        return (
            f"the labels are imbalanced (class prior {_fmt(refs.prior) if view.width <= _MAX_LISTED else '...'}), "
            f"and the loss at init ({measured:.4g}) sits near chance rather than the prior-optimal "
            f"{refs.prior_optimal:.4g}. Set the final layer's bias to the log class priors {bias} (e.g. "
            "`final.bias.data = torch.tensor(log_priors)`): training then skips the hockey stick."
        )
    if view.loss_kind == "bce":
        return (
            f"the labels are imbalanced (positive rate {_fmt(refs.prior)}), and the loss at init ({measured:.4g}) "
            f"sits near ln 2 rather than the prior-optimal {refs.prior_optimal:.4g}. Set the final layer's "
            f"bias to the log odds log(p/(1-p)) = {bias}: training then skips the hockey stick."
        )
    return (
        f"the targets are offset from zero (mean {_fmt(refs.prior)}); set the final bias to {bias} "
        f"(`nn.init.constant_(final.bias, ...)`) or standardise the targets, and the loss starts at "
        f"~{refs.prior_optimal:.4g} instead of ~{refs.chance:.4g}."
    )


def _failure_text(
    verdict: Assessment,
    measured: float,
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
        std = refs.extra.get("target_std", float("nan"))
        summary = (
            f"{head}: {measured / max(refs.prior_optimal, 1e-12):.3g}x the prior-optimal loss: the targets' "
            f"mean is far from the zero the output starts at."
        )
        hint = (
            f"the targets have mean {_fmt(refs.prior)} (std {std:.4g}) while the model starts near 0, so the "
            f"first steps only learn the offset (hockey-stick loss). Set the final bias to "
            f"{_bias_values(view, refs)} (`nn.init.constant_(final.bias, value)` on the final layer{layer}), "
            "or standardise the targets to zero mean and unit variance."
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
        "`on_fail=\"warn\"`."
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
    standard = details.get("standard_loss")
    healthy_outputs = (
        view is not None
        and refs is not None
        and standard is not None
        and standard <= refs.chance + tolerance_above(view.loss_kind, refs.chance)
    )
    if healthy_outputs and not vs_expected and view is not None:
        # the outputs are fine as logits/predictions; what turns them into the loss is not
        causes.append(
            f"the outputs look healthy (the standard {view.loss_kind} loss on them is {standard:.4g}) but "
            f"`training_step` turns them into a loss of {details['measured_loss']:.4g}: check the loss "
            "function and the `dim` of any softmax/log_softmax (over the batch instead of the classes, applied "
            "twice), the reduction, and the loss's scale"
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
                f"Set the final bias to zeros, or to the prior values {bias}"
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
