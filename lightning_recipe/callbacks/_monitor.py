"""What every training monitor shares: one lifecycle, its alerts, the guard that keeps it out of the user's way,
and when it measures.

The base owns Lightning's hooks; a monitor fills in four steps, each run under :meth:`Monitor.guard` and only
while the monitor is on:

- :meth:`Monitor.start` at ``on_train_start`` (find the layer, read the fixed batch, register hooks), which may
  instead :meth:`Monitor.wait_for_first_batch`: then :meth:`Monitor.start_with_batch` gets a copy of the first
  batch training fetches (a stream cannot be read twice, see :mod:`lightning_recipe.callbacks._data`);
- :meth:`Monitor.measure` at the end of a batch whose optimizer step the schedule names
  (:mod:`lightning_recipe.callbacks._schedule`), once per optimizer step under gradient accumulation, after the
  deferred reads that have arrived are flushed;
- :meth:`Monitor.finish` at ``on_train_end``, after which every deferred read is drained.

A monitor never raises into the training loop: :meth:`Monitor.guard` turns an internal error into one
:class:`RecipeWarning` and switches the monitor off. Each alert is recorded in ``.alerts`` and emitted once
(per kind and key) as a ``RecipeWarning`` from rank zero, and written to TensorBoard's text tab.

A monitor never makes the host wait for a GPU either: :meth:`Monitor.defer` copies what it measured to the host
without a sync and reads it at a later hook, once the device has got there. A host sync would drain the GPU's
queue and leave it idle while the next batch loads, a cost far larger than the measurement itself.

A monitor's state survives a checkpoint resume: ``state_dict`` holds, as plain data, the alerts raised and what its
next verdicts depend on (windows, streaks, histories), under a ``state_key`` built from its class and settings,
so a resumed run alerts as the uninterrupted one and two monitors of one class keep separate state.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_int
from lightning_recipe.callbacks._base import BatchOptions, RecipeCallback, batch_adapter
from lightning_recipe.callbacks._data import own_copy
from lightning_recipe.callbacks._errors import CheckSkipped, UserCodeError
from lightning_recipe.callbacks._schedule import Every, Schedule
from lightning_recipe.diagnostics.batch import BatchNotUnderstood
from lightning_recipe.diagnostics.task import TaskNotInferred
from lightning_recipe.report import Alert, RecipeWarning, jsonable

__all__ = ["NEEDS_ADAPTER", "BatchOptions", "Monitor"]

#: errors that mean "pass `inputs=` / `targets=` / `forward=` / `task=`": their message names the argument
NEEDS_ADAPTER = (BatchNotUnderstood, TaskNotInferred)


def _waits_for_device(tensors: Sequence[Tensor]) -> bool:
    """Whether reading ``tensors`` now would make the host wait for a device: :meth:`Monitor.defer` defers those."""
    return any(t.is_cuda for t in tensors)


class Monitor(RecipeCallback):
    """Base of the callbacks that watch a training run.

    Args:
        every_n_steps: measure on optimizer steps that are multiples of this (``schedule``, which a subclass or a
            caller may replace with any ``step -> bool``).
        inputs, targets, forward: how to read a batch, as for the checks
            (:class:`~lightning_recipe.callbacks._preflight.PreflightCheck`).
    """

    #: whether :meth:`measure` is called at the end of scheduled batches; a monitor that must see the weights
    #: on both sides of the optimizer step (the update ratio) measures in the optimizer's step hooks instead,
    #: with the same schedule and guard
    measures_at_batch_end = True

    def __init__(self, *, every_n_steps: int, **options: Unpack[BatchOptions]) -> None:
        check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        #: the optimizer steps the monitor measures at
        self.schedule: Schedule = Every(every_n_steps)
        self.adapter = batch_adapter(self, options, BatchOptions)
        self.alerts: list[Alert] = []
        self.enabled = True
        #: wall time spent in this monitor's hooks so far: its cost to the run (TensorBoard writes itself on a
        #: background thread, not counted here)
        self.seconds = 0.0
        self._alerted: set[tuple[str, str]] = set()
        self._pending: deque[tuple[list[Tensor], Any, Callable[[list[Tensor]], None]]] = deque()
        self._state_key: str | None = None
        self._stepped_to = 0  # the optimizer step the last batch ended on (or training started at)

    # -- the lifecycle a monitor fills in -----------------------------------------------------------------

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``on_train_start``: get ready to measure (or :meth:`wait_for_first_batch`)."""

    def start_with_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, reason: str) -> None:
        """After :meth:`wait_for_first_batch`: start on ``batch``, the monitor's own copy of the first batch."""

    def ready(self) -> bool:
        """Whether there is something to measure yet (the layer found, the fixed batch read)."""
        return True

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """At the end of a batch whose optimizer step ``step`` the schedule names, once per step."""

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``on_train_end``, before the deferred reads are drained: the last measurement, the last figure."""

    # -- Lightning's hooks, owned here ---------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stepped_to = int(trainer.global_step)
        self._waiting = None
        if self.enabled:
            with self.guard(trainer):
                self.start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        reason, self._waiting = self._waiting, None
        if reason is None or not self.enabled:
            return  # every batch but the first of a waiting monitor
        with self.guard(trainer):
            self.start_with_batch(trainer, pl_module, own_copy(batch), reason)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        if self._pending:
            with self.guard(trainer):
                self.flush()  # measurements whose copies have reached the host
        step = int(trainer.global_step)
        # under gradient accumulation most batches end without an optimizer step: a step is measured once, at
        # the batch that completed it; most steps end here too, with no guard to pay for
        stepped, self._stepped_to = step != self._stepped_to, step
        if not stepped or not self.measures_at_batch_end or not self.schedule(step):
            return
        if self.enabled and self.ready():
            with self.guard(trainer):
                self.measure(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.ready():
            with self.guard(trainer):
                self.finish(trainer, pl_module)
                self.flush(wait=True)  # the last readings: at the end of training waiting costs nothing

    # -- what keeps a monitor out of the user's way -------------------------------------------------------

    @contextmanager
    def guard(self, trainer: pl.Trainer | None = None) -> Iterator[None]:
        """Run the body; an error in it switches the monitor off with one warning, and training goes on.
        Hooks return early when ``self.enabled`` is false: a context manager cannot skip its body. The body's
        wall time is added to ``self.seconds``."""
        start = time.perf_counter()
        try:
            yield
        except NEEDS_ADAPTER as error:
            # the user's setup needs an adapter: one warning naming the argument to pass, as the checks skip
            # with; not an internal error, so no "please report this" and no traceback
            self.enabled = False
            self._pending.clear()
            self.on_disabled()
            rank_zero_warn(
                f"[lightning_recipe] {self.name} cannot read this run's batches or outputs and switched itself "
                f"off; training goes on. {error}",
                category=RecipeWarning,
            )
        except (CheckSkipped, UserCodeError) as error:
            # nothing to watch (an empty loader), or the user's data raised while the monitor read it: said plainly,
            # not as an internal error
            self.enabled = False
            self._pending.clear()
            self.on_disabled()
            what = (
                f"your code raised {error} while the monitor was {error.during}"
                if isinstance(error, UserCodeError)
                else str(error)
            )
            rank_zero_warn(
                f"[lightning_recipe] {self.name} switched itself off; training goes on. {what}",
                category=RecipeWarning,
            )
        except Exception as error:  # noqa: BLE001 - a monitor must never lose the user's run
            self.enabled = False
            self._pending.clear()
            self.on_disabled()
            rank_zero_warn(
                f"[lightning_recipe] {self.name} hit an error and switched itself off; training goes on. Please "
                f"report this: {type(error).__name__}: {error}\n{traceback.format_exc(limit=-4)}",
                category=RecipeWarning,
            )
        finally:
            self.seconds += time.perf_counter() - start

    def on_disabled(self) -> None:
        """Release what the monitor holds (hooks, copies) when it switches itself off."""

    def defer(self, tensors: Sequence[Tensor], then: Callable[[list[Tensor]], None]) -> None:
        """Call ``then`` with host copies of ``tensors`` once the device has computed them, without making the
        host wait. CUDA tensors are copied with ``non_blocking=True`` behind an event, and ``then`` runs at a
        later :meth:`flush` (the monitor's next hook); CPU tensors are read at once. Calls run in order."""
        tensors = [t.detach() for t in tensors]
        if not self._pending and not _waits_for_device(tensors):
            then(tensors)
            return
        stream = next((torch.cuda.current_stream(t.device) for t in tensors if t.is_cuda), None)
        if stream is None:  # host tensors queued behind a pending read: copied, a later step may write to them
            self._pending.append(([t.clone() for t in tensors], None, then))
            return
        host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory, on the current stream
        event = torch.cuda.Event()
        event.record(stream)
        self._pending.append((host, event, then))

    def flush(self, wait: bool = False) -> None:
        """Run the deferred reads whose copies have arrived, in order: called first thing in the monitor's
        hooks, so a read runs one hook after it was queued at the earliest. ``wait=True`` runs all of them (at
        the end of training, where waiting costs nothing)."""
        while self._pending:
            host, event, then = self._pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self._pending.popleft()
            then(host)

    def alert(
        self,
        trainer: pl.Trainer,
        kind: str,
        message: str,
        details: dict[str, Any] | None = None,
        key: str = "",
        step: int | None = None,
    ) -> Alert | None:
        """Record an alert and warn once per ``(kind, key)``; returns it, or ``None`` if already raised.
        ``step`` is the optimizer step the evidence was measured at (default: now)."""
        if (kind, key) in self._alerted:
            return None
        self._alerted.add((kind, key))
        step = int(trainer.global_step) if step is None else int(step)
        record = Alert(kind=kind, step=step, message=message, details=jsonable(details or {}))
        self.alerts.append(record)
        text = f"[lightning_recipe] {self.name} alert `{kind}` at step {record.step}: {message}"
        rank_zero_warn(text, category=RecipeWarning)
        _logging.log_text(trainer, self.tag("alerts"), text, record.step)
        return record

    # -- state across a checkpoint resume ------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        """Where this monitor's state lives in ``checkpoint["callbacks"]``: the class name and the settings that
        define it (Lightning's convention, as ``ModelCheckpoint`` and ``EarlyStopping`` have it), so two
        instances of one class with different settings keep separate state. Built once: Lightning reads it at
        every hook call (to name the hook for its profiler), and the settings do not change during a run."""
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self.state_settings())
        return self._state_key

    def state_settings(self) -> dict[str, Any]:
        """The constructor settings that tell this instance apart from another of its class (its schedule and
        thresholds): what :attr:`state_key` is built from. Subclasses add theirs."""
        return {"every_n_steps": self.every_n_steps}

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data (numbers, lists, dicts, CPU tensors; loadable with ``torch.load(weights_only=True)``): the
        alerts raised and what the monitor's next verdicts depend on (:meth:`save_state`), so a run resumed from
        the checkpoint alerts as the uninterrupted run does."""
        if self._pending and self.enabled:
            with self.guard():
                self.flush(wait=True)  # a checkpoint waits for the device anyway: the readings still in flight
        state = {
            "alerted": sorted(self._alerted),
            "alerts": [dataclasses.asdict(alert) for alert in self.alerts],
        }
        if self.enabled:  # a monitor that switched itself off holds nothing worth resuming from
            state["measurements"] = self.save_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._alerted = {(str(kind), str(key)) for kind, key in state_dict["alerted"]}
        self.alerts = [Alert(**alert) for alert in state_dict["alerts"]]
        if "measurements" in state_dict:
            self.restore_state(state_dict["measurements"])

    def save_state(self) -> dict[str, Any]:
        """What this monitor's verdicts depend on across steps (windows, streaks, histories), as plain data.
        Nothing rebuilt at ``on_train_start`` (hooks, handles, the trainer)."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`save_state` returned; called before ``on_train_start`` of the resumed run,
        which then continues from it instead of starting afresh."""
