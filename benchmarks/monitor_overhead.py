"""Step-time overhead of each monitor, and of all three together, at default settings and when measuring
every step, on the quick-start CNN and a ResNet-18-sized network, on the CPU or a GPU.

    python benchmarks/monitor_overhead.py [--repeats 3] [--cnn-steps 400] [--resnet-steps 60]
    python benchmarks/monitor_overhead.py --accelerator gpu --precision bf16-mixed --resnet-batch 256

One process, one intra-op thread. For each model and configuration, runs without and with the monitors
alternate (A B A B ...), each a fresh seeded `fit` of N steps; a run's step time is its time from the start of
its 6th step to the end of its last, divided by the steps in between, so the periodic work of the monitors is
counted in full. Two numbers:
- in-hook: the time the monitors report spending in their own hooks (`monitor.seconds`) over the same steps,
  divided by the rest of the step time. Precise, but leaves out TensorBoard's background writer thread.
- A/B: step time with the monitors / without - 1, median over repeats [min, max], the pairs run in alternating
  order. What a user waits, but noisy on a shared CPU VM; the "none (A/A control)" row runs the same comparison
  with no monitor at all, and shows how far apart identical runs land. On a GPU the CPU-side in-hook time misses the
  kernels the monitors queue, and A/B is the number to read.
- floor: the part of the overhead that the prediction dynamics logger cannot avoid, its forward passes on the
  fixed batch (timed where they run, per step, over the step time). Every other cost is bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import ShapesCNN, make_shapes
from resnet import ResNet18

from lightning_recipe import PredictionDynamicsLogger
from lightning_recipe.registry import MONITORS as REGISTERED_MONITORS

WARMUP = 5
#: every registered monitor by class name (lightning_recipe/registry.py)
MONITORS = {cls.__name__: cls for cls in REGISTERED_MONITORS.values()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Clock(L.Callback):
    """Wall time per step from the start of step WARMUP to the end of the last step, and the monitors' own
    time (their ``seconds``) over the same steps. On a GPU, synchronised at both ends."""

    def __init__(self, monitors: list[L.Callback]) -> None:
        self.monitors = monitors

    def _spent(self) -> float:
        return sum(m.seconds for m in self.monitors)

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == WARMUP and not hasattr(self, "start"):
            _sync()
            self.start = (time.perf_counter(), self._spent())

    def on_train_end(self, trainer, *args) -> None:
        _sync()
        steps = trainer.global_step - WARMUP
        wall = time.perf_counter() - self.start[0]
        spent = self._spent() - self.start[1]
        self.per_step = wall / steps
        self.in_hook = spent / (wall - spent)


class ResNetModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ResNet18()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _cnn(batch: int = 64):
    data = make_shapes(512)
    return ShapesCNN, lambda: DataLoader(data, batch_size=batch, shuffle=True), lambda: DataLoader(data, batch_size=64)


def _resnet(batch: int = 32):
    g = torch.Generator().manual_seed(0)
    n = max(256, 4 * batch)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    train = lambda: DataLoader(data, batch_size=batch, shuffle=True)  # noqa: E731
    return ResNetModule, train, lambda: DataLoader(data, batch_size=32)


def _run(
    model_cls, train, val, steps: int, callbacks: list[L.Callback], logdir: Path, accelerator: str, precision: str
) -> tuple[float, float, float | None]:
    """(seconds per step, in-hook share, forward floor share or None)."""
    L.seed_everything(0, verbose=False)
    clock = Clock(callbacks)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        callbacks=[clock, *callbacks],
        logger=TensorBoardLogger(str(logdir)),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    dynamics = [m for m in callbacks if isinstance(m, PredictionDynamicsLogger)]
    forward = _TimedForward(dynamics[0], clock) if dynamics else None
    trainer.fit(model_cls(), train(), val())
    floor = forward.seconds / (trainer.global_step - WARMUP) / clock.per_step if forward is not None else None
    return clock.per_step, clock.in_hook, floor


class _TimedForward:
    """Times the dynamics logger's forward passes where they happen, inside the training loop (a forward pass
    timed alone in a loop runs on warm caches and takes about half as long), while the clock runs."""

    def __init__(self, logger: PredictionDynamicsLogger, clock: Clock) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.forward = logger.adapter.forward
        logger.adapter = replace(logger.adapter, forward=self)

    def __call__(self, module: L.LightningModule, inputs):
        _sync()
        start = time.perf_counter()
        outputs = self.forward(module, inputs)
        _sync()
        if hasattr(self.clock, "start") and not hasattr(self.clock, "per_step"):  # inside the clock's window
            self.seconds += time.perf_counter() - start
        return outputs


def _configs(every_step: bool, per_monitor: bool) -> dict[str, list]:
    kwargs = {"every_n_steps": 1} if every_step else {}
    configs = {name: (lambda cls=cls: [cls(**kwargs)]) for name, cls in MONITORS.items()} if per_monitor else {}
    configs["all three"] = lambda: [cls(**kwargs) for cls in MONITORS.values()]
    if not every_step:
        configs["none (A/A control)"] = lambda: []  # how far apart two identical runs land: the noise floor of A/B
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cnn-steps", type=int, default=400)
    parser.add_argument("--resnet-steps", type=int, default=60)
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=["cnn", "resnet18"])
    parser.add_argument(
        "--per-monitor",
        nargs="*",
        default=["cnn"],
        choices=["cnn", "resnet18"],
        help="models that also get one row per monitor (the others: all three together only)",
    )
    parser.add_argument("--settings", nargs="+", default=["default", "every step"], choices=["default", "every step"])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--cnn-batch", type=int, default=64)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument(
        "--out",
        default=None,
        help="write the table here (and the rows as JSON next to it); the committed results/monitor_overhead.md "
        "collects runs by hand, one section per machine and date, so it is not overwritten by default",
    )
    parser.add_argument("--logdir", default="/tmp/lightning_recipe_bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"{platform.machine()} CPU"
    run = partial(_run, logdir=Path(args.logdir), accelerator=args.accelerator, precision=args.precision)
    for model_name in args.models:
        if model_name == "cnn":
            model_cls, train, val = _cnn(args.cnn_batch)
        else:
            model_cls, train, val = _resnet(args.resnet_batch)
        steps = args.cnn_steps if model_name == "cnn" else args.resnet_steps
        batch = args.cnn_batch if model_name == "cnn" else args.resnet_batch
        run(model_cls, train, val, WARMUP + 5, [])  # first fit of a process: imports, kernels, allocator
        for settings in args.settings:
            for config, make in _configs(settings == "every step", model_name in args.per_monitor).items():
                in_hook, wall, base_times, floors = [], [], [], []
                for repeat in range(args.repeats):
                    # A B, then B A: whichever runs second in a pair is not always the one with the monitors
                    if repeat % 2 == 0:
                        base = run(model_cls, train, val, steps, [])
                        with_monitors = run(model_cls, train, val, steps, make())
                    else:
                        with_monitors = run(model_cls, train, val, steps, make())
                        base = run(model_cls, train, val, steps, [])
                    in_hook.append(with_monitors[1])
                    wall.append(with_monitors[0] / base[0] - 1)
                    base_times.append(base[0])
                    if with_monitors[2] is not None:
                        floors.append(with_monitors[2] * with_monitors[0] / base[0])
                rows.append(
                    {
                        "model": model_name,
                        "batch": batch,
                        "settings": settings,
                        "monitors": config,
                        "device": device,
                        "precision": args.precision,
                        "in_hook_median": statistics.median(in_hook),
                        "wall_overhead_median": statistics.median(wall),
                        "wall_overhead_min": min(wall),
                        "wall_overhead_max": max(wall),
                        "floor_median": statistics.median(floors) if floors else None,
                        "step_ms": 1000 * statistics.median(base_times),
                        "steps": steps,
                    }
                )
                print(rows[-1], flush=True)
    command = "python benchmarks/monitor_overhead.py " + " ".join(sys.argv[1:])
    lines = [
        "# Step-time overhead of the monitors",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {device}, torch {torch.__version__}, precision {args.precision}, 1 CPU thread, "
        f"{args.repeats} interleaved repeats  ",
        "In-hook: the monitors' own time in their hooks / the rest of the step time (median over repeats). A/B: step",
        "time with the monitors / without - 1, median [min, max]. Floor: the dynamics logger's forward passes on its",
        "fixed batch, timed where they run, per step (the part of its cost no bookkeeping can remove).",
        "",
        "| model (batch) | settings | monitors | in-hook overhead | A/B overhead | floor | step without (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = f"{100 * r['floor_median']:.2f}%" if r["floor_median"] is not None else "-"
        lines.append(
            f"| {r['model']} ({r['batch']}) | {r['settings']} | {r['monitors']} | {100 * r['in_hook_median']:.2f}% | "
            f"{100 * r['wall_overhead_median']:+.1f}% [{100 * r['wall_overhead_min']:+.1f}, "
            f"{100 * r['wall_overhead_max']:+.1f}] | {floor} | {r['step_ms']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
