"""What a pre-flight check works with: the :class:`CheckContext` (the trainer, the module, a few training batches,
the user's batch adapter), and the ways it calls the user's ``training_step`` without a trace: the loss it
returns, ``self.log`` silenced, the plain attributes it changes put back, and which target each output is
trained towards.

Apart from :class:`~lightning_recipe.callbacks._preflight.PreflightCheck`, which decides *when* a check runs
and what its verdict does: this module is what a check's ``run`` (and the prediction dynamics logger, which
calls ``training_step`` the same way) touches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_recipe import _logging
from lightning_recipe.callbacks._data import fresh_containers
from lightning_recipe.callbacks._errors import CheckSkipped, NoLoss
from lightning_recipe.diagnostics.alignment import Alignment, gradient_at_outputs, may_shift, read_alignment
from lightning_recipe.diagnostics.batch import BatchAdapter, BatchNotUnderstood
from lightning_recipe.diagnostics.state import ModuleAttributes

__all__ = [
    "CheckContext",
    "ReachedUpdate",
    "loss_of",
    "shifted_twice_text",
    "silenced_logging",
    "stopped_at_first_update",
]


@dataclass
class CheckContext:
    """What a check works with: the trainer, the (unwrapped) module, a few training batches already on
    the device, and the user's batch adapter.

    ``start`` holds the module's plain attributes as the check found them: every ``training_step`` the check
    calls starts from them (see :meth:`training_step_loss`)."""

    trainer: pl.Trainer
    module: pl.LightningModule
    batches: list[Any]
    adapter: BatchAdapter
    component: str
    start: ModuleAttributes | None = field(default=None, repr=False)
    #: ``id(batch) -> its place in the fresh pass``, for batches that are not the pass's first ones (batches on
    #: which ``training_step`` returned no loss were passed over): the ``batch_idx`` training would give them
    positions: dict[int, int] = field(default_factory=dict, repr=False)
    _alignments: dict[int, Alignment | None] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def autocast(self) -> Any:
        """The precision context Lightning runs ``training_step`` in (autocast for mixed precision)."""
        plugin = getattr(self.trainer, "precision_plugin", None)
        return plugin.train_step_context() if plugin is not None else nullcontext()

    def training_step_loss(self, batch: Any, batch_idx: int = 0) -> Tensor:
        """The loss the user's own ``training_step`` returns on ``batch`` (``self.log`` is silenced).

        Each call starts from the plain attributes the module had when the check began: a ``training_step``
        that carries state (an RNN hidden state, a counter) sees what the first real step will see, and a
        check that repeats one batch (OverfitOneBatch) fits one fixed function, not a moving one. The state
        a call leaves is the module's from the batch just run, which training would carry to the *next*
        batch; the check's batches are not consecutive training batches."""
        if self.start is not None:
            self.start.restore()
        batch_idx = self.positions.get(id(batch), batch_idx)
        step = self.module.training_step
        # as Lightning does: `batch_idx` only when the signature takes it
        args = (batch, batch_idx) if is_param_in_hook_signature(step, "batch_idx", min_args=2) else (batch,)
        with self.autocast():
            output = step(fresh_containers(args[0]), *args[1:])  # a step may pop keys from its batch
        return loss_of(output)

    def alignment(self, batch: Any) -> Alignment | None:
        """Which target each output position of ``batch`` is trained towards, read from the gradient of the
        user's own loss (:func:`~lightning_recipe.diagnostics.alignment.read_alignment`): next-token training with the
        shift inside the model (``labels = input_ids``), labels shifted twice. ``None`` when the loss is not a
        classification loss over integer targets, or ``training_step`` cannot be called (manual optimization).
        Runs ``training_step`` once with gradients (none written to ``.grad``); the caller's snapshot restores
        what it changes."""
        key = id(batch)
        if key not in self._alignments:
            self._alignments[key] = self._read_alignment(batch)
        return self._alignments[key]

    def _read_alignment(self, batch: Any) -> Alignment | None:
        if not self.module.automatic_optimization:
            return None
        try:
            inputs, targets = self.adapter.get_inputs(batch), self.adapter.get_targets(batch)
        except BatchNotUnderstood:
            return None
        if not may_shift(targets, inputs):
            return None  # one label per example: no position to shift, no training_step to spend
        with torch.no_grad(), self.autocast():
            outputs = self.adapter.predict(self.module, inputs)
        try:
            with torch.enable_grad():
                grad = gradient_at_outputs(self.module, lambda: self.training_step_loss(batch), outputs.shape)
        except CheckSkipped:
            return None
        return None if grad is None else read_alignment(grad, targets, inputs)

    def tag(self, quantity: str) -> str:
        return _logging.tag(self.component, quantity)


def shifted_twice_text(alignment: Alignment) -> tuple[str, str]:
    """Summary and hint for labels shifted twice, in one voice for every check that reads it."""
    shift = alignment.input_shift
    summary = (
        f"labels shifted twice: the loss trains position t to predict input token t + {shift}, expected t + 1 "
        "(next-token training). The labels in the batch are already shifted by one"
        + (" and the model's loss shifts them again." if alignment.target_shift else ".")
    )
    hint = (
        "Shift once. Models that shift inside their own loss (Hugging Face `...ForCausalLM`, litgpt with "
        "`labels=`) take `labels = input_ids` unshifted (padding at -100); a model whose loss compares "
        "`logits[:, t]` with `labels[:, t]` takes `labels = input_ids[:, 1:]` with `input_ids[:, :-1]` as input. "
        "As it is, every position learns the token after next, which no causal model can predict."
    )
    return summary, hint


def loss_of(output: Any) -> Tensor:
    """The loss in what ``training_step`` returned: a tensor, or a dict with ``"loss"``."""
    if isinstance(output, dict):
        output = output.get("loss")
    if output is None:
        raise NoLoss(
            "`training_step` returned no loss (None, or a dict without 'loss'), so there is nothing to measure. "
            "Return the loss tensor (or {'loss': loss}) from `training_step`; with manual optimization the "
            "check cannot drive training itself."
        )
    if not isinstance(output, Tensor) or output.numel() != 1:
        raise CheckSkipped(
            f"Expected `training_step` to return a scalar loss tensor or a dict with 'loss', but got "
            f"{type(output).__name__}{tuple(output.shape) if isinstance(output, Tensor) else ''}."
        )
    return output.reshape(())


class ReachedUpdate(BaseException):
    """Raised where a ``training_step`` under manual optimization first backpropagates or steps an optimizer. A
    ``BaseException``: an ``except Exception`` in the user's step must not swallow it."""


def silenced_logging(module: pl.LightningModule) -> AbstractContextManager[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside the block, so a check's extra
    ``training_step`` calls neither crash nor leak into the logged metrics."""
    return _shadowed([module], ("log", "log_dict"), _ignore)


@contextmanager
def stopped_at_first_update(module: pl.LightningModule) -> Iterator[None]:
    """Inside the block, ``manual_backward`` and the ``step`` of every optimizer ``self.optimizers()`` hands out raise
    :class:`ReachedUpdate`: a ``training_step`` under manual optimization runs up to its first update and no further.
    The update is not the check's to take: it would run every callback's optimizer and backward hooks and count a
    step."""
    optimizers = module.optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    with _shadowed([module], ("manual_backward",), _stop), _shadowed(optimizers, ("step",), _stop):
        yield


@contextmanager
def _shadowed(owners: list[Any], names: tuple[str, ...], value: Any) -> Iterator[None]:
    """``value`` in place of the attributes ``names`` of each of ``owners`` inside the block: set on the instance,
    and taken off after, so the class's own are found again."""
    missing = object()
    saved = [(owner, name, owner.__dict__.get(name, missing)) for owner in owners for name in names]
    for owner, name, _ in saved:
        owner.__dict__[name] = value
    try:
        yield
    finally:
        for owner, name, old in saved:
            if old is missing:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = old


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _stop(*args: Any, **kwargs: Any) -> None:
    raise ReachedUpdate
