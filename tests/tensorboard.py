"""What was logged to TensorBoard, read back the way TensorBoard reads it: every event kept (the event
accumulator's default size guidance drops most of them)."""

from __future__ import annotations

import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

#: keep every event of each kind: the default keeps 500 scalars, 4 images and 1 tensor per tag
_EVERYTHING = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}


def read_events(log_dir: str | os.PathLike[str]) -> EventAccumulator:
    """The events under ``log_dir`` (one run's folder), loaded."""
    events = EventAccumulator(str(log_dir), size_guidance=_EVERYTHING)
    events.Reload()
    return events
