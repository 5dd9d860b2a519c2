"""PredictionDynamicsLogger's words: one message per cause, built from the verdict's evidence.

The diagnostic decides (:func:`~lightning_recipe.diagnostics.dynamics_verdict.judge`); this module only says it,
in the voice of every alert: measured, expected, likely cause, fix.
"""

from __future__ import annotations

from typing import Any

from lightning_recipe.diagnostics.dynamics_verdict import SETTLED_FLIP_RATE, DynamicsCause

__all__ = ["cause_text", "non_finite_text"]


def non_finite_text(step: int) -> str:
    return (
        f"the model's predictions on the fixed batch are NaN or infinite at step {step} (expected "
        "finite outputs). Likely cause: the learning rate is so high that training diverged, or a "
        "log/division of zero in the model. Fix: lower the learning rate ~10x, add gradient clipping "
        "(`Trainer(gradient_clip_val=1.0)`), and check the loss for log(0)."
    )


def _thrashing(e: dict[str, Any], window: int, what: str) -> str:
    flips = e["flips"]
    churn_text = (
        f"; {flips} of {e['flip_trials']} predicted labels flipped (a settled model flips about "
        f"{SETTLED_FLIP_RATE:.0%}, {flips / max(e['flip_trials'], 1):.0%} is beyond chance at this batch size)"
        if flips is not None
        else ""
    )
    return (
        f"predictions on the fixed batch thrash: over steps {e['window_steps'][0]}-{e['window_steps'][1]} "
        f"{e['wobbling_evaluations']} of {window} evaluations moved {what} by {e['thrash_jitter']} or "
        f"more (mean change {e['mean_jitter']:.3f}){churn_text}, while the loss went from "
        f"{e['loss_window_start']:.4g} to {e['loss_window_end']:.4g} (expected after warm-up: calm "
        "predictions, or a falling loss). Likely cause: the learning rate "
        "is too high, each step overshoots. Fix: lower the learning rate ~10x (or add warm-up / "
        "gradient clipping)."
    )


def _frozen(e: dict[str, Any], window: int, what: str) -> str:
    return (
        f"predictions on the fixed batch do not move: over steps {e['window_steps'][0]}-"
        f"{e['window_steps'][1]} the outputs changed by {e['window_movement']:.2e} relative to their size "
        f"(expected > {e['frozen_movement']:.0e}), and the loss stayed at {e['loss_window_end']:.4g} "
        f"(first {e['first_loss']:.4g}). Likely cause: the learning rate is far too low, or nothing "
        "trains. Fix: check that `configure_optimizers` gets the model's parameters and that they have "
        "`requires_grad=True`, then raise the learning rate (10-100x)."
    )


_TEXT = {"thrashing": _thrashing, "frozen": _frozen}


def cause_text(cause: DynamicsCause, evidence: dict[str, Any], window: int, regression: bool) -> str:
    """The alert's message for ``cause``, from the numbers the verdict measured over a window of ``window``
    evaluations; ``regression`` names the quantity that moved."""
    what = "prediction / target std" if regression else "p(true class)"
    return _TEXT[cause](evidence, window, what)
