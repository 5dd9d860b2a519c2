"""Wall time of each pre-flight check on the quick-start model, as a multiple of one training step.

    python benchmarks/check_cost.py [--repeats 5] [--out benchmarks/results/check_cost.md]

One process, one intra-op thread (stable timings on a shared machine). For each repeat, interleaved:
a plain fit measures the median optimizer step (forward + backward + step, from `on_train_batch_start`
to `on_train_batch_end`), then one fit per check reads the check's own `result.duration_s`.
Reported: the median over repeats of check time / step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import ShapesCNN, make_shapes

from lightning_recipe.registry import CHECKS as REGISTERED_CHECKS

#: every registered check by class name, in the order they run (lightning_recipe/registry.py)
CHECKS = {cls.__name__: cls for cls in REGISTERED_CHECKS.values()}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def _trainer(callbacks: list[L.Callback], steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="training steps timed per repeat")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "check_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_shapes(512)

    ratios: dict[str, list[float]] = {name: [] for name in CHECKS}
    seconds: dict[str, list[float]] = {name: [] for name in CHECKS}
    steps: list[float] = []
    for repeat in range(args.repeats):
        L.seed_everything(repeat, verbose=False)
        timer = StepTimer()
        _trainer([timer], args.steps).fit(ShapesCNN(), DataLoader(data, batch_size=64, shuffle=True))
        step = statistics.median(timer.times[3:])  # skip warm-up steps
        steps.append(step)
        for name, cls in CHECKS.items():
            L.seed_everything(repeat, verbose=False)
            check = cls()
            _trainer([check], 1).fit(ShapesCNN(), DataLoader(data, batch_size=64, shuffle=True))
            assert check.result is not None and check.result.passed, check.result
            seconds[name].append(check.result.duration_s)
            ratios[name].append(check.result.duration_s / step)

    rows = {
        name: {
            "seconds_median": statistics.median(seconds[name]),
            "steps_median": statistics.median(ratios[name]),
            "steps_min": min(ratios[name]),
            "steps_max": max(ratios[name]),
        }
        for name in CHECKS
    }
    result = {
        "command": "python benchmarks/check_cost.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "step_seconds_median": statistics.median(steps),
        "repeats": args.repeats,
        "checks": rows,
    }
    lines = [
        "# Cost of each pre-flight check, in training steps of the quick-start model",
        "",
        f"Command: `{result['command'].strip()}`  ",
        f"Machine: {result['machine']}  ",
        f"One training step (batch 64, 1x16x16, BatchNorm CNN): median {1000 * result['step_seconds_median']:.1f} ms "
        f"over {args.repeats} interleaved repeats.",
        "",
        "| check | wall time (s), median | in training steps, median | min | max |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['seconds_median']:.3f} | {row['steps_median']:.1f} | "
            f"{row['steps_min']:.1f} | {row['steps_max']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
