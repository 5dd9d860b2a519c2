"""What every pre-flight check shares: when it runs, how it reads batches without moving the real
dataloader, the snapshot that makes it side-effect free, rank agreement, and what a verdict does.

A check runs before the first optimizer step, after the optimizers exist and the sanity validation ran: at
``on_train_start`` on a fresh pass over the training dataloader, or, where a second pass could change what training
reads (a stream, a stateful sampler: see :mod:`lightning_recipe.callbacks._data`), at the first
``on_train_batch_start`` on a copy of the batch training fetched. Subclasses implement :meth:`PreflightCheck.run`
on a :class:`~lightning_recipe.callbacks._context.CheckContext` (what a check works with).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from itertools import islice
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import ON_FAIL_CHOICES, OnFail, check_choice
from lightning_recipe.callbacks._base import DEFAULTS, CheckOptions, RecipeCallback, batch_adapter
from lightning_recipe.callbacks._context import CheckContext, ReachedUpdate, silenced_logging, stopped_at_first_update
from lightning_recipe.callbacks._data import (
    first_batch_note,
    fresh_batches,
    fresh_pass_refusal,
    loader_generators,
    own_copy,
)
from lightning_recipe.callbacks._errors import CheckSkipped, NoLoss, UserCodeError, user_code_location
from lightning_recipe.diagnostics.batch import BatchNotUnderstood
from lightning_recipe.diagnostics.compiled import eager
from lightning_recipe.diagnostics.state import ModuleAttributes, preserved
from lightning_recipe.report import CheckResult, CheckStatus, RecipeCheckError, RecipeWarning, jsonable

__all__ = ["CheckOptions", "PreflightCheck", "agree_across_ranks"]

#: the first batch training fetched (training's own object), its ``batch_idx``, and why the check waited for it
FirstBatch = tuple[Any, int, str]

_SEVERITY = {CheckStatus.PASSED: 0, CheckStatus.SKIPPED: 1, CheckStatus.FAILED: 2}


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters: a summary is one line, and some
    errors (torch.compile's) carry pages of internals. The full traceback goes to ``details``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _own_step_error(ctx: CheckContext) -> Exception | None:
    """The exception the user's ``training_step`` raises on the first of the check's (unmodified) training
    batches that makes it raise, or ``None`` when it runs on all of them. Under manual optimization the step runs up
    to its first update only (:func:`stopped_at_first_update`): whatever it raises before is the user's."""
    manual = not ctx.module.automatic_optimization
    with stopped_at_first_update(ctx.module) if manual else nullcontext():
        for index, batch in enumerate(ctx.batches):
            try:
                ctx.training_step_loss(batch, index)
            except (CheckSkipped, ReachedUpdate):
                continue
            except Exception as error:  # noqa: BLE001 - that is what we are looking for
                return error
    return None


def _blame(ctx: CheckContext, failure: Exception) -> Exception:
    """Whose error is it? The check calls the model on guesses of ours (an input read from the batch, a slice of
    it), where a model may rightly raise; the user's ``training_step`` on the user's own batch is what training
    will call. If that raises, the bug is the user's (:class:`UserCodeError`); else ``failure`` is ours. Called
    outside any ``except`` block, so the user's exception does not get ours as its ``__context__``."""
    own = _own_step_error(ctx)
    return UserCodeError(own, "running `training_step` on a training batch") if own is not None else failure


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

    # `**options` is written out in __signature__ (RecipeCallback.__init_subclass__): help() and jsonargparse read it
    def __init__(self, **options: Unpack[CheckOptions]) -> None:
        self.adapter = batch_adapter(self, options, CheckOptions)
        self.on_fail: OnFail = options.get("on_fail", DEFAULTS["on_fail"])
        check_choice("on_fail", self.on_fail, ON_FAIL_CHOICES)
        self.result: CheckResult | None = None
        self._user_error: BaseException | None = None

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
        self._waiting = None
        # a resumed run (global_step > 0) is skipped at once by `execute`, which then reads no batch at all
        refusal = fresh_pass_refusal(trainer.train_dataloader) if trainer.global_step == 0 else None
        if refusal is not None:
            self.wait_for_first_batch(refusal)
        else:
            self.finish(trainer, self.execute(trainer, pl_module))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        reason, self._waiting = self._waiting, None
        if reason is not None:  # training's own batch: the check copies it (own_copy) where it can skip
            self.finish(trainer, self.execute(trainer, pl_module, first=(batch, batch_idx, reason)))

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
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, first: FirstBatch | None = None
    ) -> CheckResult:
        """Run the check under a full snapshot, on fresh batches or, given ``first = (batch, batch_idx, why)``, on
        its own copy of that batch (the first one training fetched); never raises (an internal error is a ``skipped``
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
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, first: FirstBatch | None
    ) -> CheckResult:
        """This rank's result, every way out of the check sorted into one: the user's error (failed), a reason
        not to run (skipped), or an internal error (skipped, with a warning that asks for a report)."""
        if trainer.global_step > 0:
            return self.skipped(
                f"training already ran {trainer.global_step} optimizer steps (resumed run); "
                "the check only applies before the first step."
            )
        try:
            return self._run_isolated(trainer, pl_module, first)
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

    def _run_isolated(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, first: FirstBatch | None
    ) -> CheckResult:
        """Read the batches and run the check inside a full snapshot (module, optimizers, schedulers, RNGs, the
        loader's generators), with ``self.log`` silenced and a compiled model run eagerly; an error it raises
        comes out blamed on the user or on us (:func:`_blame`)."""
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
                ctx = self._context(trainer, pl_module, stream, first, state.attributes)
                outcome = self._attempt(ctx, stream)
            finally:
                if hasattr(stream, "close"):
                    stream.close()
            # under manual optimization no check calls the whole `training_step` (it updates the weights itself):
            # a check that came to a verdict still asks, so a crash past the forward pass fails the sanity run
            if isinstance(outcome, CheckResult) and pl_module.automatic_optimization:
                return outcome
            # the user's step runs from the state the check began with: a check that drove the weights to NaN (a
            # learning rate too large for the model) must not make the user's own step look broken
            state.restore()
            if not isinstance(outcome, CheckResult):
                raise _blame(ctx, outcome)
            own = _own_step_error(ctx)
            if own is not None:
                raise UserCodeError(own, "running `training_step` on a training batch")
            return outcome

    def _context(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stream: Iterator[Any],
        first: FirstBatch | None,
        start: ModuleAttributes,
    ) -> CheckContext:
        """The check's context on its first :attr:`num_batches` batches of the fresh pass, or on ``first``."""
        # training's own first batch is read through a copy: a batch that cannot be copied is a skip
        batches = list(islice(stream, self.num_batches)) if first is None else [own_copy(first[0])]
        if not batches:
            raise CheckSkipped("the training dataloader yielded no batch.")
        ctx = CheckContext(trainer, pl_module, batches, self.adapter, self.component, start=start)
        if first is not None:
            ctx.positions[id(batches[0])] = first[1]
        return ctx

    def _attempt(self, ctx: CheckContext, stream: Iterator[Any]) -> CheckResult | Exception:
        """The check's result, or the exception it raised for :func:`_blame` to sort (``CheckSkipped`` means what
        it says and goes up). A check that needs the loss, where ``training_step`` returned none on the first
        batches, tries again on the batches of the same pass that have one."""
        try:
            try:
                return self._run_fitted(ctx)
            except NoLoss:
                if not self.needs_loss or not self._batches_with_loss(ctx, stream):
                    raise
            return self._run_fitted(ctx)
        except CheckSkipped:
            raise
        except Exception as error:  # noqa: BLE001 - returned to be blamed, outside this `except` block
            return error

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
