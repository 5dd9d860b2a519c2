"""FirstLayerVisualizer: the first layer's filters as images, how noise-like they are, and whether they move.

Recipe item (Karpathy, CS231n): "visualize the first-layer weights: nice edges vs noise". The math is in
:mod:`lightning_recipe.diagnostics.first_layer`; this file finds the layer at the start of training, logs,
and words the alerts.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_int, check_positive
from lightning_recipe.callbacks._data import fresh_pass_refusal, loader_generators, peek_batches
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._first_layer_text import cause_text, frozen_note, noisy_text, not_changing_text
from lightning_recipe.callbacks._monitor import BatchOptions, Monitor
from lightning_recipe.callbacks._schedule import AnyOf, Every
from lightning_recipe.diagnostics.batch import BatchNotUnderstood
from lightning_recipe.diagnostics.first_layer import (
    LayerTrace,
    LayerView,
    Thresholds,
    describe_layer,
    filter_alerts,
    filter_images,
    gathered,
    layer_weights,
    looks_random,
    moved_from_init,
    noise_score,
    norm,
    resolve_layer,
    spectral_excess,
    trace_first_layer,
    weighted_modules,
    why_not_changing,
)
from lightning_recipe.diagnostics.state import RngState, evaluating
from lightning_recipe.diagnostics.walk import tensors_of
from lightning_recipe.report import RecipeWarning

__all__ = ["FirstLayerVisualizer"]

MAX_SAVED_WEIGHTS = 2**24
"""The most first-layer weights a checkpoint keeps a copy of at their start (64 MB in fp32): more than any image
model's first layer; a language model's embedding is larger, and its movement is measured from the resume."""


class FirstLayerVisualizer(Monitor):
    """Shows the first layer's weights as images and alerts when they do not change, or still look like
    noise late in training.

    The first layer is found at the start of training by watching one forward pass (eval mode, no
    gradients, on a batch read from a fresh pass over the training dataloader, random number generators
    restored: the run is unchanged): the first module with weights whose input derives from the model input,
    whatever the registration order. ``layer=`` names it instead.

    Images: ``Conv2d`` kernels with 1 or 3 input channels one image per filter, other channel counts one
    grayscale image per channel; ``Linear`` weights over flattened ``(N, C, H, W)`` inputs reshaped to
    ``(C, H, W)``. Each image min-max normalised on its own, at most ``max_images``. Other first layers
    (a ``Linear`` over plain vectors, ``nn.Embedding``, ``nn.LSTM``) get no images and no noise score, only
    the movement measure and the ``not_changing`` alert; the log text says so.

    Alerts (``.alerts``, each once, as a :class:`~lightning_recipe.RecipeWarning` too):

    - ``not_changing``: from step ``not_changing_after_steps`` on, the weights moved at most 1e-7 of their
      norm since the start: frozen by mistake, missing from the optimizer, or no gradient reaches them.
      A layer frozen on purpose (``requires_grad=False``) whose weights have structure (pretrained: a noise
      score below ``noisy_above`` for image-like layers, otherwise a largest singular value at least 1.5x a
      random matrix's) is not alerted: ``.note`` and the TensorBoard text ``notes`` say why. Frozen at its random
      initialisation is the bug, and is alerted.
    - ``noisy``: from step ``late_after_steps`` on, the noise score is at least ``noisy_above`` (i.i.d.
      noise scores ~1) *and* the weights moved less than ``noisy_moved_below`` of their norm. Looks alone
      mislead early (healthy filters look noisy for hundreds of steps), so movement must agree.

    A checkpoint keeps the layer's weights at the start of training, so a resumed run measures movement from them
    and alerts as the uninterrupted run would; a first layer of more than ``MAX_SAVED_WEIGHTS`` weights (a language
    model's embedding) is not copied into checkpoints, and a run resumed from one measures movement from the
    weights found at the resume.

    Args:
        layer: name of the module to watch (as in ``model.named_modules()``); default: found by the forward
            pass. Unknown names are refused when ``fit`` sets up, with the list of modules with weights.
        every_n_steps: log images every this many optimizer steps (also at the start and at the end).
        measure_every_n_steps: log the scalars and decide alerts every this many optimizer steps. At the default,
            100, a first layer that never moves is alerted at step 100 (``not_changing_after_steps``).
        max_images: most filter images per logged grid.
        not_changing_after_steps, late_after_steps, noisy_above, noisy_moved_below: see
            :class:`~lightning_recipe.diagnostics.first_layer.Thresholds`.
        inputs, targets, forward: how to read a batch, as for the checks.

    Example::

        trainer = L.Trainer(callbacks=[FirstLayerVisualizer()], logger=TensorBoardLogger("logs"))
        trainer.fit(model, datamodule)   # Images tab: recipe/first_layer_visualizer/filters

    Logged:
        - ``recipe/first_layer_visualizer/filters``: the filter grid (TensorBoard), at the start, every
          ``every_n_steps`` and at the end of training.
        - ``recipe/first_layer_visualizer/noise_score``: ~1 for noise, towards 0 for smooth filters (image-like
          layers only), every ``measure_every_n_steps``.
        - ``recipe/first_layer_visualizer/moved_from_init``: ``||W - W0|| / ||W0||``, every
          ``measure_every_n_steps``.
        - ``recipe/first_layer_visualizer/layer`` (text): which layer, how it was found, how it is shown.
    """

    def __init__(
        self,
        layer: str | None = None,
        *,
        every_n_steps: int = 500,
        measure_every_n_steps: int = 100,
        max_images: int = 64,
        not_changing_after_steps: int = Thresholds.not_changing_after_steps,
        late_after_steps: int = Thresholds.late_after_steps,
        noisy_above: float = Thresholds.noisy_above,
        noisy_moved_below: float = Thresholds.noisy_moved_below,
        **options: Unpack[BatchOptions],
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **options)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(
                f"Expected `layer` to be the name of a module of the model (as in `model.named_modules()`) "
                f"or None, but got {layer!r}."
            )
        check_int("measure_every_n_steps", measure_every_n_steps, 1)
        check_int("max_images", max_images, 1)
        check_int("not_changing_after_steps", not_changing_after_steps, 1)
        check_int("late_after_steps", late_after_steps, 1)
        check_positive("noisy_above", noisy_above)
        check_positive("noisy_moved_below", noisy_moved_below)
        self.layer = layer
        self.measure_every_n_steps = measure_every_n_steps
        self.max_images = max_images
        # two cadences: the filter images every `every_n_steps`, the measurements every `measure_every_n_steps`
        self._images_due, self._measure_due = Every(every_n_steps), Every(measure_every_n_steps)
        self.schedule = AnyOf((self._images_due, self._measure_due))
        self.thresholds = Thresholds(
            not_changing_after_steps=not_changing_after_steps,
            late_after_steps=late_after_steps,
            noisy_above=float(noisy_above),
            noisy_moved_below=float(noisy_moved_below),
        )
        self.layer_name: str | None = None  # the layer watched, once found
        self.view: LayerView | None = None
        self.baseline_score: float | None = None
        self.last_moved: float | None = None  # ||W - W0|| / ||W0|| at the last measurement
        #: set when the layer is frozen with pretrained structure (no alert then), in words
        self.note: str | None = None
        self._module: nn.Module | None = None
        self._initial: list[Tensor] | None = None
        self._initial_norm = 0.0
        self._model_input_shape: tuple[int, ...] | None = None
        self._layer_input_shape: tuple[int, ...] | None = None
        self._resumed: dict[str, Any] | None = None  # the watched layer's start, from a checkpoint
        self._start_step = 0
        self._last_measured = -1
        self._last_images = -1

    # -- state across a checkpoint resume ------------------------------------------------------------
    @override
    def state_settings(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            **super().state_settings(),
            "measure_every_n_steps": self.measure_every_n_steps,
            **{name: getattr(self.thresholds, name) for name in _THRESHOLD_ARGUMENTS},
        }

    @override
    def save_state(self) -> dict[str, Any]:
        # the layer found, its weights and noise score at the start (what movement and the noisy verdict are
        # measured against) and the step it was found at (what the step thresholds count from)
        if self._resumed is not None:
            return dict(self._resumed)
        if self._initial is None or self.layer_name is None:
            return {}  # not found yet: the resumed run finds it
        if sum(w.numel() for w in self._initial) > MAX_SAVED_WEIGHTS:
            return {}
        return {
            "layer_name": self.layer_name,
            "layer_input_shape": _shape(self._layer_input_shape),
            "model_input_shape": _shape(self._model_input_shape),
            "initial": list(self._initial),
            "initial_norm": self._initial_norm,
            "baseline_score": self.baseline_score,
            "start_step": self._start_step,
            "last_moved": self.last_moved,
            "note": self.note,
            "last_measured": self._last_measured,
            "last_images": self._last_images,
        }

    @override
    def restore_state(self, state: dict[str, Any]) -> None:
        if state.get("layer_name") is not None and state.get("initial") is not None:
            self._resumed = dict(state)  # the module is found at on_train_start

    def _resume(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Watch the layer of the interrupted run, measured against its start: no trace, no new baseline."""
        name = str(state["layer_name"])
        module = resolve_layer(pl_module, name)
        self._layer_input_shape = _shape(state.get("layer_input_shape"))
        self._model_input_shape = _shape(state.get("model_input_shape"))
        self.view = describe_layer(module, self._layer_input_shape, self._model_input_shape)
        self.layer_name = name
        self._module = module
        self._initial = [w.cpu() for w in state["initial"]]
        self._initial_norm = float(state["initial_norm"])
        self.baseline_score = state.get("baseline_score")
        self._start_step = int(state.get("start_step", 0))
        self.last_moved = state.get("last_moved")
        self.note = state.get("note")
        self._last_measured = int(state.get("last_measured", -1))
        self._last_images = int(state.get("last_images", -1))

    # -- configuration, refused early ----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # bad configuration, not an internal error: raised, never guarded. Modules built in
        # `configure_model` do not exist yet; those are checked in on_fit_start.
        if self.layer is not None and stage == "fit" and not is_overridden("configure_model", pl_module):
            resolve_layer(pl_module, self.layer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layer is not None:
            resolve_layer(pl_module, self.layer)

    # -- the monitor's lifecycle -----------------------------------------------------------------------
    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed is not None:  # the layer and its start come from the checkpoint
            resumed, self._resumed = self._resumed, None
            self._resume(pl_module, resumed)
            return
        # the layer is found by tracing a batch: from a fresh pass, or where a second pass could change what
        # training reads (see callbacks/_data.py), from the first batch training fetches. Asked at a resume too: a
        # resumed stream would hand a fresh pass the records training is about to get
        refusal = fresh_pass_refusal(trainer.train_dataloader)
        if refusal is not None:
            self.wait_for_first_batch(refusal)
        else:
            self._start(trainer, pl_module)

    @override
    def start_with_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, reason: str) -> None:
        self._start(trainer, pl_module, batch)

    @override
    def ready(self) -> bool:
        return self._module is not None

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self._images_due(step):
            self._log_images(trainer, step)
        if self._measure_due(step):
            self._measure(trainer, step)

    @override
    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step != self._last_images:
            self._log_images(trainer, step)
        if step != self._last_measured:
            self._measure(trainer, step)

    @override
    def on_disabled(self) -> None:
        self._module = None
        self._initial = None

    # -- work ----------------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> None:
        trace = self._trace(trainer, pl_module, batch)
        if self.layer is not None:
            name, how = self.layer, "named by `layer=`"
        elif trace is not None and trace.first is not None:
            name, how = trace.first, "the first module with weights to read the model input in a forward pass"
        else:
            ran = ", ".join(trace.ran) if trace is not None and trace.ran else "none"
            rank_zero_warn(
                f"[lightning_recipe] {self.name} could not tell which layer reads the input (modules with weights "
                f"that ran on it: {ran}; modules with weights: {', '.join(weighted_modules(pl_module)) or 'none'}). "
                "Pass `layer=` with the module's name (and `inputs=` / `forward=` if the model is not called as "
                "`model(batch[0])`); the visualizer is off for this run.",
                category=RecipeWarning,
            )
            self.enabled = False
            return
        module = resolve_layer(pl_module, name)
        shapes = trace.input_shapes if trace is not None else {}
        self._layer_input_shape = shapes.get(name)
        self.view = describe_layer(module, self._layer_input_shape, self._model_input_shape)
        self.layer_name = name
        self._module = module
        self._initial = [w.to("cpu", copy=True) for w in gathered(layer_weights(module))]  # measured on the host
        self._initial_norm = norm(self._initial)
        self._start_step = int(trainer.global_step)
        score = self._score()
        self.baseline_score = score
        if self.view.image_like:
            shown = (
                f"shown as images under `{self.tag('filters')}`; noise score at the start {score:.3f} (i.i.d. "
                "noise ~1, smooth filters towards 0)"
            )
        else:
            shown = (
                f"not image-like ({self.view.reason}): no images and no noise score, only "
                "`moved_from_init` and the not-changing alert"
            )
        text = f"First layer `{name}`: {self.view.description}, {how}; {shown}."
        _logging.log_text(trainer, self.tag("layer"), text, self._start_step)
        self._log_images(trainer, self._start_step)
        self._measure(trainer, self._start_step)

    def _trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> LayerTrace | None:
        """One watched forward pass on ``batch`` or a peeked one, in eval mode without gradients, leaving every mode
        and random number generator as it was. ``None`` when no batch can be read (then ``layer=`` is needed)."""
        loader = trainer.train_dataloader
        generators = loader_generators(loader) if isinstance(loader, DataLoader) else []
        self._model_input_shape = None
        rng = RngState.capture(generators)
        try:
            batch = peek_batches(trainer, 1)[0] if batch is None else batch
            with evaluating(pl_module):
                adapter = self.adapter
                try:
                    return self._trace_with(pl_module, adapter, batch)
                except Exception:  # noqa: BLE001 - our reading of the batch; let the adapter find a better one
                    adapter = adapter.fitted(pl_module, batch)
                    return self._trace_with(pl_module, adapter, batch)
        except (CheckSkipped, BatchNotUnderstood):
            return None  # then `layer=` is needed, and the caller says so
        finally:
            rng.restore()

    def _trace_with(self, pl_module: nn.Module, adapter: Any, batch: Any) -> LayerTrace:
        inputs = adapter.get_inputs(batch)
        sources = list(tensors_of(inputs))
        self._model_input_shape = tuple(sources[0].shape) if sources else None
        return trace_first_layer(pl_module, lambda: adapter.forward(pl_module, inputs), sources)

    def _weight(self) -> Tensor:
        assert self._module is not None
        return gathered(layer_weights(self._module))[0]

    def _score(self, weight: Tensor | None = None) -> float | None:
        if self.view is None or not self.view.image_like:
            return None
        return noise_score(self.view.filters(self._weight() if weight is None else weight))

    def _log_images(self, trainer: pl.Trainer, step: int) -> None:
        self._last_images = step
        if self.view is None or not self.view.image_like:
            return
        view, max_images, tag = self.view, self.max_images, self.tag("filters")
        self.defer(
            [self._weight()],
            lambda host: _logging.log_images(trainer, tag, filter_images(view.filters(host[0]), max_images), step),
        )

    def _measure(self, trainer: pl.Trainer, step: int) -> None:
        """Copy the weights to the host now; measure them there when they arrive (on a GPU, at a later hook)."""
        assert self._module is not None
        self._last_measured = step
        self.defer(gathered(layer_weights(self._module)), lambda host: self._measured(trainer, step, host))

    def _measured(self, trainer: pl.Trainer, step: int, weights: list[Tensor]) -> None:
        assert self._initial is not None
        moved = moved_from_init(weights, self._initial, self._initial_norm)
        self.last_moved = moved
        score = self._score(weights[0])
        scalars = {self.tag("moved_from_init"): moved}
        if score is not None:
            scalars[self.tag("noise_score")] = score
        _logging.log_scalars(trainer, scalars, step)
        for kind in filter_alerts(step - self._start_step, moved, score, self.thresholds):
            if kind == "not_changing" and self._frozen_on_purpose(weights[0], score):
                self._note_frozen(trainer, step, score)
                continue
            self._raise(trainer, kind, step, moved, score)

    def _frozen_on_purpose(self, weight: Tensor, score: float | None) -> bool:
        """A layer with ``requires_grad=False`` whose weights have structure (smooth filters, a spectrum no
        random matrix has): pretrained and frozen on purpose. Frozen at its random init is the bug."""
        assert self._module is not None
        frozen = not any(w.requires_grad for w in layer_weights(self._module))
        return frozen and not looks_random(weight, score, self.thresholds.noisy_above)

    def _note_frozen(self, trainer: pl.Trainer, step: int, score: float | None) -> None:
        if self.note is not None:
            return
        excess = spectral_excess(self._initial[0]) if self._initial else float("nan")
        self.note = frozen_note(self.layer_name, score, excess)
        _logging.log_text(trainer, self.tag("notes"), f"[lightning_recipe] {self.name} note: {self.note}", step)

    def _raise(self, trainer: pl.Trainer, kind: str, step: int, moved: float, score: float | None) -> None:
        steps = step - self._start_step
        details: dict[str, Any] = {
            "layer": self.layer_name,
            "moved_from_init": moved,
            "noise_score": score,
            "noise_score_at_start": self.baseline_score,
            "steps": steps,
        }
        if kind == "not_changing":
            assert self._module is not None
            cause = why_not_changing(layer_weights(self._module), trainer.optimizers)
            details["cause"] = cause_text(cause)
            message = not_changing_text(self.layer_name, steps, moved, self.thresholds, details["cause"])
        else:
            message = noisy_text(self.layer_name, steps, moved, score, self.baseline_score, self.thresholds)
        self.alert(trainer, kind, message, details, step=step)


_THRESHOLD_ARGUMENTS = ("not_changing_after_steps", "late_after_steps", "noisy_above", "noisy_moved_below")


def _shape(shape: Any) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(n) for n in shape)
