"""Hand-written PNG encoder and ``HistogramProto`` builder against the libraries the package already depends on,
on what the monitors log: first-layer filter grids (FirstLayerVisualizer, BatchLeakageProbe's dependency
matrix) and the log10-ratio histograms (UpdateRatioMonitor).

    python benchmarks/logging_encoders.py [--repeats 200]

One process, one intra-op thread. Each variant writes into its own TensorBoard event file (torch's
``SummaryWriter``), and each number is the median over ``--repeats`` calls:

- images: *encode*, the PNG alone (in the hook); *log*, the whole ``add_summary``/``add_images`` call plus the
  writer's ``flush``, which also pays for TensorBoard's pure-Python CRC over every byte (on the writer's thread,
  holding the GIL: time the training loop loses either way); the PNG's size; and whether it decodes to the
  same pixels as the hand grid.
- histograms: the proto alone, and the event that ``_logging.log_scalars`` writes for UpdateRatioMonitor (one
  scalar per parameter and the histogram) plus ``flush``.

The hand PNG encoder and histogram builder are copied here as they were in ``lightning_recipe/_logging.py`` (commit
d8b6a95), so the comparison still runs once the package uses the library; the grid is the package's own.
"""

from __future__ import annotations

import argparse
import bisect
import io
import platform
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_recipe._logging import grid
from lightning_recipe.callbacks._update_ratio_log import HIST_EDGES
from lightning_recipe.diagnostics.first_layer import filter_images

# -- the hand versions, as the package had them ------------------------------------------------------------


def hand_png(image: torch.Tensor, level: int = 6) -> bytes:
    height, width, channels = image.shape
    rows = torch.zeros(height, width * channels + 1, dtype=torch.uint8)
    rows[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    pixels = zlib.compress(rows.numpy().tobytes(), level)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hand_histogram(values: list[float], edges: list[float]) -> Any:
    counts = [0] * (len(edges) - 1)
    last = len(counts) - 1
    for v in values:
        if edges[0] <= v <= edges[-1]:
            counts[min(bisect.bisect_right(edges, v) - 1, last)] += 1
    filled = [i for i, c in enumerate(counts) if c > 0]
    start, end = (filled[0], filled[-1] + 1) if filled else (0, 1)
    kept = counts[start - 1 : end] if start > 0 else [0, *counts[:end]]
    return HistogramProto(
        min=min(values),
        max=max(values),
        num=len(values),
        sum=sum(values),
        sum_squares=sum(v * v for v in values),
        bucket_limit=edges[start : end + 1],
        bucket=kept,
    )


# -- the library versions ------------------------------------------------------------------------------------


def pil_png(image: torch.Tensor, **options: Any) -> bytes:
    array = image.numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def library_histogram(values: list[float], edges: list[float]) -> Any:
    return make_histogram(np.asarray(values, dtype=float), edges)


# -- what is logged --------------------------------------------------------------------------------------------


def logged_images() -> dict[str, torch.Tensor]:
    """Name -> the ``(N, C, H, W)`` images in [0, 1] a component logs (random weights: noise compresses worst)."""
    torch.manual_seed(0)
    return {
        "quickstart CNN conv1 16x1x3x3 (grey)": filter_images(torch.randn(16, 1, 3, 3)),
        "ResNet-18 conv1 64x3x7x7 (RGB)": filter_images(torch.randn(64, 3, 7, 7)),
        "ViT patch embedding 64 of 192x3x16x16 (RGB)": filter_images(torch.randn(192, 3, 16, 16), 64),
        "MLP on 28x28 inputs, 64 of 128 rows (grey)": filter_images(torch.randn(128, 1, 28, 28), 64),
        "leakage dependency matrix 64x64 (grey)": torch.rand(1, 1, 64, 64),
    }


HISTOGRAM_SIZES = {  # name -> parameter tensors an optimizer holds
    "quickstart CNN": 6,
    "ResNet-18": 62,
    "GPT-2 small": 148,
    "1000 parameters": 1000,
}


def _medians_us(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, in microseconds, the functions interleaved (A B C A B C ...) so that
    other work on the machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm: imports, first allocations
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def _image_logger(writer: SummaryWriter, encode: Callable[[], bytes], shape: torch.Size) -> Callable[[], None]:
    """What ``_logging.log_images`` does with an encoder: one image event, then the writer's flush."""
    file_writer = writer._get_file_writer()

    def log() -> None:
        image = Summary.Image(height=shape[0], width=shape[1], colorspace=shape[2], encoded_image_string=encode())
        file_writer.add_summary(Summary(value=[Summary.Value(tag="filters", image=image)]), 0)
        file_writer.flush()

    return log


def images(repeats: int, folder: Path) -> list[str]:
    lines = [
        "| image | pixels | variant | grid + PNG (us) | log + flush (us) | PNG bytes | same pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batch in logged_images().items():
        tiled = grid(batch)
        height, width, channels = tiled.shape
        encoders: dict[str, Callable[[], bytes]] = {
            "hand PNG": lambda b=batch: hand_png(grid(b)),
            "PIL PNG, default level": lambda b=batch: pil_png(grid(b)),
            "PIL PNG, compress_level=1": lambda b=batch: pil_png(grid(b), compress_level=1),
        }
        loggers: dict[str, Callable[[], Any]] = {}
        writers = []
        for variant, encode in encoders.items():
            writers.append(SummaryWriter(str(folder / f"{variant}-{name}")))
            loggers[variant] = _image_logger(writers[-1], encode, tiled.shape)
        writers.append(SummaryWriter(str(folder / f"add_images-{name}")))

        def add_images(w: SummaryWriter = writers[-1], b: torch.Tensor = batch) -> None:
            w.add_images("filters", b, 0, dataformats="NCHW")
            w.flush()

        loggers["SummaryWriter.add_images"] = add_images
        encoded = _medians_us(encoders, repeats)
        logged = _medians_us(loggers, repeats)
        for writer in writers:
            writer.close()
        for variant in loggers:
            events = EventAccumulator(str(folder / f"{'add_images' if variant not in encoders else variant}-{name}"))
            events.Reload()
            data = events.Images("filters")[-1].encoded_image_string
            decoded = np.asarray(Image.open(io.BytesIO(data)))  # add_images: RGB, a grey channel repeated
            decoded = decoded.reshape(*decoded.shape[:2], -1)
            same = decoded.shape[:2] == tiled.shape[:2] and bool((decoded[:, :, :channels] == tiled.numpy()).all())
            encode_us = f"{encoded[variant]:.0f}" if variant in encoded else "-"
            lines.append(
                f"| {name} | {height}x{width}x{channels} | {variant} | {encode_us} | "
                f"{logged[variant]:.0f} | {len(data)} | {same} |"
            )
    return lines


def histograms(repeats: int, folder: Path) -> list[str]:
    lines = [
        "| optimizer | parameters | variant | proto (us) | scalars + histogram event + flush (us) | same proto |",
        "|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    builders = {"hand": hand_histogram, "make_histogram (numpy)": library_histogram}
    for name, n in HISTOGRAM_SIZES.items():
        values = np.clip(rng.normal(-3, 1.5, n), -12.0, 2.25).tolist()  # log10 ratios, clamped as logged
        tags = [f"recipe/update_ratio_monitor/log10_ratio/p{i}" for i in range(n)]
        expected = hand_histogram(values, HIST_EDGES)
        built: dict[str, Callable[[], Any]] = {}
        logged: dict[str, Callable[[], Any]] = {}
        writers = []
        for variant, build in builders.items():
            writer = SummaryWriter(str(folder / f"{variant}-{name}"))
            file_writer = writer._get_file_writer()

            def log(
                build: Callable[..., Any] = build, w: Any = file_writer, tags: list = tags, values: list = values
            ) -> None:
                # what `_logging.log_scalars` writes for UpdateRatioMonitor: one event, every scalar and the histogram
                summary = [Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values, strict=True)]
                summary.append(Summary.Value(tag="log10_ratios", histo=build(values, HIST_EDGES)))
                w.add_summary(Summary(value=summary), 0)
                w.flush()

            built[variant] = lambda b=build, v=values: b(v, HIST_EDGES)
            logged[variant] = log
            writers.append(writer)
        built_us, logged_us = _medians_us(built, repeats), _medians_us(logged, repeats)
        for writer in writers:
            writer.close()
        for variant, build in builders.items():
            got = build(values, HIST_EDGES)
            same = list(got.bucket) == list(expected.bucket) and list(got.bucket_limit) == list(expected.bucket_limit)
            lines.append(f"| {name} | {n} | {variant} | {built_us[variant]:.0f} | {logged_us[variant]:.0f} | {same} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.node()}, torch {torch.__version__}, Pillow {Image.__version__}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        print("\n".join(images(args.repeats, Path(folder))))
        print()
        print("\n".join(histograms(args.repeats, Path(folder))))


if __name__ == "__main__":
    main()
