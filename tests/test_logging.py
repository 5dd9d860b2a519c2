"""The logging seam writes what torch's ``SummaryWriter`` would: image grids laid out as ``make_grid`` lays them,
scalars and histograms in one event, all read back from the event file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard._utils import make_grid
from torch.utils.tensorboard.summary import make_histogram

from lightning_recipe import _logging
from tests.tensorboard import read_events

EDGES = [x / 4 for x in range(-49, 10)]


@pytest.mark.parametrize("n", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_grid_lays_tiles_out_as_tensorboards_make_grid(n: int, channels: int):
    images = torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(n))
    expected = (make_grid(images.numpy()).transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8)
    got = _logging.grid(images).numpy()
    assert got.shape == (*expected.shape[:2], channels)
    assert (got == expected[:, :, :channels]).all()  # make_grid repeats a grey channel three times


class _Trainer:
    """What the logging seam reads of a Trainer."""

    global_rank = 0

    def __init__(self, logger) -> None:
        self.loggers = [logger]


def test_image_grids_read_back_from_the_event_file_pixel_for_pixel(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _Trainer(logger)
    gray = torch.rand(10, 1, 6, 6)
    _logging.log_images(trainer, "gray", gray, 7)
    colour = torch.rand(3, 3, 4, 4)
    _logging.log_images(trainer, "rgb", colour, 8)
    logger.experiment.flush()
    acc = read_events(logger.log_dir)
    (image,) = acc.Images("gray")
    assert (image.step, image.width, image.height) == (7, 8 * 6, 2 * 6)  # 8 tiles a row, two rows
    from io import BytesIO

    from PIL import Image

    decoded = np.asarray(Image.open(BytesIO(image.encoded_image_string)))
    assert decoded.shape == (12, 48)
    assert (decoded == _logging.grid(gray).numpy()[:, :, 0]).all()  # lossless
    (rgb,) = acc.Images("rgb")
    assert (rgb.width, rgb.height) == (3 * 4, 4)
    assert (np.asarray(Image.open(BytesIO(rgb.encoded_image_string))) == _logging.grid(colour).numpy()).all()


def test_scalars_and_histograms_logged_together_read_back_and_other_loggers_get_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    csv = CSVLogger(str(tmp_path), name="csv")
    trainer = _Trainer(logger)
    trainer.loggers.append(csv)
    _logging.log_scalars(trainer, {"a": 1.5, "b": -2.0}, 3, histograms={"h": ([-3.1, -3.0, -12.0, 0.5], EDGES)})
    _logging.log_scalars(trainer, {"a": 2.5}, 4, histograms={"h": ([], EDGES)})  # nothing to draw: no histogram
    logger.experiment.flush()
    csv.save()
    acc = read_events(logger.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("a")] == [(3, 1.5), (4, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("b")] == [(3, -2.0)]
    (histogram,) = acc.Histograms("h")
    assert histogram.step == 3 and histogram.histogram_value.num == 4
    assert histogram.histogram_value.min == pytest.approx(-12.0)
    expected = make_histogram(np.array([-3.1, -3.0, -12.0, 0.5]), EDGES)  # what `add_histogram(bins=EDGES)` draws
    assert list(histogram.histogram_value.bucket) == list(expected.bucket)
    assert list(histogram.histogram_value.bucket_limit) == list(expected.bucket_limit)
    text = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert text.splitlines()[0].split(",") == ["a", "b", "step"] and "h" not in text.splitlines()[0].split(",")


def test_figures_are_drawn_only_where_tensorboard_will_write_them(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tests.models import trainer

    assert _logging.draws_figures(trainer(logger=TensorBoardLogger(str(tmp_path))))
    assert not _logging.draws_figures(trainer(logger=CSVLogger(str(tmp_path))))
    assert not _logging.draws_figures(trainer(logger=False))
