"""What UpdateRatioMonitor draws for each measured step: log10 of every tensor's ratio, the median the verdict
reads, and a histogram across the optimizer's parameters, written as one event (each event costs ~0.1 ms).

Log10, because healthy and broken ratios are decades apart (1e-3 against 1e-7 or 1). A parameter that did not
move (ratio 0) is drawn at :data:`LOG10_ZERO` rather than left out, so a frozen layer shows as a flat line at the
bottom. The histogram has fixed edges: ~6x cheaper than edges computed at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl

from lightning_recipe import _logging
from lightning_recipe.diagnostics.update_ratio_cause import Measurement

__all__ = ["HIST_EDGES", "LOG10_ZERO", "log10", "log_ratios"]

LOG10_ZERO = -12.0
"""Where a parameter that did not move is drawn (log10 of 0 is -inf)."""
HIST_EDGES = [x / 4 for x in range(-49, 10)]
"""The histogram's bins: log10 ratio from -12.25 to 2.25 in quarter decades."""


def log10(x: float) -> float:
    """log10 of a ratio; :data:`LOG10_ZERO` for 0, NaN for a ratio that is not a number (not drawn)."""
    return math.log10(x) if x > 0 else (LOG10_ZERO if x == 0 else math.nan)


def log_ratios(
    trainer: pl.Trainer, tag: Callable[[str], str], tags: dict[str, str], index: int, reading: Measurement
) -> None:
    """Log ``reading``, a step of optimizer ``index``, from rank zero. ``tag`` builds a tag from a quantity;
    ``tags`` caches each parameter's tag (built once: a model has hundreds of parameters). The two tags that
    summarise an optimizer get ``_optimizer{index}`` appended for ``index > 0``."""
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    logs = [log10(r) for r in reading.ratios]
    scalars: dict[str, float] = {}
    for name, value in zip(reading.names, logs, strict=True):
        if math.isfinite(value):
            if name not in tags:
                tags[name] = tag(f"log10_ratio/{name}")
            scalars[tags[name]] = value
    suffix = "" if index == 0 else f"_optimizer{index}"
    if reading.median is not None:
        scalars[tag(f"median_log10_ratio{suffix}")] = log10(reading.median)
    finite = [min(max(v, LOG10_ZERO), HIST_EDGES[-1]) for v in logs if math.isfinite(v)]
    histogram = {tag(f"log10_ratios{suffix}"): (finite, HIST_EDGES)}
    _logging.log_scalars(trainer, scalars, reading.step, histograms=histogram)
