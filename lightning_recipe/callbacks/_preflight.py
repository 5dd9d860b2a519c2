"""What every pre-flight check shares: when it runs, how it reads batches without moving the real
dataloader, the snapshot that makes it side-effect free, rank agreement, and what a verdict does.

A check runs before the first optimizer step, after the optimizers exist and the sanity validation ran: at
``on_train_start`` on a fresh pass over the training dataloader, or, where a second pass could change what training
reads (a stream, a stateful sampler: see :mod:`lightning_recipe.callbacks._data`), at the first
``on_train_batch_start`` on a copy of the batch training fetched. Subclasses implement :meth:`PreflightCheck.run`
on a :class:`CheckContext`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import ON_FAIL_CHOICES, check_choice
from lightning_recipe.callbacks._base import RecipeCallback
from lightning_recipe.callbacks._data import (
    first_batch_note,
    fresh_batches,
    fresh_containers,
    fresh_pass_refusal,
    loader_generators,
    own_copy,
)
from lightning_recipe.callbacks._errors import CheckSkipped, NoLoss, UserCodeError, user_code_location
from lightning_recipe.diagnostics.alignment import Alignment, gradient_at_outputs, may_shift, read_alignment
from lightning_recipe.diagnostics.batch import BatchAdapter, BatchNotUnderstood, ForwardFn, InputsFn, TargetsFn
from lightning_recipe.diagnostics.compiled import eager
from lightning_recipe.diagnostics.state import ModuleAttributes, preserved
from lightning_recipe.report import CheckResult, CheckStatus, RecipeCheckError, RecipeWarning, jsonable

__all__ = [
    "CheckContext",
    "CheckSkipped",
    "PreflightCheck",
    "UserCodeError",
    "shifted_twice_text",
]

_SEVERITY = {CheckStatus.PASSED: 0, CheckStatus.SKIPPED: 1, CheckStatus.FAILED: 2}


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
        user's own loss (:func:`~lightning_recipe.diagnostics.alignment.read_alignment`): next-token training with
        the shift inside the model (``labels = input_ids``), labels shifted twice. ``None`` when the loss is not a
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


@contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside the block, so a check's extra
    ``training_step`` calls neither crash nor leak into the logged metrics."""
    missing = object()
    saved = {name: module.__dict__.get(name, missing) for name in ("log", "log_dict")}
    for name in saved:
        module.__dict__[name] = _ignore
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters: a summary is one line, and some
    errors (torch.compile's) carry pages of internals. The full traceback goes to ``details``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _own_step_error(ctx: CheckContext) -> Exception | None:
    """The exception the user's ``training_step`` raises on the first of the check's (unmodified) training
    batches that makes it raise, or ``None`` when it runs on all of them. Not tried with manual optimization,
    whose ``training_step`` steps the optimizers itself (the caller's snapshot would restore them, but a step
    there is not ours to take)."""
    if not ctx.module.automatic_optimization:
        return None
    for index, batch in enumerate(ctx.batches):
        try:
            ctx.training_step_loss(batch, index)
        except CheckSkipped:
            continue
        except Exception as error:  # noqa: BLE001 - that is what we are looking for
            return error
    return None


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def agree_across_ranks(trainer: pl.Trainer, result: CheckResult) -> CheckResult:
    """One verdict for all ranks: the worst status wins, and its lowest rank's result is broadcast.
    Every rank calls this, whatever it saw, so the collectives always line up."""
    strategy = trainer.strategy
    if trainer.world_size <= 1:
        return result
    severity = _SEVERITY[result.status]
    device = strategy.root_device
    worst = int(strategy.reduce(torch.tensor(severity, device=device), reduce_op="max").item())
    candidate = trainer.global_rank if severity == worst else trainer.world_size
    source = int(strategy.reduce(torch.tensor(candidate, device=device), reduce_op="min").item())
    agreed = strategy.broadcast(result, src=source)
    if trainer.world_size > 1:
        agreed = replace(agreed, details={**agreed.details, "rank": source, "world_size": trainer.world_size})
    return agreed


class PreflightCheck(RecipeCallback):
    """Base of the checks that run once before the first optimizer step of ``fit``.

    Args:
        on_fail: ``"raise"`` stops ``fit`` with :class:`RecipeCheckError`; ``"warn"`` emits a
            :class:`RecipeWarning` and lets training go on.
        inputs: ``batch -> X``, what the model takes (a tensor, or a tuple/dict of tensors).
        targets: ``batch -> Tensor``, the labels.
        forward: ``(module, X) -> outputs``; default ``module(X)``, ``module(*X)``, ``module(**X)``.
    """

    #: how many training batches :meth:`run` receives
    num_batches: ClassVar[int] = 1
    #: whether :meth:`run` needs the loss ``training_step`` returns: then batches on which it returns ``None``
    #: (skipped by Lightning) are passed over, up to ``spare_batches`` more read from the same fresh pass
    needs_loss: ClassVar[bool] = False
    spare_batches: ClassVar[int] = 8

    def __init__(
        self,
        *,
        on_fail: str = "raise",
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
    ) -> None:
        check_choice("on_fail", on_fail, ON_FAIL_CHOICES)
        self.on_fail = on_fail
        self.adapter = BatchAdapter.build(inputs, targets, forward)
        self.result: CheckResult | None = None
        self._user_error: BaseException | None = None
        self._waiting: str | None = None  # why the check waits for the first batch training fetches

    def run(self, ctx: CheckContext) -> CheckResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- results ---------------------------------------------------------------------------------
    def passed(self, summary: str, details: dict[str, Any] | None = None, hint: str | None = None) -> CheckResult:
        return CheckResult(self.name, CheckStatus.PASSED, summary, hint, jsonable(details or {}))

    def failed(self, summary: str, hint: str, details: dict[str, Any] | None = None) -> CheckResult:
        return CheckResult(self.name, CheckStatus.FAILED, summary, hint, jsonable(details or {}))

    def skipped(self, summary: str, details: dict[str, Any] | None = None) -> CheckResult:
        return CheckResult(self.name, CheckStatus.SKIPPED, summary, None, jsonable(details or {}))

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._waiting = fresh_pass_refusal(trainer.train_dataloader) if trainer.global_step == 0 else None
        if self._waiting is None:
            self.finish(trainer, self.execute(trainer, pl_module))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._waiting is None:
            return
        reason, self._waiting = self._waiting, None
        self.finish(trainer, self.execute(trainer, pl_module, first=(own_copy(batch), batch_idx, reason)))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._waiting is None:
            return
        reason, self._waiting = self._waiting, None
        self.finish(
            trainer,
            self.skipped(
                f"{self.name} could not run: training ended before it fetched a batch, and the check waited for the "
                f"first one ({reason})."
            ),
        )

    def execute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, first: tuple[Any, int, str] | None = None
    ) -> CheckResult:
        """Run the check under a full snapshot, on fresh batches or, given ``first = (batch, batch_idx, why)``, on
        that batch (a copy of the first one training fetched); never raises (an internal error is a ``skipped``
        result with a warning, an error of the user's code a ``failed`` one whose exception :meth:`finish`
        raises). Every rank must call it: the verdict is agreed across ranks."""
        start = time.perf_counter()
        self._user_error = None
        result = self._execute_local(trainer, pl_module, first)
        if first is not None:
            note = first_batch_note(first[2], self.num_batches)
            result = replace(result, summary=f"{result.summary} {note}", details={**result.details, "read": note})
        result = replace(result, duration_s=time.perf_counter() - start)
        return agree_across_ranks(trainer, result)

    def _execute_local(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, first: tuple[Any, int, str] | None
    ) -> CheckResult:
        if trainer.global_step > 0:
            return self.skipped(
                f"training already ran {trainer.global_step} optimizer steps (resumed run); "
                "the check only applies before the first step."
            )
        try:
            loader = trainer.train_dataloader
            generators = loader_generators(loader) if isinstance(loader, DataLoader) else []
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            with (
                preserved(pl_module, trainer.optimizers, schedulers, generators) as state,
                silenced_logging(pl_module),
                eager(),  # a compiled model runs uncompiled: see diagnostics/compiled.py
                torch.enable_grad(),
            ):
                stream = fresh_batches(trainer) if first is None else iter(())
                try:
                    batches = list(islice(stream, self.num_batches)) if first is None else [first[0]]
                    if not batches:
                        raise CheckSkipped("the training dataloader yielded no batch.")
                    ctx = CheckContext(
                        trainer, pl_module, batches, self.adapter, self.component, start=state.attributes
                    )
                    if first is not None:
                        ctx.positions[id(first[0])] = first[1]
                    failure: Exception | None = None
                    try:
                        try:
                            return self._run_fitted(ctx)
                        except NoLoss:
                            if not self.needs_loss or not self._batches_with_loss(ctx, stream):
                                raise
                        return self._run_fitted(ctx)
                    except CheckSkipped:
                        raise
                    except Exception as error:  # noqa: BLE001 - re-raised below unless it is the user's
                        failure = error
                finally:
                    if hasattr(stream, "close"):
                        stream.close()
                # Whose error is it? The check calls the model on guesses of ours (an input read from the batch,
                # a slice of it), where a model may rightly raise; the user's `training_step` on the user's own
                # batch is what training will call. If that raises, the bug is the user's. (Tried outside the
                # `except` block, so the user's exception does not get ours as its __context__.) It runs from the
                # state the check began with: a check that drove the weights to NaN (a learning rate too large for
                # the model) must not make the user's own step on the user's own weights look broken.
                state.restore()
                own = _own_step_error(ctx)
                if own is not None:
                    raise UserCodeError(own, "running `training_step` on a training batch")
                assert failure is not None  # every other way out of the block above returns or raises
                raise failure
        except UserCodeError as marked:
            return self._user_failed(marked)
        except (CheckSkipped, BatchNotUnderstood) as reason:
            return self.skipped(f"{self.name} could not run: {reason}")
        except Exception as error:  # noqa: BLE001 - a check must never lose the user's run
            rank_zero_warn(
                f"{self.name} hit an error and was skipped; training goes on. Please report this: "
                f"{type(error).__name__}: {_one_line(error)}",
                category=RecipeWarning,
            )
            return self.skipped(
                f"{self.name} could not run: {type(error).__name__}: {_one_line(error)}",
                {"traceback": traceback.format_exc(limit=-6)},
            )

    def _run_fitted(self, ctx: CheckContext) -> CheckResult:
        with torch.no_grad(), ctx.autocast():
            ctx.adapter = self.adapter.fitted(ctx.module, ctx.batches[0])
        return self.run(ctx)

    def _batches_with_loss(self, ctx: CheckContext, stream: Iterator[Any]) -> bool:
        """Replace ``ctx.batches`` by the first ``num_batches`` batches of the same fresh pass on which
        ``training_step`` returns a loss (Lightning skips a batch on which it returns ``None``, and so does the
        check), reading at most :attr:`spare_batches` more. ``False`` when no batch read has a loss."""
        kept: list[Any] = []
        positions: dict[int, int] = {}
        candidates = [*ctx.batches, *islice(stream, self.spare_batches)]
        for position, batch in enumerate(candidates):
            try:
                ctx.training_step_loss(batch, position)
            except NoLoss:
                continue
            kept.append(batch)
            positions[id(batch)] = position
            if len(kept) == self.num_batches:
                break
        if not kept:
            return False
        ctx.batches, ctx.positions = kept, positions
        ctx._alignments.clear()
        return True

    def _user_failed(self, marked: UserCodeError) -> CheckResult:
        """The failed result for an exception of the user's code, naming it and where it was raised; the
        exception is kept for :meth:`finish` to raise unchanged."""
        error = marked.original
        self._user_error = error
        where = user_code_location(error)
        at = f" at {where[0]} (in `{where[1]}`)" if where is not None else ""
        summary = (
            f"your code raised {type(error).__name__}: {_one_line(error)}{at} while the check was {marked.during}: "
            "an error in the model or its data, not in lightning_recipe."
        )
        hint = (
            f"Fix the {type(error).__name__}{at or ''}; training would crash on its first step the same way. The "
            "full traceback is in the result's details (`traceback`)."
        )
        details = {
            "user_error": {
                "type": type(error).__name__,
                "message": str(error),
                "location": where[0] if where is not None else None,
                "function": where[1] if where is not None else None,
                "during": marked.during,
            },
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        }
        return self.failed(summary, hint, details)

    def finish(self, trainer: pl.Trainer, result: CheckResult) -> None:
        """Record, report (rank zero) and act on the verdict. An error of the user's code comes out of
        ``fit`` as the user's own exception object, as it would at the first step without the check, whatever
        ``on_fail`` says; a rank that did not see it (another rank did) stops with the agreed result, so no rank
        trains on alone into a collective the failed one never reaches."""
        self.result = result
        if "user_error" in result.details:
            error, self._user_error = self._user_error, None
            if error is not None:
                raise error
            raise RecipeCheckError(result)
        _logging.log_text(trainer, self.tag("verdict"), result.format(), trainer.global_step)
        if result.status is not CheckStatus.FAILED:
            rank_zero_info(result.format())
            return
        if self.on_fail == "raise":
            raise RecipeCheckError(result)
        rank_zero_warn(result.format(), category=RecipeWarning)
