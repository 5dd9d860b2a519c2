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
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_int, check_positive
from lightning_recipe.callbacks import _update_ratio_log as ratio_log
from lightning_recipe.callbacks import _update_ratio_text as text
from lightning_recipe.callbacks._monitor import BatchOptions, Monitor
from lightning_recipe.callbacks._schedule import Every
from lightning_recipe.diagnostics import update_ratio as ur
from lightning_recipe.diagnostics import update_ratio_cause as cause
from lightning_recipe.diagnostics.update_ratio import is_adaptive as _adaptive
from lightning_recipe.diagnostics.update_ratio import start_lr as _start_lr
from lightning_recipe.diagnostics.update_ratio_cause import EXPLODE_RATIO

__all__ = ["UpdateRatioMonitor"]


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
        **options: Unpack[BatchOptions],
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **options)
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
                    watch.pending = (taken, ur.copy_weights(params))

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
        """Read one measured step: log its ratios, judge it against the optimizer's history, and raise what the
        verdict found."""
        if ur.no_gradient(gradient_norms, taken.has_grad):
            # `training_step` returned None (Lightning's way to skip a batch) and the optimizer stepped without
            # gradients: this step says nothing about the learning rate. Measure the next one instead.
            watch.retry = watch.retry or taken.regular
            self.skipped_steps.append((watch.index, taken.step))
            return
        self.measured_steps.append((watch.index, taken.step))
        reading = self._reading(watch, taken, measured, gradient_norms)
        self.last_ratios.update(zip(reading.names, reading.ratios, strict=True))
        ratio_log.log_ratios(trainer, self.tag, self._tags, watch.index, reading)
        verdict = cause.judge(reading, self._history(watch), self._limits())
        self._remember(watch, verdict.history)
        for name, weight in verdict.cancelled.items():
            self._note_cancelled(trainer, name, weight, taken.step)
        for finding in verdict.findings:
            self._raise(trainer, finding, key=f"optimizer{watch.index}", step=taken.step)

    def _reading(
        self, watch: _OptimizerWatch, taken: _Step, measured: ur.UpdateRatios, gradient_norms: list[float]
    ) -> cause.Measurement:
        """The measured step as the verdict reads it: names and plain numbers, and the median it judges."""
        params = taken.params
        names = [self._names.get(id(p), f"optimizer{watch.index}.param{i}") for i, p in enumerate(params)]
        ratios, weights = measured.ratios.tolist(), measured.weight_norms.tolist()
        return cause.Measurement(
            step=taken.step,
            names=names,
            update_norms=measured.update_norms.tolist(),
            weight_norms=weights,
            ratios=ratios,
            gradient_norms=gradient_norms,
            has_grad=taken.has_grad,
            param_lrs=taken.param_lrs,
            lrs=taken.lrs,
            median=ur.median_ratio(ratios, weights, [p.ndim >= 2 for p in params], self.min_weight_norm),
            early=taken.early,
            regular=taken.regular,
            adaptive=taken.adaptive,
            early_losses=tuple(self._early_losses),
        )

    def _limits(self) -> cause.Limits:
        return cause.Limits(self.window, self.max_ratio, self.min_ratio, self.explode_ratio)

    @staticmethod
    def _history(watch: _OptimizerWatch) -> cause.History:
        return cause.History(
            start_lrs=watch.start_lrs,
            steps=watch.steps,
            medians=watch.medians,
            early_medians=watch.early_medians,
            zero_streak=watch.zero_streak,
            too_high_at=watch.too_high_at,
        )

    @staticmethod
    def _remember(watch: _OptimizerWatch, history: cause.History) -> None:
        """Keep what the verdict will need at the next step (plain lists and dicts: a checkpoint saves them)."""
        watch.medians = list(history.medians)
        watch.early_medians = list(history.early_medians)
        watch.zero_streak = dict(history.zero_streak)
        watch.too_high_at = history.too_high_at

    def _raise(self, trainer: pl.Trainer, finding: cause.Finding, key: str = "", step: int | None = None) -> None:
        message = text.message(finding, self._limits(), self.every_n_steps)
        self.alert(trainer, finding.kind, message, finding.details, key=key, step=step)

    def _check_all_in_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimized = (p for o in trainer.optimizers for g in o.param_groups for p in g["params"])
        missing = cause.not_in_optimizer(pl_module.named_parameters(), optimized)
        if missing is not None and trainer.optimizers:
            self._raise(trainer, missing)

    def _note_cancelled(self, trainer: pl.Trainer, name: str, weight: str, step: int) -> None:
        """Say once, without an alert, that a bias does not move because a normalisation cancels it."""
        if name in self._noted:
            return
        self._noted.add(name)
        note = text.cancelled_note(name, weight)
        self.notes.append(note)
        _logging.log_text(trainer, self.tag("notes"), f"[lightning_recipe] {self.name} note: {note}", step)

    @staticmethod
    def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
        return [float(g.get("lr", math.nan)) for g in optimizer.param_groups]
