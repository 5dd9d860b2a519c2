"""InitLossCheck's words: one table from each cause to its summary and hint.

The diagnostics decide (:func:`~lightning_recipe.diagnostics.init_loss_cause.judge_init_loss`,
:func:`~lightning_recipe.diagnostics.init_loss_cause.diagnose_high_loss`,
:func:`~lightning_recipe.diagnostics.init_loss_cause.non_finite_cause`); this module only says it. A template
names the numbers it shows, and :class:`Numbers` computes each one when a template asks for it (a passing
verdict has no limit crossed, a classifier no target offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_recipe.diagnostics.init_loss import References
from lightning_recipe.diagnostics.init_loss_cause import (
    OFFSET_STDS,
    Assessment,
    HighLoss,
    HighLossCause,
    InitLossCause,
    NonFiniteCause,
)
from lightning_recipe.diagnostics.loss_reading import Reading
from lightning_recipe.diagnostics.task import TaskNotInferred, TaskView, is_binary

__all__ = [
    "MAX_LISTED",
    "TEXT",
    "Numbers",
    "bias_advice",
    "bias_values",
    "head",
    "non_finite_text",
    "unexplained",
    "wording",
]

#: biases with more entries than this are described, not listed, in messages and details
MAX_LISTED = 100

_LEAK_HINT = (
    "a model at initialisation cannot beat the best input-independent guess, so the labels probably leak "
    "into the inputs (a target column among the features, next-token targets not shifted, a copy path "
    "from input to output). Check what the model sees against what it predicts. If the model is "
    'pretrained or warm-started this is expected: pass `InitLossCheck(expected={measured:.3g})` or `on_fail="warn"`.'
)

#: verdict -> (summary template, hint template); ``None`` for a hint that depends on more than the numbers (the
#: causes of a loss too high, the bias advice of a pass). Templates name :class:`Numbers`' fields.
TEXT: dict[InitLossCause, tuple[str, str | None]] = {
    InitLossCause.OK: ("{head}: within the healthy range.", None),
    InitLossCause.ABOVE_CHANCE: ("{head}: far above chance (limit {limit:.4g}).", None),
    InitLossCause.ABOVE_EXPECTED: ("{head}: far above `expected=` (limit {limit:.4g}).", None),
    InitLossCause.TARGET_OFFSET: (
        "{head}: the outputs start {offset_stds:.3g} target standard deviations from the targets' mean (limit "
        "{limit:g}); the offset alone costs {offset_cost:.3g}x the target variance.",
        "{offset_text}, so the first steps only learn the offset (hockey-stick loss). Set the final bias to "
        "{channel_bias} with `nn.init.constant_(final.bias, value)` on the final layer{layer}, or standardise the "
        "targets to zero mean and unit variance.",
    ),
    InitLossCause.BELOW_PRIOR: (
        "{head}: far below the prior-optimal loss (limit {limit:.4g}): the model predicts the targets before training.",
        _LEAK_HINT,
    ),
    InitLossCause.BELOW_EXPECTED: ("{head}: far below `expected=` (limit {limit:.4g}).", _LEAK_HINT),
}

#: likely cause of a loss too high -> its words, templates over :class:`HighLoss`' numbers and ``layer``/``bias``
HIGH_LOSS_TEXT: dict[HighLossCause, str] = {
    HighLossCause.RAW_INPUTS: (
        "the inputs are not normalised (mean {input_mean:.4g}, std {input_std:.4g}): normalise inputs to zero mean "
        "and unit variance (subtract the dataset mean, divide by its std; for 0..255 pixels divide by 255 first)"
    ),
    HighLossCause.LARGE_BIAS: (
        "a large constant offset in the logits (per-class mean logits spread {offset_std:.3g}, more than the "
        "{within_std:.3g} the inputs move them): the final layer's bias{layer} is too large. Set the final bias "
        "to zeros, or to {bias}"
    ),
    HighLossCause.LARGE_LOGITS: (
        "the logits are too large (std {logit_std:.3g}; a default init gives ~0.3-1, a uniform guess 0): the final "
        "layer{layer}'s weights are too large (weight std {weight_std:.3g}). Scale the final layer's weights down: "
        "`nn.init.zeros_(final.weight)` or multiply them by 0.01 at init"
    ),
    HighLossCause.LARGE_OUTPUTS: (
        "the outputs (std {output_std:.3g}) are much larger than the targets (std {target_std:.3g}): scale the "
        "final layer{layer}'s weights down (`nn.init.zeros_` or multiply by 0.01), or standardise the targets"
    ),
    HighLossCause.UNKNOWN_SCALE: "the final layer's weights are too large, or the inputs are not normalised",
    HighLossCause.WRONG_EXPECTED: "or `expected=` is not the loss this model has at init: check the value",
}

#: where a non-finite loss comes from -> the cause and its fix
NON_FINITE_TEXT: dict[NonFiniteCause, str] = {
    NonFiniteCause.INPUTS: "the inputs contain NaN or inf: clean the data (or the transform that produces them)",
    NonFiniteCause.OUTPUTS: (
        "the model's outputs are already NaN/inf at initialisation: look for a log/sqrt/division of zero or a "
        "broken init in forward"
    ),
    NonFiniteCause.TARGETS: "the targets contain NaN or inf: clean the labels",
    NonFiniteCause.LOSS: "the loss in `training_step` produces it (log of zero, division by zero, a bad reduction)",
}


def wording(
    verdict: Assessment,
    measured: float,
    expected: float | None,
    reading: Reading | None,
    refs: References | None,
    high: HighLoss | None = None,
    layer: str = "",
    per_channel: bool = False,
) -> tuple[str, str | None]:
    """The summary and hint of ``verdict`` on the loss ``measured`` (``None`` for a pass without advice).
    ``high`` holds the causes of a loss too high, ``layer`` the final layer's name (e.g. `` `net.2` ``)."""
    numbers = Numbers(verdict, measured, expected, reading, refs, layer, per_channel)
    template, hint = TEXT[verdict.reason]
    summary = template.format_map(numbers)
    if hint is not None:
        return summary, hint.format_map(numbers)
    if high is not None:
        return summary, high_loss_hint(high, numbers)
    if verdict.bias_advice and reading is not None and refs is not None:
        return summary, bias_advice(reading.view, refs, numbers.per_term, per_channel)
    return summary, None


@dataclass(frozen=True)
class Numbers:
    """The numbers and phrases a template names, each computed when the template asks for it
    (``template.format_map(numbers)``); a field that does not apply to a verdict is never asked for."""

    verdict: Assessment
    measured: float
    expected: float | None
    reading: Reading | None
    refs: References | None
    layer: str = ""
    per_channel: bool = False

    def __getitem__(self, key: str) -> object:
        return getattr(self, key)

    @property
    def limit(self) -> float:
        return self.verdict.limit

    @property
    def per_term(self) -> float:
        """The measured loss per term: over the reading's element count for a summed loss."""
        return self.measured / self.reading.scale if self.reading is not None else self.measured

    @property
    def head(self) -> str:
        return head(self.measured, self.expected, self.reading, self.refs)

    @property
    def view(self) -> TaskView:
        assert self.reading is not None  # asked only by the causes of a reading
        return self.reading.view

    @property
    def known_refs(self) -> References:
        assert self.refs is not None  # asked only by the causes of a reading
        return self.refs

    @property
    def offset_stds(self) -> float:
        return float(self.known_refs.extra.get("offset_stds", math.nan))

    @property
    def offset_cost(self) -> float:
        return self.offset_stds**2

    @property
    def offset_text(self) -> str:
        return _offset_text(self.view, self.known_refs)

    @property
    def channel_bias(self) -> str:
        return bias_values(self.view, self.known_refs, self.per_channel)


def head(measured: float, expected: float | None, reading: Reading | None, refs: References | None) -> str:
    """The summary's start: measured vs expected, and which loss it was read as."""
    what = _describe_task(reading)
    if expected is not None:
        return f"measured {measured:.4g} vs expected ~{expected:.4g} (`expected=`){what}"
    assert refs is not None and reading is not None  # judged against the references of a reading
    chance = f"~{refs.chance:.4g}"
    if reading.reduction == "mean":
        text = f"measured {measured:.4g} vs expected {chance} ({_chance_name(reading.view)})"
    else:
        text = (
            f"measured {measured:.4g} = {measured / reading.scale:.4g} x {reading.scale:.4g} terms ({reading.name}) "
            f"vs expected {chance} per term ({_chance_name(reading.view)})"
        )
    return text + f", prior-optimal {refs.prior_optimal:.4g}{what}"


def high_loss_hint(high: HighLoss, numbers: Numbers) -> str:
    """The likely causes of a loss too high, most likely first, each with its fix."""
    reading, refs = numbers.reading, numbers.refs
    fields = {
        "input_mean": high.input_mean,
        "input_std": high.input_std,
        "logit_std": high.logit_std,
        "offset_std": high.offset_std,
        "within_std": high.within_std,
        "output_std": high.output_std,
        "target_std": high.target_std,
        "weight_std": high.layer.weight_std if high.layer is not None else math.nan,
        "layer": numbers.layer,
        "bias": bias_values(reading.view, refs) if reading is not None and refs is not None else "zeros",
    }
    causes = [HIGH_LOSS_TEXT[cause].format_map(fields) for cause in high.causes]
    if len(causes) == 1:
        return f"Likely cause: {causes[0]}."
    return "Likely causes, most likely first: " + "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1)) + "."


def non_finite_text(cause: NonFiniteCause, measured: float) -> tuple[str, str]:
    """Summary and hint of a non-finite loss at init."""
    return (
        f"measured a non-finite loss ({measured}) at initialisation; training cannot start from it.",
        f"Likely cause: {NON_FINITE_TEXT[cause]}. Run one batch by hand and check each step for NaN with "
        "torch.isfinite.",
    )


def unexplained(measured: float, readings: list[Reading], not_inferred: TaskNotInferred | None, misread: bool) -> str:
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


# -- phrases ----------------------------------------------------------------------------------------


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


def bias_values(view: TaskView, refs: References, per_channel: bool = False) -> str:
    """The bias that reaches the prior-optimal loss, as a noun phrase that completes "set the bias to ...":
    the values when there are few, else how to compute them (the batches read here are too small a sample).
    ``per_channel``: the outputs are ``(N, C, H, W)``, one bias per channel."""
    channel = " (one per output channel)" if per_channel else ""
    narrow = view.width <= MAX_LISTED
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
        + (f" {_fmt(refs.prior)}" if view.width <= MAX_LISTED else "")
    )


def bias_advice(view: TaskView, refs: References, measured: float, per_channel: bool = False) -> str:
    """The hint of a pass whose final bias is worth setting: imbalanced labels, or an offset target mean."""
    bias = bias_values(view, refs, per_channel)
    narrow = view.width <= MAX_LISTED
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
