"""The logging seam's fast paths write exactly what torch's ``SummaryWriter`` would: histograms against
``make_histogram``, image grids against ``make_grid``, and both read back from the event file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard._utils import make_grid
from torch.utils.tensorboard.summary import make_histogram

from lightning_recipe import _logging
from tests.tensorboard import read_events

EDGES = [x / 4 for x in range(-49, 10)]


@pytest.mark.parametrize("seed", range(5))
def test_histogram_proto_matches_tensorboards_make_histogram(seed: int):
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randint(1, 40)
        # edges themselves, the last edge (closed bin), and values outside the edges (not counted)
        pool = [lambda: rng.uniform(-12.25, 2.25), lambda: rng.choice(EDGES), lambda: rng.uniform(-20, 10)]
        values = [rng.choice(pool)() for _ in range(n)]
        if not any(EDGES[0] <= v <= EDGES[-1] for v in values):
            assert sum(_logging.histogram_proto(values, EDGES).bucket) == 0  # make_histogram raises here
            continue
        expected = make_histogram(np.array(values, dtype=float), EDGES)
        got = _logging.histogram_proto(values, EDGES)
        assert list(got.bucket) == list(expected.bucket)
        assert list(got.bucket_limit) == list(expected.bucket_limit)
        assert (got.num, got.min, got.max) == (expected.num, expected.min, expected.max)
        assert got.sum == pytest.approx(expected.sum) and got.sum_squares == pytest.approx(expected.sum_squares)


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


def test_fast_images_read_back_from_the_event_file(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _Trainer(logger)
    gray = torch.rand(10, 1, 6, 6)
    _logging.log_images(trainer, "gray", gray, 7)
    _logging.log_images(trainer, "rgb", torch.rand(3, 3, 4, 4), 8)
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


@pytest.mark.parametrize(("height", "width", "channels"), [(1, 1, 1), (12, 48, 1), (7, 5, 3), (52, 208, 3)])
def test_png_decodes_to_the_same_pixels(height: int, width: int, channels: int):
    from io import BytesIO

    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
    decoded = Image.open(BytesIO(_logging.png(image)))
    assert decoded.mode == ("L" if channels == 1 else "RGB")
    assert (np.asarray(decoded).reshape(height, width, channels) == image.numpy()).all()


def test_png_of_scaled_up_filters_is_smaller_than_pils():
    """Fewer bytes is what makes an image cheap to log: TensorBoard checksums each byte in pure Python."""
    from io import BytesIO

    from PIL import Image

    from lightning_recipe.diagnostics.first_layer import filter_images

    image = _logging.grid(filter_images(torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(0))))
    buffer = BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format="PNG", compress_level=1)
    assert len(_logging.png(image)) < 0.9 * len(buffer.getvalue())


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
    assert list(histogram.histogram_value.bucket) == list(
        _logging.histogram_proto([-3.1, -3.0, -12.0, 0.5], EDGES).bucket
    )
    text = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert text.splitlines()[0].split(",") == ["a", "b", "step"] and "h" not in text.splitlines()[0].split(",")


def test_figures_are_drawn_only_where_tensorboard_will_write_them(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tests.models import trainer

    assert _logging.draws_figures(trainer(logger=TensorBoardLogger(str(tmp_path))))
    assert not _logging.draws_figures(trainer(logger=CSVLogger(str(tmp_path))))
    assert not _logging.draws_figures(trainer(logger=False))
