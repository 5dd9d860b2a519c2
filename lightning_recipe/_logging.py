"""The one logging seam: scalars through every Lightning logger, images/figures/text through TensorBoard.

Tags are ``recipe/<component>/<quantity>``. Without a TensorBoard logger, figures and images are skipped
with one warning per process. Everything here is a no-op off rank zero.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = [
    "draws_figures",
    "grid",
    "log_figure",
    "log_images",
    "log_scalars",
    "log_text",
    "new_figure",
    "tag",
]

_warned_no_tensorboard = False


def tag(component: str, quantity: str) -> str:
    return f"recipe/{component}/{quantity}"


def _tensorboard_logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


def draws_figures(trainer: pl.Trainer) -> bool:
    """Whether a figure or image logged now would be written (rank zero, a TensorBoard logger): a component asks
    before it spends the time to draw one."""
    return trainer.global_rank == 0 and _tensorboard_logger(trainer) is not None


def _writer(trainer: pl.Trainer) -> Any | None:
    global _warned_no_tensorboard
    if trainer.global_rank != 0:
        return None
    logger = _tensorboard_logger(trainer)
    if logger is not None:
        return logger.experiment
    if trainer.loggers and not _warned_no_tensorboard:
        _warned_no_tensorboard = True
        warnings.warn(
            "lightning_recipe draws its figures and images with TensorBoard, and this Trainer has no "
            "TensorBoardLogger: figures are skipped, scalars still go to your loggers. Add "
            "`lightning.pytorch.loggers.TensorBoardLogger` to `Trainer(logger=[...])` to see them.",
            stacklevel=3,
        )
    return None


@rank_zero_only
def log_scalars(
    trainer: pl.Trainer,
    metrics: dict[str, float],
    step: int,
    histograms: dict[str, tuple[list[float], list[float]]] | None = None,
) -> None:
    """Every value to every logger at ``step``. A TensorBoard logger gets them as one event: about 5x cheaper
    than one ``add_scalar`` per value (0.2 vs 1.1 ms for 20 values here), which is most of what a monitor's
    measurement costs on a small model.

    ``histograms`` maps a tag to ``(values, bin edges)``, values inside the edges: TensorBoard only (other loggers
    have no histograms), written in the same event as the scalars, as ``add_histogram(bins=edges)`` draws them."""
    for logger in trainer.loggers:
        writer = _file_writer(logger)
        if writer is None:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if histograms and isinstance(logger, TensorBoardLogger):  # an experiment other than torch's writer
                for name, (values, edges) in histograms.items():
                    if values:
                        logger.experiment.add_histogram(name, torch.tensor(values), global_step=step, bins=edges)
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import make_histogram

        values = [Summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()]
        for name, (numbers, edges) in (histograms or {}).items():
            if numbers:
                values.append(Summary.Value(tag=name, histo=make_histogram(np.asarray(numbers, dtype=float), edges)))
        if values:
            writer.add_summary(Summary(value=values), step)


def _file_writer(logger: Any) -> Any | None:
    """The event-file writer behind a TensorBoard logger that uses torch's ``SummaryWriter``, else ``None``."""
    return _event_file(logger.experiment) if isinstance(logger, TensorBoardLogger) else None


def _event_file(experiment: Any) -> Any | None:
    """The event-file writer of a torch ``SummaryWriter`` (``None`` for tensorboardX and others)."""
    from torch.utils.tensorboard import SummaryWriter  # here: importing it costs ~0.3 s

    return getattr(experiment, "file_writer", None) if isinstance(experiment, SummaryWriter) else None


def log_figure(trainer: pl.Trainer, name: str, figure: Figure, step: int) -> None:
    writer = _writer(trainer)
    if writer is not None:
        writer.add_figure(name, figure, global_step=step, close=True)


def log_text(trainer: pl.Trainer, name: str, text: str, step: int) -> None:
    writer = _writer(trainer)
    if writer is not None:
        writer.add_text(name, text, global_step=step)


def log_images(trainer: pl.Trainer, name: str, images: Tensor, step: int) -> None:
    """``images`` is ``(N, C, H, W)`` in [0, 1], ``C`` 1 or 3: drawn as one grid, 8 tiles a row (as
    ``add_images`` draws it). On a torch ``SummaryWriter`` the grid is built in torch and a grey one stays grey:
    ``add_images`` draws grey as RGB, 2.4x the bytes, which TensorBoard's writer checksums in pure Python; 64 grey
    30x30 tiles cost 68-120 ms a picture that way against 19-28 ms here (benchmarks/results/logging_encoders.md)."""
    writer = _writer(trainer)
    if writer is None:
        return
    images = images.detach().float().cpu()
    file_writer = _event_file(writer)  # the logger `_writer` found: no second search
    if file_writer is None or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        writer.add_images(name, images, global_step=step, dataformats="NCHW")
        return
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    picture = grid(images)
    height, width, channels = picture.shape
    png = io.BytesIO()  # Pillow's fastest level: its default makes these grids 1-10% smaller in up to 4x the time
    Image.fromarray(picture[:, :, 0].numpy() if channels == 1 else picture.numpy()).save(png, "PNG", compress_level=1)
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)


def grid(images: Tensor, columns: int = 8) -> Tensor:
    """``(N, C, H, W)`` floats in [0, 1] as one ``(rows * H, columns * W, C)`` uint8 image, row by row,
    empty tiles black, as ``torch.utils.tensorboard``'s ``make_grid`` lays them out."""
    n, c, h, w = images.shape
    columns = min(n, columns)
    rows = -(-n // columns)
    canvas = torch.zeros(rows * columns, c, h, w, dtype=torch.uint8)
    canvas[:n] = (images * 255).clamp(0, 255).to(torch.uint8)
    return canvas.reshape(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)


def new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A matplotlib figure that needs no display and no pyplot state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")
