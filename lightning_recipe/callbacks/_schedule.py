"""When a monitor measures: one schedule, a function of the optimizer step.

Every monitor counts optimizer steps, not batches (under gradient accumulation several batches end on one step),
and ``every_n_steps=n`` means the same in each: steps 0, n, 2n, ... A schedule is a plain ``step -> bool`` callable
(as cockpit's ``schedules.linear``), so a test or a caller can inject any other; the ones here are frozen
dataclasses rather than closures, so a callback holding one still pickles (``ddp_spawn`` sends callbacks to its
workers by pickling them).

>>> schedule = Every(25)
>>> [step for step in range(80) if schedule(step)]
[0, 25, 50, 75]
>>> [step for step in range(12) if Every(5, first=3)(step)]
[0, 1, 2, 5, 10]
>>> [step for step in range(10) if AnyOf((Every(4), Every(6)))(step)]
[0, 4, 6, 8]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AnyOf", "Every", "Schedule"]

#: whether a monitor measures at an optimizer step
Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class Every:
    """Steps that are multiples of ``n``, and each of the first ``first`` steps (a monitor that must see the
    start closely: an exploding learning rate shows in the first steps, before the weights grow)."""

    n: int
    first: int = 0

    def __call__(self, step: int) -> bool:
        return step < self.first or step % self.n == 0


@dataclass(frozen=True)
class AnyOf:
    """Steps any of ``schedules`` measures at (a monitor with two cadences, as images and measurements)."""

    schedules: tuple[Schedule, ...]

    def __call__(self, step: int) -> bool:
        return any(schedule(step) for schedule in self.schedules)
