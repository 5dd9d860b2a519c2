"""UpdateRatioMonitor: ``||ΔW|| / ||W||`` per parameter tensor around the real optimizer step (CS231n: ~1e-3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import check_int, check_positive
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.diagnostics import update_ratio as ur
from lightning_recipe.diagnostics.batch import ForwardFn, InputsFn, TargetsFn

__all__ = ["UpdateRatioMonitor"]

_LOG10_ZERO = -12.0  # where a parameter that did not move is drawn (log10 of 0 is -inf)
_HIST_EDGES = [x / 4 for x in range(-49, 10)]  # log10 ratio from -12.25 to 2.25; fixed edges are ~6x cheaper


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else (_LOG10_ZERO if x == 0 else math.nan)


@dataclass
class _OptimizerWatch:
    """What the monitor keeps per optimizer between steps: counts and short histories, never a weight copy."""

    index: int
    steps: int = 0  # this optimizer's own step count: what `every_n_steps` counts
    too_high_at: int | None = None  # global step of this optimizer's ratio_too_high alert
    start_lrs: list[float] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)
    zero_streak: dict[int, int] = field(default_factory=dict)  # id(param) -> measured zero updates in a row
    pending: tuple[_Step, list[Tensor]] | None = None  # the step and the fp32 copies, during one step only


@dataclass(frozen=True)
class _Step:
    """One measured optimizer step, as it was when it was taken (the reading may come a step later)."""

    step: int  # trainer.global_step before the step
    params: list[Tensor]
    lrs: list[float]  # per param group, in effect for this step
    param_lrs: list[float]  # per parameter: its group's learning rate


class UpdateRatioMonitor(Monitor):
    """Watch the update-to-weight ratio ``||ΔW|| / ||W||`` of every parameter tensor (CS231n: "ratio of
    weights:updates", want ~1e-3) and alert when the learning rate is far off, or a parameter does not train.

    The ratio is measured around the optimizer's real step with ``torch.optim`` step hooks, so gradient
    accumulation, manual optimization, several optimizers and LR schedulers are counted right. Only measuring
    steps copy the parameters (fp32, fused), and the copy is dropped after the step. ``every_n_steps`` counts
    each optimizer's own steps (a GAN's two optimizers are each measured every n-th of their steps); the step
    logged and recorded in alerts is ``trainer.global_step`` before the step (under manual optimization with
    several optimizers it advances once per optimizer step). A step the AMP grad scaler skips calls no hook
    and is not measured. On a GPU the norms reach the host without a sync and are read at the next optimizer
    step (or the end of training): an alert comes a step later, recorded at the step it measured. Under
    sharded parameters (FSDP2 ``DTensor``) the squared norms are summed across shards, so every rank sees the
    ratio of the full tensor and takes the same decisions.

    The learning-rate verdict uses the median ratio over weight matrices (``ndim >= 2``): biases start at zero
    and norm-layer gains at one, so their ratios are off-scale by design (they are still logged). Healthy Adam
    runs often sit between 1e-3 and 1e-2 with single steps above 1e-2, so the verdict needs more than half of
    the last ``window`` measurements out of band.

    Alerts (``.alerts``, each also one ``RecipeWarning``):
        ``ratio_too_high``: the median ratio above ``max_ratio`` for a window: learning rate too high.
        ``ratio_too_low``: below ``min_ratio`` for a window: learning rate too low, or decayed away.
        ``not_in_optimizer``: a parameter with ``requires_grad=True`` in no optimizer (at the start).
        ``not_moving``: a trainable parameter in an optimizer whose update was exactly zero ``window`` measured
        steps in a row: no gradient reaches it, or its group's learning rate is 0.
        ``non_finite``: NaN/Inf in the weights or the update.

    Args:
        every_n_steps: measure every n-th step of each optimizer, and each of its first ``window`` steps (a
            learning rate far too high shows there, before the weights grow and pull the ratio back). The default
            keeps the cost well under 1% of a training step and a lasting problem alerted within 200 steps.
        window: how many measurements a verdict needs (more than half out of band; ``not_moving``: all).
        max_ratio: the median ratio above which the learning rate is called too high.
        min_ratio: the median ratio below which it is called too low.
        min_weight_norm: parameters with a smaller norm are left out of the median (a bias near its zero init).
        inputs, targets, forward: accepted like every check and monitor takes them; not needed here.

    Attributes:
        alerts: the alerts raised (``kind``, ``step``, ``message``, ``details``).
        measured_steps: ``(optimizer index, global step)`` of every measurement.
        last_ratios: parameter name -> its ratio at its latest measurement.

    Example::

        trainer = L.Trainer(callbacks=[UpdateRatioMonitor()], logger=TensorBoardLogger("logs"))
        trainer.fit(model, loader)
        [alert.kind for alert in trainer.callbacks[0].alerts]   # e.g. ["ratio_too_high"]

    Logged (TensorBoard; tags ``recipe/update_ratio_monitor/...``; optimizer ``i > 0`` gets ``_optimizer{i}``
    appended to the two tags that summarise an optimizer):
        ``log10_ratio/<parameter name>``: log10 of each tensor's ratio (a zero update is drawn at -12).
        ``log10_ratios``: histogram of log10 ratios across the optimizer's parameters.
        ``median_log10_ratio``: log10 of the median ratio the verdict uses.
        ``alerts``: the alert texts.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        window: int = 5,
        max_ratio: float = 0.1,
        min_ratio: float = 1e-5,
        min_weight_norm: float = 1e-6,
        *,
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, inputs=inputs, targets=targets, forward=forward)
        check_int("window", window, 1)
        check_positive("max_ratio", max_ratio)
        check_positive("min_ratio", min_ratio)
        check_positive("min_weight_norm", min_weight_norm)
        if not min_ratio < max_ratio:
            raise ValueError(
                f"Expected `min_ratio` to be below `max_ratio`, but got min_ratio={min_ratio!r} and "
                f"max_ratio={max_ratio!r}; the healthy ratio is near {ur.TARGET_RATIO:g}."
            )
        self.window = window
        self.max_ratio = float(max_ratio)
        self.min_ratio = float(min_ratio)
        self.min_weight_norm = float(min_weight_norm)
        self.measured_steps: list[tuple[int, int]] = []  # (optimizer index, global step) of each measurement
        self.last_ratios: dict[str, float] = {}  # parameter name -> ratio at its latest measurement
        self._handles: list[RemovableHandle] = []
        self._watches: list[_OptimizerWatch] = []
        self._names: dict[int, str] = {}
        self._tags: dict[str, str] = {}  # parameter name -> its scalar's tag, built once
        self._trainer: pl.Trainer | None = None

    # -- wiring ------------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        with self.guard(trainer):
            self._remove_hooks()
            self._trainer = trainer
            self._names = {id(p): name for name, p in pl_module.named_parameters()}
            self._watches = []
            for index, optimizer in enumerate(trainer.optimizers):
                watch = _OptimizerWatch(index, start_lrs=[_start_lr(g) for g in optimizer.param_groups])
                self._watches.append(watch)
                self._handles.append(optimizer.register_step_pre_hook(self._pre_hook(watch)))
                self._handles.append(optimizer.register_step_post_hook(self._post_hook(watch)))
            self._check_all_in_optimizer(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        with self.guard(trainer):
            self.flush(wait=True)  # the last readings

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_disabled(self) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for watch in self._watches:
            watch.pending = None

    def _pre_hook(self, watch: _OptimizerWatch) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not self.enabled or self._trainer is None:
                return
            # The first `window` steps are all measured: a learning rate far too high shows there, before the
            # weights have grown so large that the ratio falls back into the band (then the network dies).
            due = watch.steps < self.window or watch.steps % self.every_n_steps == 0
            if not due and not self._pending:  # most steps: count it and stay out of the way (no guard, no copy)
                watch.steps += 1
                watch.pending = None
                return
            with self.guard(self._trainer), torch.no_grad():
                self.flush()  # readings of earlier steps that have reached the host
                due = due and self.enabled  # a reading may have switched the monitor off
                watch.steps += 1
                watch.pending = None
                if due:
                    trained = [(p, float(g.get("lr", math.nan))) for g in optimizer.param_groups for p in g["params"]]
                    trained = [(p, lr) for p, lr in trained if p.requires_grad]
                    params = [p for p, _ in trained]
                    taken = _Step(
                        step=int(self._trainer.global_step),
                        params=params,
                        lrs=self._lrs(optimizer),
                        param_lrs=[lr for _, lr in trained],
                    )
                    watch.pending = (taken, ur.snapshot(params))

        return hook

    def _post_hook(self, watch: _OptimizerWatch) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not self.enabled or self._trainer is None or watch.pending is None:
                return
            taken, before = watch.pending
            watch.pending = None  # no copy survives the step
            trainer = self._trainer
            with self.guard(trainer), torch.no_grad():
                squared = ur.squared_norms(taken.params, before)
                del before
                # read on the host at a later hook: waiting for the GPU here would leave it idle
                self.defer(
                    [squared],
                    lambda host: self._after_measure(trainer, watch, taken, ur.UpdateRatios.from_squared(host[0])),
                )

        return hook

    # -- evidence and verdicts ---------------------------------------------------------------------------

    def _after_measure(
        self, trainer: pl.Trainer, watch: _OptimizerWatch, taken: _Step, measured: ur.UpdateRatios
    ) -> None:
        step, params = taken.step, taken.params
        self.measured_steps.append((watch.index, step))
        names = [self._names.get(id(p), f"optimizer{watch.index}.param{i}") for i, p in enumerate(params)]
        updates, weights = measured.update_norms.tolist(), measured.weight_norms.tolist()
        ratios = measured.ratios.tolist()
        self.last_ratios.update(zip(names, ratios, strict=True))
        median = ur.median_ratio(ratios, weights, [p.ndim >= 2 for p in params], self.min_weight_norm)
        self._log(trainer, watch, names, ratios, median, step)

        finite = [math.isfinite(u) and math.isfinite(w) for u, w in zip(updates, weights, strict=True)]
        bad = [n for n, ok in zip(names, finite, strict=True) if not ok]
        if bad:
            self.alert(
                trainer, "non_finite",
                f"the weights or the update of {len(bad)} parameter tensor(s) hold NaN/Inf after the "
                f"optimizer step: {ur.format_names(bad)} (learning rate {self._lr_text(taken.lrs, watch)}). "
                "Expected finite values. Likely causes: a learning rate so high that training diverged, a loss "
                "that produced NaN (log of 0, division by 0), or fp16 overflow. Fix: lower the learning rate, "
                "clip gradients (`Trainer(gradient_clip_val=1.0)`), check the loss for log(0), or use bf16.",
                {"parameters": bad, "step": step}, key=f"optimizer{watch.index}", step=step,
            )
            return  # ratios of a diverged step say nothing more about the learning rate

        self._check_not_moving(trainer, watch, taken, names, updates)
        if median is None:
            return
        watch.medians = (watch.medians + [median])[-self.window :]
        if ur.sustained(watch.medians, self.max_ratio, above=True, window=self.window):
            self._alert_too_high(trainer, watch, taken, names, ratios, median)
        elif ur.sustained(watch.medians, self.min_ratio, above=False, window=self.window):
            self._alert_too_low(trainer, watch, taken, median)

    def _log(
        self,
        trainer: pl.Trainer,
        watch: _OptimizerWatch,
        names: list[str],
        ratios: list[float],
        median: float | None,
        step: int,
    ) -> None:
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        logs = [_log10(r) for r in ratios]
        suffix = "" if watch.index == 0 else f"_optimizer{watch.index}"
        scalars = {self._ratio_tag(n): v for n, v in zip(names, logs, strict=True) if math.isfinite(v)}
        if median is not None:
            scalars[self.tag(f"median_log10_ratio{suffix}")] = _log10(median)
        finite = [min(max(v, _LOG10_ZERO), _HIST_EDGES[-1]) for v in logs if math.isfinite(v)]
        histogram = {self.tag(f"log10_ratios{suffix}"): (finite, _HIST_EDGES)}
        _logging.log_scalars(trainer, scalars, step, histograms=histogram)  # one event: each costs ~0.1 ms

    def _ratio_tag(self, name: str) -> str:
        tag = self._tags.get(name)
        if tag is None:
            tag = self._tags[name] = self.tag(f"log10_ratio/{name}")
        return tag

    def _check_all_in_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        in_optimizer = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        if not missing or not trainer.optimizers:
            return
        total = sum(1 for p in pl_module.parameters() if p.requires_grad)
        self.alert(
            trainer, "not_in_optimizer",
            f"{len(missing)} of {total} trainable parameter tensors are in no optimizer's param_groups: "
            f"{ur.format_names(missing)}. They have requires_grad=True but will never be updated, so those layers "
            "keep their random initialisation (the learning rate in effect for them is 0). Expected every "
            "trainable parameter in an optimizer. Fix: build the optimizer from `self.parameters()` in "
            "`configure_optimizers` (or add the missing modules), or freeze them on purpose with "
            "`requires_grad_(False)`.",
            {"parameters": missing, "trainable": total},
        )

    def _check_not_moving(
        self, trainer: pl.Trainer, watch: _OptimizerWatch, taken: _Step, names: list[str], update_norms: list[float]
    ) -> None:
        stuck: list[str] = []
        lrs: set[float] = set()
        for p, lr, name, norm in zip(taken.params, taken.param_lrs, names, update_norms, strict=True):
            streak = watch.zero_streak.get(id(p), 0) + 1 if norm == 0.0 else 0
            watch.zero_streak[id(p)] = streak
            if ur.never_moved(streak, self.window):
                stuck.append(name)
                lrs.add(lr)
        if not stuck:
            return
        lr_text = ", ".join(ur.fmt(lr) for lr in sorted(lrs))
        cause = (
            "their param group's learning rate is 0: set a non-zero `lr` for that group"
            if lrs == {0.0}
            else "no gradient reaches them (a branch not used in the loss, a `.detach()` or `torch.no_grad()` on "
            "the way, or an output the loss ignores): check that the loss depends on them, or freeze them on "
            "purpose with `requires_grad_(False)`"
        )
        self.alert(
            trainer, "not_moving",
            f"{len(stuck)} trainable parameter tensor(s) did not change at all on the last {self.window} measured "
            f"optimizer steps (every {self.every_n_steps} steps): {ur.format_names(stuck)}; learning rate in "
            f"effect {lr_text}. Expected every trainable parameter to move (update/weight ratio near "
            f"{ur.TARGET_RATIO:g}). Likely cause: {cause}.",
            {"parameters": stuck, "lr": sorted(lrs)}, key=f"optimizer{watch.index}", step=taken.step,
        )

    def _alert_too_high(
        self,
        trainer: pl.Trainer,
        watch: _OptimizerWatch,
        taken: _Step,
        names: list[str],
        ratios: list[float],
        median: float,
    ) -> None:
        order = sorted((i for i in range(len(names)) if math.isfinite(ratios[i])), key=lambda i: -ratios[i])
        worst = [f"{names[i]} {ur.fmt(ratios[i])}" for i in order]
        factor = median / ur.TARGET_RATIO
        if watch.too_high_at is None:
            watch.too_high_at = taken.step
        self.alert(
            trainer, "ratio_too_high",
            f"the median update/weight ratio ||ΔW||/||W|| of the weight matrices is {ur.fmt(median)} per step, "
            f"above {ur.fmt(self.max_ratio)} on most of the last {self.window} measurements (expected near "
            f"{ur.TARGET_RATIO:g}; 1e-3 to 1e-2 is typical). Largest: {ur.format_names(worst, 3)}. Learning "
            f"rate in effect: {self._lr_text(taken.lrs, watch)}. Each step rewrites a large part of the weights: "
            f"the learning rate is too high. Fix: divide the learning rate by ~{factor:.0f} to bring the median "
            f"ratio near {ur.TARGET_RATIO:g}, or add warmup.",
            {"median_ratio": median, "history": watch.medians, "lr": taken.lrs, "factor": factor},
            key=f"optimizer{watch.index}", step=taken.step,
        )

    def _alert_too_low(self, trainer: pl.Trainer, watch: _OptimizerWatch, taken: _Step, median: float) -> None:
        lrs = taken.lrs
        decayed = [s / lr if lr > 0 else math.inf for s, lr in zip(watch.start_lrs, lrs, strict=False) if s > 0]
        fell = bool(decayed) and min(decayed) >= 10
        factor = ur.TARGET_RATIO / median if median > 0 else math.inf
        if watch.too_high_at is not None:
            cause = (
                f"the ratio was far too high earlier (alert at step {watch.too_high_at}) and has collapsed since: "
                "a learning rate too high makes the weights grow until units die (dead ReLUs) and nothing moves. "
                "Fix: lower the learning rate (see the ratio_too_high alert), do not raise it."
            )
        elif fell:
            cause = (
                f"the learning rate fell from {self._lr_list(watch.start_lrs)} at the start to "
                f"{self._lr_list(lrs)} now ({min(decayed):.3g}x lower after {watch.steps} steps of this optimizer): "
                "an LR scheduler that steps every batch instead of every epoch? Fix: schedule per epoch "
                '(`"interval": "epoch"` in `configure_optimizers`) or size the schedule in steps, so the learning '
                "rate stays near its starting value for most of training."
            )
        else:
            how = f"multiply the learning rate by ~{factor:.0f}" if math.isfinite(factor) else "raise the learning rate"
            cause = (
                f"the learning rate {self._lr_list(lrs)} is too low: the weights barely change. Fix: {how} to bring "
                f"the median ratio near {ur.TARGET_RATIO:g}."
            )
        self.alert(
            trainer, "ratio_too_low",
            f"the median update/weight ratio ||ΔW||/||W|| of the weight matrices is {ur.fmt(median)} per step, "
            f"below {ur.fmt(self.min_ratio)} on most of the last {self.window} measurements (expected near "
            f"{ur.TARGET_RATIO:g}). Learning rate in effect: {self._lr_text(taken.lrs, watch)}. Likely cause: "
            f"{cause}",
            {"median_ratio": median, "history": watch.medians, "lr": lrs, "start_lr": watch.start_lrs},
            key=f"optimizer{watch.index}", step=taken.step,
        )

    @staticmethod
    def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
        return [float(g.get("lr", math.nan)) for g in optimizer.param_groups]

    @staticmethod
    def _lr_list(lrs: list[float]) -> str:
        return ", ".join(ur.fmt(lr) for lr in lrs)

    def _lr_text(self, lrs: list[float], watch: _OptimizerWatch) -> str:
        text = self._lr_list(lrs) + (" (per param group)" if len(lrs) > 1 else "")
        pairs = zip(watch.start_lrs, lrs, strict=False)  # a param group added mid-run has no start
        if any(abs(a - b) > 1e-12 * max(abs(a), abs(b)) for a, b in pairs):
            text += f", changed by a scheduler from {self._lr_list(watch.start_lrs)} at the start"
        return text


def _start_lr(group: dict[str, Any]) -> float:
    """The learning rate the user asked for: a scheduler keeps it in ``initial_lr`` (warmup schedulers change
    ``lr`` already when they are built)."""
    return float(group.get("initial_lr", group.get("lr", math.nan)))
