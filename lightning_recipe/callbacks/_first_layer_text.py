"""FirstLayerVisualizer's words: the two alerts and the frozen-on-purpose note, built from the measured numbers.

The diagnostic decides (:func:`~lightning_recipe.diagnostics.first_layer.filter_alerts`,
:func:`~lightning_recipe.diagnostics.first_layer.why_not_changing`); this module only says it.
"""

from __future__ import annotations

from lightning_recipe.diagnostics.first_layer import StillCause, Thresholds

__all__ = ["cause_text", "frozen_note", "noisy_text", "not_changing_text"]


#: why the layer does not move, in words, for each :class:`StillCause` kind
_CAUSES = {
    "frozen": "its weights have requires_grad=False (frozen)",
    "not_in_optimizer": "its weights are in no optimizer (missing from `configure_optimizers`)",
    "no_gradient": "no gradient reaches it (a `.detach()` or `torch.no_grad()` between input and loss)",
    "small_updates": "its updates are too small to register (learning rate {lrs})",
}


def cause_text(cause: StillCause) -> str:
    """Why the layer does not move, in words."""
    return _CAUSES[cause.kind].format(lrs=list(cause.lrs))


def not_changing_text(name: str | None, steps: int, moved: float, thresholds: Thresholds, cause: str) -> str:
    return (
        f"the first layer `{name}` has not changed in {steps} optimizer steps: ||W - W0|| / ||W0|| = "
        f"{moved:.2g}, expected a healthy first layer to move well above "
        f"{thresholds.not_changing_below:g}. Likely cause: {cause}. The network then learns "
        "everything on top of random input features. Fix: train it (requires_grad=True and its "
        "parameters in `configure_optimizers`). If you freeze a pretrained first layer on purpose, pass "
        "`layer=` naming a layer that trains, or remove the FirstLayerVisualizer."
    )


def noisy_text(
    name: str | None, steps: int, moved: float, score: float | None, start: float | None, thresholds: Thresholds
) -> str:
    return (
        f"the first layer `{name}` still looks like noise after {steps} optimizer steps: noise score "
        f"{score:.2f} (it was {start:.2f} at the start; i.i.d. noise ~1, trained filters "
        f"below {thresholds.noisy_above:g}) and it moved only {moved:.2g} of its norm from its "
        f"initialisation (expected >= {thresholds.noisy_moved_below:g}). Likely causes: a learning "
        "rate too low for this layer, vanishing gradients before the first layer, or too little training "
        "signal. Fix: check the update ratio of this layer (UpdateRatioMonitor), raise its learning "
        "rate, or add normalisation after it."
    )


def frozen_note(name: str | None, score: float | None, excess: float) -> str:
    shown = f"noise score {score:.2f}; " if score is not None else ""
    return (
        f"the first layer `{name}` is frozen (requires_grad=False) and does not move; its weights "
        f"have structure ({shown}largest singular value {excess:.2f}x a random matrix's), so it looks "
        "pretrained and frozen on purpose: no alert."
    )
