"""PredictionDynamicsLogger: the recipe's "visualize prediction dynamics" on a fixed held-out batch."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_choice, check_fraction, check_int, check_positive
from lightning_recipe.callbacks._context import CheckContext, silenced_logging
from lightning_recipe.callbacks._data import fresh_pass_refusal, loader_generators, peek_batches
from lightning_recipe.callbacks._dynamics_text import cause_text, non_finite_text
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._fixed_batch import NOT_PLAIN, first_examples, plain_on_host, val_loader
from lightning_recipe.callbacks._monitor import BatchOptions, Monitor
from lightning_recipe.diagnostics.alignment import Alignment
from lightning_recipe.diagnostics.compiled import eager
from lightning_recipe.diagnostics.dynamics_verdict import Evaluation, judge
from lightning_recipe.diagnostics.prediction_dynamics import OutputReading, Snapshot, churn, jitter, movement, snapshot
from lightning_recipe.diagnostics.state import RngState, evaluating, preserved
from lightning_recipe.diagnostics.task import TASKS

__all__ = ["PredictionDynamicsLogger"]

_MAX_POINTS = 400  # trajectory points kept per example for the figure (older ones thinned)
_MAX_LINES = 32  # examples drawn in the figure


class PredictionDynamicsLogger(Monitor):
    """Watch the model's predictions on one fixed held-out batch move during training.

    A batch of at most ``num_examples`` examples is captured once at the start of training, from the
    validation loader (or, when there is none, the training loader, and the logged text says so), without
    moving the training iterator or any random number generator. Every ``every_n_steps`` optimizer steps the
    model predicts on it in eval mode without gradients; the train/eval mode of every submodule and every RNG
    are put back, so a seeded run ends bit-identical with or without the logger.

    Alerts (each once, as a :class:`~lightning_recipe.RecipeWarning` and in ``.alerts``):

    - ``thrashing``: past ``warmup_steps``, predictions keep jumping (jitter >= ``thrash_jitter`` at more than
      half of ``window`` evaluations, and more label flips than a settled model makes by chance at this many
      examples) while the loss on the batch does not improve: learning rate too high. One bad step (a loss
      spike of a converged transformer under Adam) is one evaluation, not thrashing.
    - ``frozen``: the outputs moved less than ``frozen_movement`` (relative) over ``window`` evaluations and
      the loss never improved: learning rate far too low, or nothing trains.
    - ``non_finite``: the predictions on the batch became NaN or infinite.

    A checkpoint keeps the fixed batch (when it is plain tensors, lists, tuples and dicts), the evaluations and
    the window's predictions: a resumed run evaluates the same batch and alerts as the uninterrupted one.

    Args:
        every_n_steps: evaluate on optimizer steps that are multiples of this. At the default, 25, with ``window=4``
            a frozen run is alerted at step 100, a thrashing one by step ~200 (over 10 seeds of a learning rate
            100x too high, all between steps 100 and 200).
        num_examples: at most this many examples in the fixed batch. The logger's cost is one forward pass on
            them every ``every_n_steps``: at the defaults, 12 examples every 25 steps, ~0.4% of a step on a small
            CNN trained in batches of 64 (``benchmarks/monitor_overhead.py``). 12 examples alert as reliably as 16
            and 32 (same 10 seeds, no false alarm on the healthy zoo, ``benchmarks/dynamics_defaults.py``) at a
            fraction of the cost; more give smoother trajectories.
        source: ``"val"`` (validation loader, falling back to training when there is none) or ``"train"``.
        figure_every_n_steps: draw the trajectory figure on evaluations at multiples of this step and at the
            end of training (a figure costs ~100 ms, an evaluation ~1-2 ms on a small model).
        window: evaluations a verdict looks back over.
        warmup_steps: no thrashing verdict before this optimizer step (early training moves a lot).
        thrash_jitter: jitter (|Δ p(true class)|, or |Δ prediction| / target std) at which one evaluation counts
            as wobbling, in (0, 1). Thrashing also needs the wobble at half the window or more, label flips beyond
            what a settled model makes by chance at this batch size (a binomial null, 5% per label and
            evaluation), and a loss that jumps without improving
            (:func:`~lightning_recipe.diagnostics.dynamics_verdict.judge`): zero false alarms on tiny BERT,
            GPT-2 and causal encoder LMs over 10 seeds (``benchmarks/false_alarms.py``).
        frozen_movement: relative output movement over a window below which predictions count as frozen.
        task: ``"auto"`` or one of ``"multiclass"``, ``"binary"``, ``"multilabel"``, ``"regression"``.
        inputs, targets, forward: how to read a batch, as for every check.

    Example::

        trainer = Trainer(callbacks=[PredictionDynamicsLogger()], logger=TensorBoardLogger("logs"))

    Logged:
        - ``recipe/prediction_dynamics_logger/loss``: standard loss (cross-entropy, BCE, MSE) on the batch.
        - ``recipe/prediction_dynamics_logger/accuracy``: torchmetrics accuracy (classification only).
        - ``recipe/prediction_dynamics_logger/churn``: fraction of predicted labels changed since the previous
          evaluation (classification only).
        - ``recipe/prediction_dynamics_logger/jitter``: mean |Δ p(true class)| since the previous evaluation
          (regression: |Δ prediction| / target std).
        - ``recipe/prediction_dynamics_logger/trajectories``: figure, per-example p(true class) over steps
          (regression: prediction over steps, and prediction vs target).
        - ``recipe/prediction_dynamics_logger/batch``: text, where the fixed batch came from.
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 25,
        num_examples: int = 12,
        source: str = "val",
        figure_every_n_steps: int = 1000,
        window: int = 4,
        warmup_steps: int = 50,
        thrash_jitter: float = 0.05,
        frozen_movement: float = 5e-3,
        task: str = "auto",
        **options: Unpack[BatchOptions],
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **options)
        check_int("num_examples", num_examples, 1)
        check_choice("source", source, ("val", "train"))
        check_int("figure_every_n_steps", figure_every_n_steps, 1)
        check_int("window", window, 2)
        check_int("warmup_steps", warmup_steps, 0)
        check_fraction("thrash_jitter", thrash_jitter)
        check_positive("frozen_movement", frozen_movement)
        check_choice("task", task, TASKS)
        self.num_examples = num_examples
        self.source = source
        self.figure_every_n_steps = figure_every_n_steps
        self.window = window
        self.warmup_steps = warmup_steps
        self.thrash_jitter = thrash_jitter
        self.frozen_movement = frozen_movement
        self.task = task
        self.batch: Any = None
        self.batch_source: str | None = None
        self.history: list[Evaluation] = []
        self._snapshots: list[Snapshot] = []  # the last `window + 1`, for movement over the window
        self._trajectory_steps: list[int] = []
        self._trajectories: list[Tensor] = []  # (N,) per evaluation
        self._targets: Tensor | None = None  # the fixed batch's targets, on the host
        self._examples_in_batch = 0
        self._reading: OutputReading | None = None  # how its outputs are read, resolved at the first evaluation
        self._alignment: Alignment | None = None  # which target each output position is trained towards
        self._best_loss = math.inf  # lowest loss on the batch so far (the history is not rescanned each time)
        self._last_step = -1  # the step evaluated last (at the start, on the schedule, at the end)
        self._figure_step = -1
        self._resumed_batch: Any = None  # the fixed batch from a checkpoint, on the host until on_train_start

    # -- state across a checkpoint resume ----------------------------------------------------------------
    @override
    def state_settings(self) -> dict[str, Any]:
        return {
            **super().state_settings(),
            "num_examples": self.num_examples,
            "source": self.source,
            "window": self.window,
            "warmup_steps": self.warmup_steps,
            "thrash_jitter": self.thrash_jitter,
            "frozen_movement": self.frozen_movement,
            "task": self.task,
        }

    @override
    def save_state(self) -> dict[str, Any]:
        # the fixed batch itself (a resumed run cannot read it again: a shuffled loader, or the first batch
        # training fetched), the evaluations the verdicts look back over, the snapshots of the window (movement
        # and jitter compare with them) and the figure's trajectories. A batch that is not plain tensors and
        # containers is not saved (a checkpoint must load with `weights_only=True`): the resumed run then starts
        # afresh on a newly read batch.
        batch = plain_on_host(self.batch if self._resumed_batch is None else self._resumed_batch)
        if batch is NOT_PLAIN or batch is None:
            return {}
        return {
            "batch": batch,
            "batch_source": self.batch_source,
            "alignment": dataclasses.asdict(self._alignment) if self._alignment is not None else None,
            "history": [dataclasses.asdict(evaluation) for evaluation in self.history],
            "snapshots": [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)} for s in self._snapshots],
            "trajectory_steps": list(self._trajectory_steps),
            "trajectories": list(self._trajectories),
            "best_loss": self._best_loss,
            "last_step": self._last_step,
            "figure_step": self._figure_step,
        }

    @override
    def restore_state(self, state: dict[str, Any]) -> None:
        if state.get("batch") is None:
            return
        self._resumed_batch = state["batch"]  # to the device at on_train_start
        self.batch_source = state.get("batch_source")
        alignment = state.get("alignment")
        self._alignment = Alignment(**alignment) if alignment is not None else None
        self.history = [Evaluation(**evaluation) for evaluation in state.get("history", [])]
        self._snapshots = [Snapshot(**snap) for snap in state.get("snapshots", [])]
        self._trajectory_steps = [int(step) for step in state.get("trajectory_steps", [])]
        self._trajectories = list(state.get("trajectories", []))
        self._best_loss = float(state.get("best_loss", math.inf))
        self._last_step = int(state.get("last_step", -1))
        self._figure_step = int(state.get("figure_step", -1))

    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Take up the fixed batch of the interrupted run: no new read, no evaluation at the resumed step (the
        interrupted run made its own there, when the step was due)."""
        self.batch = trainer.strategy.batch_to_device(batch)
        with evaluating(pl_module):
            self.adapter = self.adapter.fitted(pl_module, self.batch)
        self._targets = self.adapter.get_targets(self.batch).detach().cpu()
        self._examples_in_batch = self._examples(self.batch)

    # -- the monitor's lifecycle -------------------------------------------------------------------
    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed_batch is not None:
            batch, self._resumed_batch = self._resumed_batch, None
            self._resume(trainer, pl_module, batch)
        elif self._capture(trainer, pl_module):
            self._evaluate(trainer, pl_module)

    @override
    def start_with_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, reason: str) -> None:
        where = f"the first batch training fetched (at step {trainer.global_step}), copied before its step ({reason})"
        self._use([batch], "train", where, trainer, pl_module, [])
        self._evaluate(trainer, pl_module)

    @override
    def ready(self) -> bool:
        return self.batch is not None

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._evaluate(trainer, pl_module)

    @override
    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if int(trainer.global_step) != self._last_step:
            self._evaluate(trainer, pl_module, figure=False)
        self.flush(wait=True)
        if self._figure_step != self._last_step:
            self._draw(trainer)

    @override
    def on_disabled(self) -> None:
        self.batch = None
        self._snapshots.clear()

    # -- the fixed batch ------------------------------------------------------------------------------
    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Read the fixed batch from a fresh pass (validation loader first), or, where a second pass could change
        what training reads (see :mod:`lightning_recipe.callbacks._data`), wait for the first batch training
        fetches. ``True`` when the batch was read now."""
        train = trainer.train_dataloader
        val = val_loader(trainer) if self.source == "val" else None
        val_refused = fresh_pass_refusal(val) if val is not None else None
        if val is not None and val_refused is None:
            loader, source, where = val, "val", "the first validation batch"
        else:
            train_refused = fresh_pass_refusal(train)
            if val is not None:
                why = f"the validation loader cannot be read twice: {val_refused}"
            else:
                why = "there is no validation loader" if self.source == "val" else "source='train'"
            if train_refused is not None:
                self.wait_for_first_batch(
                    f"{why}; and a fresh pass over the training loader cannot be taken: {train_refused}"
                )
                return False
            assert isinstance(train, DataLoader)  # fresh_pass_refusal refuses anything else
            loader, source = train, "train"
            where = f"the first training batch ({why}; predictions on it also reflect memorisation)"
        generators = [
            *(loader_generators(train) if isinstance(train, DataLoader) else []),  # several loaders: a list or dict
            *(loader_generators(val) if val is not None else []),
        ]
        rng = RngState.capture(generators)
        try:
            batches = peek_batches(
                trainer,
                lambda read: sum(map(self._examples, read)) >= self.num_examples,
                loader,
                "validation" if source == "val" else "training",
            )
        finally:
            rng.restore()
        self._use(batches, source, where, trainer, pl_module, generators)
        return True

    def _use(
        self,
        batches: list[Any],
        source: str,
        where: str,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        generators: list[torch.Generator],
    ) -> None:
        self.batch = first_examples(batches, [self._examples(b) for b in batches], self.num_examples, pl_module)
        self.batch_source = source
        with evaluating(pl_module):
            # fitted first: reading `forward`'s signature can move the targets (`(x, adj, y)` batches)
            self.adapter = self.adapter.fitted(pl_module, self.batch)
        self._targets = self.adapter.get_targets(self.batch).detach().cpu()  # fixed: on the host once
        n = self._examples_in_batch = self._examples(self.batch)
        self._alignment = self._read_alignment(trainer, pl_module, generators)
        text = f"Fixed batch of {n} examples from {where}, evaluated every {self.every_n_steps} optimizer steps."
        _logging.log_text(trainer, self.tag("batch"), text, int(trainer.global_step))

    def _read_alignment(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, generators: list[torch.Generator]
    ) -> Alignment | None:
        """How the loss pairs output positions with targets (a next-token shift inside the model), read the way
        the checks read it: one ``training_step`` on the fixed batch, everything it changes restored."""
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        ctx = CheckContext(trainer, pl_module, [self.batch], self.adapter, self.component)
        with (
            preserved(pl_module, trainer.optimizers, schedulers, generators),
            silenced_logging(pl_module),
            eager(),
        ):
            try:
                return ctx.alignment(self.batch)
            except CheckSkipped:
                return None

    def _examples(self, batch: Any) -> int:
        targets = self.adapter.get_targets(batch)
        return int(targets.shape[0]) if targets.ndim else 1

    # -- evaluation -----------------------------------------------------------------------------------
    def _predict(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        # in the precision context Lightning validates in (autocast under mixed precision): the predictions
        # are the ones validation would see, at the cost of a validation forward pass
        with evaluating(pl_module), trainer.precision_plugin.val_step_context():
            outputs = self.adapter.predict(pl_module, self.adapter.get_inputs(self.batch))
        return outputs.detach().float()

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, figure: bool = True) -> None:
        """Predict now; read the predictions when they reach the host (on a GPU, at a later hook)."""
        step = int(trainer.global_step)
        self._last_step = step
        outputs = self._predict(trainer, pl_module)
        self.defer([outputs], lambda host: self._record(trainer, host[0], step, figure))

    def _record(self, trainer: pl.Trainer, outputs: Tensor, step: int, figure: bool) -> None:
        targets = self._targets
        assert targets is not None  # set with the batch
        if self._reading is None or self._reading.shape != tuple(outputs.shape):
            # the targets never change
            self._reading = OutputReading.resolve(outputs, targets, self.task, self._alignment)
        current = snapshot(
            outputs, targets, step, task=self.task, examples=self._examples_in_batch, reading=self._reading
        )
        previous = self._snapshots[-1] if self._snapshots else None
        evaluation = Evaluation(
            step=step,
            loss=current.loss,
            accuracy=current.accuracy,
            churn=churn(previous, current) if previous is not None else None,
            jitter=jitter(previous, current) if previous is not None else math.nan,
            labels=current.labels.numel() if current.labels is not None else None,
        )
        self.history.append(evaluation)
        self._snapshots = [*self._snapshots[-self.window :], current]
        self._record_trajectory(current)
        metrics = {self.tag("loss"): evaluation.loss}
        if evaluation.accuracy is not None:
            metrics[self.tag("accuracy")] = evaluation.accuracy
        if evaluation.churn is not None:
            metrics[self.tag("churn")] = evaluation.churn
        if math.isfinite(evaluation.jitter):
            metrics[self.tag("jitter")] = evaluation.jitter
        _logging.log_scalars(trainer, {k: v for k, v in metrics.items() if math.isfinite(v)}, step)
        self._decide(trainer, current)
        if figure and step > 0 and step % self.figure_every_n_steps == 0:
            self._draw(trainer)

    def _record_trajectory(self, current: Snapshot) -> None:
        self._trajectory_steps.append(current.step)
        self._trajectories.append(current.per_example()[:_MAX_LINES].clone())
        if len(self._trajectory_steps) > _MAX_POINTS:  # keep the first point, thin the rest by half
            keep = [0, *range(2, len(self._trajectory_steps), 2)]
            if keep[-1] != len(self._trajectory_steps) - 1:
                keep.append(len(self._trajectory_steps) - 1)
            self._trajectory_steps = [self._trajectory_steps[i] for i in keep]
            self._trajectories = [self._trajectories[i] for i in keep]

    # -- alerts ---------------------------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer, current: Snapshot) -> None:
        if not current.finite:
            self.alert(trainer, "non_finite", non_finite_text(current.step), {"step": current.step}, step=current.step)
            return
        oldest = self._snapshots[0] if len(self._snapshots) > self.window else None
        losses = [e.loss for e in self.history[-1:] if math.isfinite(e.loss)]
        self._best_loss = min([self._best_loss, *losses])
        verdict = judge(
            self.history[-2 * self.window - 1 :],  # the window, and as many before it for the trend
            (lambda: movement(oldest, current)) if oldest is not None else None,
            first_loss=self.history[0].loss,
            best_loss=self._best_loss,
            window=self.window,
            warmup_steps=self.warmup_steps,
            thrash_jitter=self.thrash_jitter,
            frozen_movement=self.frozen_movement,
        )
        if verdict.kind is not None:
            message = cause_text(verdict.kind, verdict.evidence, self.window, current.task == "regression")
            self.alert(trainer, verdict.kind, message, verdict.evidence, step=current.step)

    # -- figures --------------------------------------------------------------------------------------
    def _draw(self, trainer: pl.Trainer) -> None:
        if not _logging.draws_figures(trainer):
            return
        if not self._trajectories or not self._snapshots:
            return
        last = self._snapshots[-1]
        values = torch.stack(self._trajectories).numpy()  # (T, N)
        steps = self._trajectory_steps
        regression = last.task == "regression"
        figure = _logging.new_figure(10.0 if regression else 6.0, 4.0)
        axes = figure.subplots(1, 2) if regression else [figure.subplots()]
        ax = axes[0]
        ax.plot(steps, values, linewidth=0.8, alpha=0.7)
        ax.set_xlabel("optimizer step")
        if regression:
            targets = last.per_example_targets()[: values.shape[1]].numpy()
            ax.scatter([steps[-1]] * len(targets), targets, marker="_", s=80, color="black", label="target")
            ax.legend(loc="best", fontsize=7)
            ax.set_ylabel("prediction")
            ax.set_title("predictions over steps (ticks: targets)")
            scatter = axes[1]
            predictions = last.per_example()[: values.shape[1]].numpy()
            scatter.scatter(targets, predictions, s=12)
            low, high = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
            scatter.plot([low, high], [low, high], color="gray", linewidth=0.8, linestyle="--")
            scatter.set_xlabel("target")
            scatter.set_ylabel(f"prediction at step {steps[-1]}")
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("p(true class)" if last.task == "multiclass" else "p(true label)")
            ax.set_title(f"{values.shape[1]} fixed {self.batch_source} examples")
        self._figure_step = last.step  # the step drawn (a deferred read runs a hook after it)
        _logging.log_figure(trainer, self.tag("trajectories"), figure, self._figure_step)
