"""UpdateRatioMonitor: ``||ΔW|| / ||W||`` per parameter tensor around the real optimizer step (CS231n: ~1e-3)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import check_int, check_positive
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.callbacks._schedule import Every
from lightning_recipe.diagnostics import update_ratio as ur
from lightning_recipe.diagnostics.batch import ForwardFn, InputsFn, TargetsFn

__all__ = ["UpdateRatioMonitor"]

EXPLODE_RATIO = 1.0
"""In the first steps, a median update larger than the weights themselves (ratio above 1) on most of them is an
explosion; anything below is judged on the sustained window only."""
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
    medians: list[float] = field(default_factory=list)  # regular measurements (every n-th step): the verdicts
    early_medians: list[float] = field(default_factory=list)  # the first `window` steps: only an explosion counts
    retry: bool = False  # a regular measuring step carried no gradient: measure the next step instead
    zero_streak: dict[str, int] = field(default_factory=dict)  # parameter name -> measured zero updates in a row
    pending: tuple[_Step, list[Tensor]] | None = None  # the step and the fp32 copies, during one step only

    #: what a checkpoint keeps of a watch: everything but `index` (its position) and `pending` (within one step)
    SAVED = ("steps", "too_high_at", "start_lrs", "medians", "early_medians", "retry", "zero_streak")

    def state(self) -> dict[str, Any]:
        return {name: copy.copy(getattr(self, name)) for name in self.SAVED}

    def restore(self, state: dict[str, Any]) -> None:
        for name in self.SAVED:
            if name in state:
                setattr(self, name, copy.copy(state[name]))


@dataclass(frozen=True)
class _Step:
    """One measured optimizer step, as it was when it was taken (the reading may come a step later)."""

    step: int  # trainer.global_step before the step
    params: list[Tensor]
    lrs: list[float]  # per param group, in effect for this step
    param_lrs: list[float]  # per parameter: its group's learning rate
    regular: bool = True  # a measuring step of the schedule (every n-th step, or the retry of a skipped one)
    early: bool = False  # one of the optimizer's first `window` steps
    has_grad: tuple[bool, ...] = ()  # per parameter: whether it had a gradient at this step
    adaptive: bool = False  # the optimizer normalises its steps by a second-moment estimate (Adam, RMSprop, ...)


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
    the last ``window`` regular measurements (every ``every_n_steps``) out of band. The first ``window`` steps
    are judged apart: large relative steps at the very start of a small model are normal under plain SGD, whose
    steps scale with the gradient (SGD at 0.1 on a 5-parameter regression: ratios 0.1-1.5, then it converges).
    There only steps that explode (median above 1), or a median above ``max_ratio`` from an adaptive optimizer
    (Adam, RMSprop, Adagrad: its steps are ~lr per entry whatever the gradient, so the ratio is the learning rate
    over the weights' scale) or while the training loss rose 5x above its first value, alert.

    A step that carried no gradient at all (``training_step`` returned None: Lightning skips the batch but the
    optimizer still steps) says nothing about the learning rate: it is not measured (``skipped_steps``), and
    the next step is measured instead. A bias that does not move because a normalisation right after its layer
    cancels it (gradient ~0 by construction while the layer's weight trains: plain SGD leaves it in place) is
    a harmless redundancy: it gets a note (``notes``, TensorBoard text ``notes``), not ``not_moving``.

    A checkpoint keeps each optimizer's step count, windows of medians, zero-update streaks and starting learning
    rates: a run resumed from it measures on the same steps and alerts as the uninterrupted one.

    Alerts (``.alerts``, each also one ``RecipeWarning``):
        ``ratio_too_high``: the median ratio above ``max_ratio`` for a window: learning rate too high.
        ``ratio_too_low``: below ``min_ratio`` for a window: learning rate too low, or decayed away.
        ``not_in_optimizer``: a parameter with ``requires_grad=True`` in no optimizer (at the start).
        ``not_moving``: a trainable parameter in an optimizer whose update was exactly zero ``window`` measured
        steps in a row: no gradient reaches it, or its group's learning rate is 0.
        ``non_finite``: NaN/Inf in the weights or the update.

    Args:
        every_n_steps: measure every n-th step of each optimizer, and each of its first ``window`` steps (a
            learning rate that explodes shows there, before the weights grow and pull the ratio back). The default
            keeps the cost well under 1% of a training step and a lasting problem alerted within 200 steps.
        window: how many measurements a verdict needs (more than half out of band; ``not_moving``: all).
        max_ratio: the median ratio above which the learning rate is called too high.
        min_ratio: the median ratio below which it is called too low.
        min_weight_norm: parameters with a smaller norm are left out of the median (a bias near its zero init).
        inputs, targets, forward: accepted like every check and monitor takes them; not needed here.

    Attributes:
        alerts: the alerts raised (``kind``, ``step``, ``message``, ``details``).
        measured_steps: ``(optimizer index, global step)`` of every measurement.
        skipped_steps: ``(optimizer index, global step)`` of measuring steps without gradients (not measured).
        notes: what was seen and is not a problem, in words (a bias cancelled by a normalisation).
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

    #: the update needs the weights on both sides of the optimizer's step: measured in its step hooks
    measures_at_batch_end = False

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
        # measured: each of the optimizer's first `window` steps (judged for an explosion only) and every n-th
        # (the regular window the verdicts use)
        self.schedule = Every(every_n_steps, first=window)
        self._regular = Every(every_n_steps)
        self.max_ratio = float(max_ratio)
        self.min_ratio = float(min_ratio)
        self.min_weight_norm = float(min_weight_norm)
        self.explode_ratio = EXPLODE_RATIO
        self.measured_steps: list[tuple[int, int]] = []  # (optimizer index, global step) of each measurement
        #: (optimizer index, global step) of measuring steps that carried no gradient (a skipped batch): not
        #: measured, the next step is measured instead
        self.skipped_steps: list[tuple[int, int]] = []
        #: what was seen and is not a problem (a bias cancelled by the normalisation after it), in words
        self.notes: list[str] = []
        self._noted: set[str] = set()
        self._early_losses: list[float] = []  # training loss of the first `window + 1` batches
        self.last_ratios: dict[str, float] = {}  # parameter name -> ratio at its latest measurement
        self._handles: list[RemovableHandle] = []
        self._watches: list[_OptimizerWatch] = []
        self._names: dict[int, str] = {}
        self._tags: dict[str, str] = {}  # parameter name -> its scalar's tag, built once
        self._trainer: pl.Trainer | None = None
        self._resumed: list[dict[str, Any]] | None = None  # each optimizer's watch, from a checkpoint

    # -- state across a checkpoint resume ----------------------------------------------------------------

    @override
    def state_settings(self) -> dict[str, Any]:
        return {
            **super().state_settings(),
            "window": self.window,
            "max_ratio": self.max_ratio,
            "min_ratio": self.min_ratio,
            "min_weight_norm": self.min_weight_norm,
        }

    @override
    def save_state(self) -> dict[str, Any]:
        # per optimizer: its step count (what `every_n_steps` and the first `window` steps count), the windows of
        # medians, the zero-update streaks by parameter name, the learning rates it started at
        watches = [watch.state() for watch in self._watches] if self._watches else list(self._resumed or [])
        return {
            "optimizers": watches,
            "early_losses": list(self._early_losses),
            "measured_steps": [list(item) for item in self.measured_steps],
            "skipped_steps": [list(item) for item in self.skipped_steps],
            "notes": list(self.notes),
            "noted": sorted(self._noted),
            "last_ratios": dict(self.last_ratios),
        }

    @override
    def restore_state(self, state: dict[str, Any]) -> None:
        self._resumed = [dict(watch) for watch in state.get("optimizers", [])]  # applied at on_train_start
        self._early_losses = [float(loss) for loss in state.get("early_losses", [])]
        self.measured_steps = [(int(i), int(step)) for i, step in state.get("measured_steps", [])]
        self.skipped_steps = [(int(i), int(step)) for i, step in state.get("skipped_steps", [])]
        self.notes = list(state.get("notes", []))
        self._noted = set(state.get("noted", []))
        self.last_ratios = dict(state.get("last_ratios", {}))

    # -- wiring ------------------------------------------------------------------------------------------

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the training loss of the first steps only (one host read each): whether large first steps overshoot
        if not self.enabled or len(self._early_losses) > self.window:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            with self.guard(trainer):  # the mean over ranks (every rank is here): every rank decides alike
                self._early_losses.append(float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")))

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._watches = []
        resumed, self._resumed = self._resumed or [], None
        for index, optimizer in enumerate(trainer.optimizers):
            watch = _OptimizerWatch(index, start_lrs=[_start_lr(g) for g in optimizer.param_groups])
            if index < len(resumed):  # a resumed run: its counts and windows go on
                watch.restore(resumed[index])
            self._watches.append(watch)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook(watch)))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook(watch)))
        self._check_all_in_optimizer(trainer, pl_module)

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
            # The first `window` steps are all measured: a learning rate so high that it explodes shows there,
            # before the weights have grown so large that the ratio falls back into the band (then the network
            # dies). They are judged apart from the regular, sustained window (large first steps are normal).
            early = watch.steps < self.window
            due = self.schedule(watch.steps) or watch.retry
            if not due and not self._pending:  # most steps: count it and stay out of the way (no guard, no copy)
                watch.steps += 1
                watch.pending = None
                return
            with self.guard(self._trainer), torch.no_grad():
                self.flush()  # readings of earlier steps that have reached the host (may set `retry`)
                regular = self._regular(watch.steps) or watch.retry
                due = (early or regular) and self.enabled  # a reading may have switched the monitor off
                watch.retry = False
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
                        regular=regular,
                        early=early,
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
                gradients = ur.gradient_squared_norms(taken.params)
                taken = replace(
                    taken, has_grad=tuple(p.grad is not None for p in taken.params), adaptive=_adaptive(optimizer)
                )
                # read on the host at a later hook: waiting for the GPU here would leave it idle
                self.defer(
                    [squared, gradients],
                    lambda host: self._after_measure(
                        trainer, watch, taken, ur.UpdateRatios.from_squared(host[0]), host[1].sqrt().tolist()
                    ),
                )

        return hook

    # -- evidence and verdicts ---------------------------------------------------------------------------

    def _after_measure(
        self,
        trainer: pl.Trainer,
        watch: _OptimizerWatch,
        taken: _Step,
        measured: ur.UpdateRatios,
        gradient_norms: list[float],
    ) -> None:
        step, params = taken.step, taken.params
        if ur.no_gradient(gradient_norms, taken.has_grad):
            # `training_step` returned None (Lightning's way to skip a batch) and the optimizer stepped without
            # gradients: this step says nothing about the learning rate. Measure the next one instead.
            watch.retry = watch.retry or taken.regular
            self.skipped_steps.append((watch.index, step))
            return
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
                trainer,
                "non_finite",
                f"the weights or the update of {len(bad)} parameter tensor(s) hold NaN/Inf after the "
                f"optimizer step: {ur.format_names(bad)} (learning rate {self._lr_text(taken.lrs, watch)}). "
                "Expected finite values. Likely causes: a learning rate so high that training diverged, a loss "
                "that produced NaN (log of 0, division by 0), or fp16 overflow. Fix: lower the learning rate, "
                "clip gradients (`Trainer(gradient_clip_val=1.0)`), check the loss for log(0), or use bf16.",
                {"parameters": bad, "step": step},
                key=f"optimizer{watch.index}",
                step=step,
            )
            return  # ratios of a diverged step say nothing more about the learning rate

        self._check_not_moving(trainer, watch, taken, names, updates, gradient_norms)
        if median is None:
            return
        if taken.early:
            # the first steps of a tiny model rewrite a large part of its weights by design (SGD at 0.1 on a
            # 5-parameter regression: ratio ~0.1 for a few steps, then it converges); only an update larger
            # than the weights themselves on most of them is an explosion worth an alert this early
            watch.early_medians.append(median)
            exploding = ur.sustained(watch.early_medians, self.explode_ratio, above=True, window=self.window)
            # an adaptive optimizer's first steps are ~lr per entry whatever the gradient (Adam's first step is
            # lr * sign(g)): there the ratio is the learning rate over the weights' scale, not a large gradient
            overshooting = ur.sustained(watch.early_medians, self.max_ratio, above=True, window=self.window) and (
                taken.adaptive or ur.loss_diverged(self._early_losses)
            )
            if exploding or overshooting:
                self._alert_too_high(trainer, watch, taken, names, ratios, median, early=True)
            # far too low is no normal start, unless a warm-up is still ramping the learning rate up
            ramping = any(lr < start for lr, start in zip(taken.lrs, watch.start_lrs, strict=False))
            if not ramping and ur.sustained(watch.early_medians, self.min_ratio, above=False, window=self.window):
                self._alert_too_low(trainer, watch, taken, median)
        if not taken.regular:
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
            trainer,
            "not_in_optimizer",
            f"{len(missing)} of {total} trainable parameter tensors are in no optimizer's param_groups: "
            f"{ur.format_names(missing)}. They have requires_grad=True but will never be updated, so those layers "
            "keep their random initialisation (the learning rate in effect for them is 0). Expected every "
            "trainable parameter in an optimizer. Fix: build the optimizer from `self.parameters()` in "
            "`configure_optimizers` (or add the missing modules), or freeze them on purpose with "
            "`requires_grad_(False)`.",
            {"parameters": missing, "trainable": total},
        )

    def _check_not_moving(
        self,
        trainer: pl.Trainer,
        watch: _OptimizerWatch,
        taken: _Step,
        names: list[str],
        update_norms: list[float],
        gradient_norms: list[float],
    ) -> None:
        stuck: list[str] = []
        lrs: set[float] = set()
        cancelled = ur.cancelled_biases(names, update_norms, gradient_norms, taken.has_grad)
        for lr, name, norm in zip(taken.param_lrs, names, update_norms, strict=True):
            streak = watch.zero_streak.get(name, 0) + 1 if norm == 0.0 else 0
            watch.zero_streak[name] = streak
            if ur.never_moved(streak, self.window):
                if name in cancelled:
                    self._note_cancelled(trainer, name, cancelled[name], taken.step)
                    continue
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
            trainer,
            "not_moving",
            f"{len(stuck)} trainable parameter tensor(s) did not change at all on the last {self.window} measured "
            f"optimizer steps (every {self.every_n_steps} steps): {ur.format_names(stuck)}; learning rate in "
            f"effect {lr_text}. Expected every trainable parameter to move (update/weight ratio near "
            f"{ur.TARGET_RATIO:g}). Likely cause: {cause}.",
            {"parameters": stuck, "lr": sorted(lrs)},
            key=f"optimizer{watch.index}",
            step=taken.step,
        )

    def _note_cancelled(self, trainer: pl.Trainer, name: str, weight: str, step: int) -> None:
        """Say once, without an alert, that a bias does not move because a normalisation cancels it."""
        if name in self._noted:
            return
        self._noted.add(name)
        text = (
            f"`{name}` does not move, and that is harmless: its gradient is ~0 while `{weight}` of the same layer "
            "trains, the signature of a bias right before a normalisation (BatchNorm / LayerNorm) that subtracts "
            "the mean and so cancels it. It can be dropped (`bias=False`) to save a parameter; not an alert."
        )
        self.notes.append(text)
        _logging.log_text(trainer, self.tag("notes"), f"[lightning_recipe] {self.name} note: {text}", step)

    def _alert_too_high(
        self,
        trainer: pl.Trainer,
        watch: _OptimizerWatch,
        taken: _Step,
        names: list[str],
        ratios: list[float],
        median: float,
        early: bool = False,
    ) -> None:
        order = sorted((i for i in range(len(names)) if math.isfinite(ratios[i])), key=lambda i: -ratios[i])
        worst = [f"{names[i]} {ur.fmt(ratios[i])}" for i in order]
        factor = median / ur.TARGET_RATIO
        if watch.too_high_at is None:
            watch.too_high_at = taken.step
        self.alert(
            trainer,
            "ratio_too_high",
            f"the median update/weight ratio ||ΔW||/||W|| of the weight matrices is {ur.fmt(median)} per step, "
            + (
                f"above {ur.fmt(self.max_ratio)} on most of the first {self.window} optimizer steps "
                + (
                    "of an adaptive optimizer (its steps are ~lr per entry, whatever the gradient) "
                    if taken.adaptive
                    else f"while the training loss rose {ur.loss_rise(self._early_losses):.3g}x above its first "
                    "value (steps that overshoot) "
                )
                if early
                else f"above {ur.fmt(self.max_ratio)} on most of the last {self.window} measurements "
            )
            + f"(expected near {ur.TARGET_RATIO:g}; 1e-3 to 1e-2 is typical). Largest: "
            f"{ur.format_names(worst, 3)}. Learning "
            f"rate in effect: {self._lr_text(taken.lrs, watch)}. Each step rewrites a large part of the weights: "
            f"the learning rate is too high. Fix: divide the learning rate by ~{factor:.0f} to bring the median "
            f"ratio near {ur.TARGET_RATIO:g}, or add warmup.",
            {"median_ratio": median, "history": watch.medians, "lr": taken.lrs, "factor": factor},
            key=f"optimizer{watch.index}",
            step=taken.step,
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
            trainer,
            "ratio_too_low",
            f"the median update/weight ratio ||ΔW||/||W|| of the weight matrices is {ur.fmt(median)} per step, "
            f"below {ur.fmt(self.min_ratio)} on most of the last {self.window} measurements (expected near "
            f"{ur.TARGET_RATIO:g}). Learning rate in effect: {self._lr_text(taken.lrs, watch)}. Likely cause: "
            f"{cause}",
            {"median_ratio": median, "history": watch.medians, "lr": lrs, "start_lr": watch.start_lrs},
            key=f"optimizer{watch.index}",
            step=taken.step,
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


_SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum", "exp_inf")  # Adam(W)/NAdam/RAdam, RMSprop, Adagrad, Adamax


def _adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer divides its steps by a running second moment of the gradient (its state says so)."""
    return any(key in state for state in optimizer.state.values() for key in _SECOND_MOMENTS)


def _start_lr(group: dict[str, Any]) -> float:
    """The learning rate the user asked for: a scheduler keeps it in ``initial_lr`` (warmup schedulers change
    ``lr`` already when they are built)."""
    return float(group.get("initial_lr", group.get("lr", math.nan)))
