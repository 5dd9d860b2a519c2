"""OverfitOneBatch's words: one table from each :class:`Cause` to its summary template and hint.

The diagnostic decides the cause (:func:`~lightning_recipe.diagnostics.overfit_cause.diagnose`); this module only
says it. A summary template names the numbers it shows, and :class:`Numbers` computes each one when a template
asks for it (the nonfinite-start summary has no best loss to show).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_recipe.callbacks._base import format_names
from lightning_recipe.diagnostics.overfit import Attempt, OverfitEvidence
from lightning_recipe.diagnostics.overfit_cause import Cause, Diagnosis, OutputFacts

__all__ = ["TEXT", "Numbers", "goal_text", "label_text", "wording"]

_FLOOR_HINT = (
    "A loss with a floor above zero: `.clamp(min=...)` / `max(loss, c)` on the loss, softmax or "
    "sigmoid applied before a loss that applies it again, label smoothing or a regulariser added to "
    "the loss. Remove the clamp or the extra activation; if the floor is on purpose (label "
    "smoothing, an auxiliary term), raise `loss_fraction` above it."
)
_UNFIT_HINT = (
    "A model that cannot memorise a few examples has a bug: outputs clamped or squashed (a final ReLU, "
    "sigmoid or tanh on a regression output, `.clamp` on outputs or loss), a loss floor, inputs that "
    "do not reach the model (zeroed, constant), targets that do not match the inputs. Inspect the "
    "`predictions` figure in TensorBoard, remove the clamp or squashing, and check what `training_step` "
    "compares."
)


def _double(kind: str, loss: str, sums: str) -> tuple[str, str]:
    return (
        "The loss stops at a floor: {seen}{labels}. The model's outputs are already probabilities "
        f"(in [0, 1]{sums}), so the loss applies {kind} a second time.",
        f"Double {kind}: `{loss}` applies {kind} itself, so the model must return raw logits. Remove "
        f"the `.{kind}()` at the end of `forward` (apply it only when you need probabilities, e.g. in "
        "`predict_step`), or use the loss for probabilities (`nll_loss` on `log()` / `binary_cross_entropy`).",
    )


#: cause -> (summary template, hint); a pass and a skip have no hint. Templates name :class:`Numbers`' fields.
TEXT: dict[Cause, tuple[str, str]] = {
    Cause.ALL_FROZEN: (
        "Every parameter of the model is frozen (requires_grad=False, {frozen_numel:,} weights): "
        "nothing can learn, so the batch cannot be fitted.",
        "A `requires_grad_(False)` (or freezing loop) caught more than intended. Leave the layers you "
        "mean to train trainable: `module.requires_grad_(True)` on them.",
    ),
    Cause.NONFINITE_START: (
        "The loss is {start} on the batch before any update (expected a finite number).",
        "Look for log(0) or division by zero in the loss, NaN/Inf in the inputs or targets (check the "
        "data pipeline), or a target out of range for the loss. Fix the loss or the data, e.g. "
        "`F.cross_entropy` on logits instead of `log` of probabilities, or `clamp_min(eps)` before `log`.",
    ),
    Cause.NONPOSITIVE_START: (
        "the loss starts at {start:.4g} <= 0, so 'fall to {fraction} of its start' means nothing "
        "(a loss that can be negative). Overfit this model by hand with `Trainer(overfit_batches=1)`.",
        "",
    ),
    Cause.NO_GRAPH: (
        "The loss {start:.4g} returned by `training_step` has no gradient: it does not depend on any "
        "trainable parameter, so nothing can learn.",
        "Something cuts the graph between the parameters and the loss: `.detach()`, `.item()`, "
        "`.numpy()`, `.data`, `torch.no_grad()` or `torch.tensor(loss)` in `forward` or `training_step`. "
        "Compute the loss from the model's output tensors directly.",
    ),
    Cause.NO_GRADIENT: (
        "Backpropagating the loss, {no_gradient}: {no_grad_names}{fitted_anyway}. They will never train.",
        "The gradient does not reach them: a `.detach()`, `.data`, `.item()`/`.numpy()` round trip or "
        "`torch.no_grad()` between them and the loss (a detached trunk), a layer created in `__init__` "
        "but not used in `forward`, or weights that are all zero so the gradient through them is "
        "exactly zero (zero init: use the default init). Remove the cut; if a layer is unused on "
        "purpose, delete it or freeze it with `requires_grad_(False)`.",
    ),
    Cause.FITTED: (
        "Fitted {used} examples: loss {start:.4g} -> {final:.4g} ({goal}) in {steps} steps at {setting}{labels}."
        "{frozen_note}",
        "",
    ),
    Cause.NONFINITE: (
        "The loss became non-finite while fitting one batch at every learning rate tried ({where}); "
        "it started at {start:.4g}.",
        "A loss that turns NaN/Inf on a few examples under Adam is numerically unstable: log of a "
        "probability that reaches 0, division by a norm or std that reaches 0, exp() of a growing "
        "value. Use the fused stable forms (`F.cross_entropy` / `F.binary_cross_entropy_with_logits` "
        "on logits, `logsumexp`), add eps to denominators, clamp before log.",
    ),
    Cause.LABELS_NOT_FITTED: (
        "The loss fell ({progress}) but only {correct}/{total} labels are "
        "predicted: the loss is not fitting the labels the check reads.",
        "The loss optimises something other than the targets: a target column or key mix-up, labels "
        "shifted against the inputs, or outputs in another order than the targets. If your batch or "
        "output layout is unusual, pass `targets=` / `forward=` so the check reads the same labels and "
        "predictions as your loss.",
    ),
    Cause.DOUBLE_SOFTMAX: _double("softmax", "cross_entropy", ", summing to 1"),
    Cause.DOUBLE_SIGMOID: _double("sigmoid", "binary_cross_entropy_with_logits", ""),
    Cause.CLAMPED_LOSS: (
        "Every prediction matches its label but the loss stops at a floor: {seen}; "
        "the gradient is exactly zero there, so the loss is clamped or thresholded.",
        _FLOOR_HINT,
    ),
    Cause.LOSS_FLOOR: (
        "Every prediction matches its label but the loss stops at a floor: {seen}; the loss cannot go lower.",
        _FLOOR_HINT,
    ),
    Cause.FROZEN: (
        "Could not fit {used} examples: {seen}{labels}. {frozen}.",
        "The frozen parameters leave too little to learn with. If freezing them was not meant (a "
        "freezing loop matching too much, e.g. every '*weight'), make them trainable again with "
        "`requires_grad_(True)`; if it was, unfreeze enough of the model to fit a few examples.",
    ),
    Cause.SATURATED: (
        "Could not fit {used} examples: {seen}{labels}; "
        "the gradient is exactly zero: the loss or the outputs are clamped/saturated.{out_of_reach}",
        _UNFIT_HINT,
    ),
    Cause.PLATEAU: (
        "Could not fit {used} examples: {seen}{labels}; the loss plateaus above a floor.{out_of_reach}",
        _UNFIT_HINT,
    ),
}


def wording(diagnosis: Diagnosis, ev: OverfitEvidence, facts: OutputFacts, used: int) -> tuple[str, str]:
    """The summary and hint of ``diagnosis``, its template filled with the numbers it names."""
    template, hint = TEXT[diagnosis.cause]
    return template.format_map(Numbers(diagnosis, ev, facts, used)), hint


@dataclass(frozen=True)
class Numbers:
    """The numbers and phrases a summary template names, each computed when the template asks for it.

    ``template.format_map(numbers)`` looks each field up by name; a field that does not apply to a cause (a best
    loss before any attempt) is never asked for.
    """

    diagnosis: Diagnosis
    ev: OverfitEvidence
    facts: OutputFacts
    used: int

    def __getitem__(self, key: str) -> object:
        return getattr(self, key)

    @property
    def attempt(self) -> Attempt:
        assert self.diagnosis.attempt is not None  # asked only by the causes of an attempt
        return self.diagnosis.attempt

    @property
    def start(self) -> float:
        return self.diagnosis.start_loss

    @property
    def fraction(self) -> str:
        return f"{self.ev.loss_fraction:.0%}"

    @property
    def frozen_numel(self) -> int:
        return self.ev.frozen_numel

    @property
    def final(self) -> float:
        return self.attempt.final_loss

    @property
    def steps(self) -> int:
        return self.attempt.steps

    @property
    def setting(self) -> str:
        return self.attempt.setting

    @property
    def correct(self) -> int | None:
        return self.attempt.correct

    @property
    def total(self) -> int | None:
        return self.attempt.total

    @property
    def goal(self) -> str:
        return goal_text(self.ev)

    @property
    def labels(self) -> str:
        return label_text(self.attempt)

    @property
    def frozen_note(self) -> str:
        return f" Note: {self.frozen}." if self.ev.frozen_params else ""

    @property
    def frozen(self) -> str:
        ev = self.ev
        share = ev.frozen_numel / max(ev.frozen_numel + ev.trainable_numel, 1)
        return (
            f"{len(ev.frozen_params)} parameter tensors ({share:.0%} of the weights) are frozen "
            f"(requires_grad=False): {format_names(ev.frozen_params)}"
        )

    @property
    def no_gradient(self) -> str:
        ev = self.ev
        if len(ev.no_grad_params) == len(ev.trainable_params):
            return "none of the trainable parameters received a gradient"
        share = ev.no_grad_numel / max(ev.trainable_numel, 1)
        return (
            f"{len(ev.no_grad_params)} of {len(ev.trainable_params)} trainable parameter tensors "
            f"({share:.1%} of the trainable weights) never received a gradient"
        )

    @property
    def no_grad_names(self) -> str:
        return format_names(self.ev.no_grad_params)

    @property
    def fitted_anyway(self) -> str:
        a = self.attempt
        if a.reached:
            return "; the rest fitted the batch anyway"
        return f" (loss {a.start_loss:.4g} -> best {a.best_loss:.4g} in {a.steps} steps)"

    @property
    def where(self) -> str:
        return ", ".join(
            f"step {a.nonfinite_step} at {a.setting}" + (f" (the loss raised {a.raised})" if a.raised else "")
            for a in self.ev.attempts
        )

    @property
    def progress(self) -> str:
        """The closest attempt's loss against its start, over every setting tried."""
        best, start = self.attempt, self.start
        lrs = ", ".join(f"{a.lr:g}" for a in self.ev.attempts if a.optimizer == "Adam")
        lrs += "".join(f" and {a.setting}" for a in self.ev.attempts if a.optimizer != "Adam")
        return (
            f"loss {start:.4g} -> best {best.best_loss:.4g} ({best.best_loss / start:.0%} of its start), final "
            f"{best.final_loss:.4g}, after {self.ev.total_steps} steps at lr {lrs}"
        )

    @property
    def seen(self) -> str:
        return f"{self.progress}; it must reach {self.ev.target_loss:.4g} ({goal_text(self.ev)})"

    @property
    def out_of_reach(self) -> str:
        if not self.diagnosis.out_of_reach:
            return ""
        assert self.facts.output_range is not None and self.facts.target_range is not None
        (lo, hi), (tlo, thi) = self.facts.output_range, self.facts.target_range
        return (
            f" The outputs stay within [{lo:.3g}, {hi:.3g}] while the targets span [{tlo:.3g}, {thi:.3g}]: "
            "the output cannot reach them (clamp, ReLU, sigmoid or tanh on the output?)."
        )


def goal_text(ev: OverfitEvidence) -> str:
    """How low the loss must go, in words: a fraction of its start, or of the way down to its floor."""
    if ev.floor > 0:
        return (
            f"<= {ev.loss_fraction:.0%} of the way from its floor {ev.floor:.4g}, the entropy of the soft "
            "targets, to its start"
        )
    return f"<= {ev.loss_fraction:.0%} of its start"


def label_text(attempt: Attempt) -> str:
    """``"; 3/4 labels predicted"``, with the undecidable ones explained; empty without labels."""
    if attempt.total is None:
        return ""
    text = f"; {attempt.correct}/{attempt.total} labels predicted"
    if attempt.ambiguous:
        text += (
            f" ({attempt.ambiguous} undecidable, counted as predicted: another example has the same input "
            "and a different label)"
        )
    return text
