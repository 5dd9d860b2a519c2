"""What every training monitor shares: its alerts, the guard that keeps it out of the user's way, and when
it measures.

A monitor never raises into the training loop: :meth:`Monitor.guard` turns an internal error into one
:class:`RecipeWarning` and switches the monitor off. Each alert is recorded in ``.alerts`` and emitted once
(per kind and key) as a ``RecipeWarning`` from rank zero, and written to TensorBoard's text tab.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_recipe import _logging
from lightning_recipe._args import check_int
from lightning_recipe.callbacks._base import RecipeCallback
from lightning_recipe.diagnostics.batch import BatchAdapter, ForwardFn, InputsFn, TargetsFn
from lightning_recipe.report import Alert, RecipeWarning, jsonable

__all__ = ["Monitor"]


class Monitor(RecipeCallback):
    """Base of the callbacks that watch a training run.

    Args:
        every_n_steps: measure on optimizer steps that are multiples of this.
        inputs, targets, forward: how to read a batch, as for the checks
            (:class:`~lightning_recipe.callbacks._preflight.PreflightCheck`).
    """

    def __init__(
        self,
        *,
        every_n_steps: int,
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.adapter = BatchAdapter.build(inputs, targets, forward)
        self.alerts: list[Alert] = []
        self.enabled = True
        #: wall time spent in this monitor's hooks so far: its cost to the run (TensorBoard writes itself on a
        #: background thread, not counted here)
        self.seconds = 0.0
        self._alerted: set[tuple[str, str]] = set()

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a measuring step."""
        return self.enabled and step % self.every_n_steps == 0

    @contextmanager
    def guard(self, trainer: pl.Trainer | None = None) -> Iterator[None]:
        """Run the body; an error in it switches the monitor off with one warning, and training goes on.
        Hooks return early when ``self.enabled`` is false: a context manager cannot skip its body. The body's
        wall time is added to ``self.seconds``."""
        start = time.perf_counter()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - a monitor must never lose the user's run
            self.enabled = False
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

    def alert(
        self, trainer: pl.Trainer, kind: str, message: str, details: dict[str, Any] | None = None, key: str = ""
    ) -> Alert | None:
        """Record an alert and warn once per ``(kind, key)``; returns it, or ``None`` if already raised."""
        if (kind, key) in self._alerted:
            return None
        self._alerted.add((kind, key))
        record = Alert(kind=kind, step=int(trainer.global_step), message=message, details=jsonable(details or {}))
        self.alerts.append(record)
        text = f"[lightning_recipe] {self.name} alert `{kind}` at step {record.step}: {message}"
        rank_zero_warn(text, category=RecipeWarning)
        _logging.log_text(trainer, self.tag("alerts"), text, record.step)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"alerted": sorted(self._alerted)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._alerted = {tuple(item) for item in state_dict.get("alerted", [])}  # type: ignore[misc]
