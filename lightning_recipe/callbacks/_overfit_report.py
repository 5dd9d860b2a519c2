"""What OverfitOneBatch records: the result's ``details``, the loss per step, and two figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_recipe import _logging
from lightning_recipe.callbacks._context import CheckContext
from lightning_recipe.diagnostics.labels import decode_predictions
from lightning_recipe.diagnostics.overfit import OverfitEvidence

__all__ = ["details", "log_run"]

_CURVE_POINTS = 50  # loss-curve samples kept in ``details``


def details(ev: OverfitEvidence, used: int, full: bool, switched: int) -> dict[str, Any]:
    """The result's ``details``: the run in numbers, every attempt, the closest attempt's curve subsampled."""
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


def _subsample(curve: Sequence[float], points: int = _CURVE_POINTS) -> list[float]:
    if len(curve) <= points:
        return [round(v, 6) if math.isfinite(v) else v for v in curve]
    stride = (len(curve) - 1) / (points - 1)
    return [_subsample([curve[round(i * stride)]])[0] for i in range(points)]


def log_run(ctx: CheckContext, ev: OverfitEvidence, outputs: Tensor | None, targets: Tensor | None) -> None:
    """The closest attempt's loss per step; the loss-curve and predictions figures when TensorBoard draws them."""
    trainer = ctx.trainer
    decisive = ev.decisive
    if decisive is None:
        return
    for step, value in enumerate(decisive.curve):
        if math.isfinite(value):
            _logging.log_scalars(trainer, {ctx.tag("loss"): value}, step=step)
    if not _logging.draws_figures(trainer):
        return  # figures cost ~0.1 s each; skip them when nobody draws them
    _logging.log_figure(trainer, ctx.tag("loss_curve"), _loss_figure(ev), step=0)
    if outputs is not None and targets is not None:
        _logging.log_figure(
            trainer, ctx.tag("predictions"), _predictions_figure(outputs, targets, ev.attempts[-1].lr), step=0
        )


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
