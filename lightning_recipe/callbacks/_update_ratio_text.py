"""UpdateRatioMonitor's words: one table from each :class:`Cause` to its message template, and the formatters
for the numbers in it.

The diagnostic decides the cause (:func:`~lightning_recipe.diagnostics.update_ratio_cause.judge`); this module
only says it. A template names the numbers it shows (fields of :func:`message`'s mapping): what was measured,
what was expected, the likely cause and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_recipe.callbacks._base import format_names
from lightning_recipe.diagnostics.update_ratio import TARGET_RATIO
from lightning_recipe.diagnostics.update_ratio_cause import Cause, Finding, Limits

__all__ = ["TEXT", "cancelled_note", "fmt", "lr_list", "lr_text", "message"]

_MEDIAN = "the median update/weight ratio ||ΔW||/||W|| of the weight matrices is {median} per step, "
_START = "above {max_ratio} on most of the first {window} optimizer steps "
_TOO_HIGH = (
    "(expected near {target:g}; 1e-3 to 1e-2 is typical). Largest: {largest}. Learning rate in effect: {lr_text}. "
    "Each step rewrites a large part of the weights: the learning rate is too high. Fix: divide the learning rate "
    "by ~{factor:.0f} to bring the median ratio near {target:g}, or add warmup."
)
_TOO_LOW = (
    _MEDIAN + "below {min_ratio} on most of the last {window} measurements (expected near {target:g}). "
    "Learning rate in effect: {lr_text}. Likely cause: "
)
_NOT_MOVING = (
    "{count} trainable parameter tensor(s) did not change at all on the last {window} measured optimizer steps "
    "(every {every_n_steps} steps): {names}; learning rate in effect {lrs}. Expected every trainable parameter to "
    "move (update/weight ratio near {target:g}). Likely cause: "
)

#: cause -> message template; templates name the fields of :func:`message`'s mapping
TEXT: dict[Cause, str] = {
    Cause.NOT_IN_OPTIMIZER: (
        "{count} of {trainable} trainable parameter tensors are in no optimizer's param_groups: {names}. They have "
        "requires_grad=True but will never be updated, so those layers keep their random initialisation (the "
        "learning rate in effect for them is 0). Expected every trainable parameter in an optimizer. Fix: build the "
        "optimizer from `self.parameters()` in `configure_optimizers` (or add the missing modules), or freeze them "
        "on purpose with `requires_grad_(False)`."
    ),
    Cause.NON_FINITE: (
        "the weights or the update of {count} parameter tensor(s) hold NaN/Inf after the optimizer step: {names} "
        "(learning rate {lr_text}). Expected finite values. Likely causes: a learning rate so high that training "
        "diverged, a loss that produced NaN (log of 0, division by 0), or fp16 overflow. Fix: lower the learning "
        "rate, clip gradients (`Trainer(gradient_clip_val=1.0)`), check the loss for log(0), or use bf16."
    ),
    Cause.ZERO_LR: _NOT_MOVING + "their param group's learning rate is 0: set a non-zero `lr` for that group.",
    Cause.NO_GRADIENT: _NOT_MOVING + "no gradient reaches them (a branch not used in the loss, a `.detach()` or "
    "`torch.no_grad()` on the way, or an output the loss ignores): check that the loss depends on them, or freeze "
    "them on purpose with `requires_grad_(False)`.",
    Cause.ADAPTIVE_START: _MEDIAN + _START + "of an adaptive optimizer (its steps are ~lr per entry, whatever the "
    "gradient) " + _TOO_HIGH,
    Cause.OVERSHOOTING_START: _MEDIAN + _START + "while the training loss rose {loss_rise:.3g}x above its first "
    "value (steps that overshoot) " + _TOO_HIGH,
    Cause.LR_TOO_HIGH: _MEDIAN + "above {max_ratio} on most of the last {window} measurements " + _TOO_HIGH,
    Cause.COLLAPSED: _TOO_LOW + "the ratio was far too high earlier (alert at step {too_high_at}) and has "
    "collapsed since: a learning rate too high makes the weights grow until units die (dead ReLUs) and nothing "
    "moves. Fix: lower the learning rate (see the ratio_too_high alert), do not raise it.",
    Cause.LR_DECAYED: _TOO_LOW + "the learning rate fell from {start_lrs} at the start to {lrs} now ({decayed:.3g}x "
    "lower after {steps} steps of this optimizer): an LR scheduler that steps every batch instead of every epoch? "
    'Fix: schedule per epoch (`"interval": "epoch"` in `configure_optimizers`) or size the schedule in steps, so '
    "the learning rate stays near its starting value for most of training.",
    Cause.LR_TOO_LOW: _TOO_LOW + "the learning rate {lrs} is too low: the weights barely change. Fix: {how} to "
    "bring the median ratio near {target:g}.",
}


def message(finding: Finding, limits: Limits, every_n_steps: int) -> str:
    """The alert message of ``finding``, under the monitor's ``limits`` and schedule."""
    f = finding
    factor = f.factor
    numbers: dict[str, Any] = {
        "count": len(f.parameters),
        "names": format_names(f.parameters),
        "trainable": f.trainable,
        "lrs": lr_list(f.lrs),
        "lr_text": lr_text(f.lrs, f.start_lrs),
        "start_lrs": lr_list(f.start_lrs),
        "median": fmt(f.median),
        "max_ratio": fmt(limits.max_ratio),
        "min_ratio": fmt(limits.min_ratio),
        "window": limits.window,
        "every_n_steps": every_n_steps,
        "target": TARGET_RATIO,
        "largest": format_names([f"{name} {fmt(ratio)}" for name, ratio in f.ranked], 3),
        "factor": factor,
        "how": f"multiply the learning rate by ~{factor:.0f}" if math.isfinite(factor) else "raise the learning rate",
        "loss_rise": f.loss_rise,
        "decayed": f.decayed,
        "too_high_at": f.too_high_at,
        "steps": f.steps,
    }
    return TEXT[f.cause].format(**numbers)


def cancelled_note(name: str, weight: str) -> str:
    """The note for a bias that does not move because the normalisation after its layer cancels it."""
    return (
        f"`{name}` does not move, and that is harmless: its gradient is ~0 while `{weight}` of the same layer "
        "trains, the signature of a bias right before a normalisation (BatchNorm / LayerNorm) that subtracts "
        "the mean and so cancels it. It can be dropped (`bias=False`) to save a parameter; not an alert."
    )


def fmt(x: float) -> str:
    """A ratio or learning rate for a message: ``3e-03``-style, readable across decades."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def lr_list(lrs: Sequence[float]) -> str:
    """Learning rates, one per param group: ``1.0e-02, 3.0e-03``."""
    return ", ".join(fmt(lr) for lr in lrs)


def lr_text(lrs: Sequence[float], start_lrs: Sequence[float]) -> str:
    """The learning rates in effect, and where a scheduler changed them, from what."""
    text = lr_list(lrs) + (" (per param group)" if len(lrs) > 1 else "")
    pairs = zip(start_lrs, lrs, strict=False)  # a param group added mid-run has no start
    if any(abs(a - b) > 1e-12 * max(abs(a), abs(b)) for a, b in pairs):
        text += f", changed by a scheduler from {lr_list(start_lrs)} at the start"
    return text
