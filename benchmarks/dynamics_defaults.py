"""When does the PredictionDynamicsLogger alert, for a given `every_n_steps`, `window` and `num_examples`?

The default settings trade cost (one forward pass on `num_examples` held-out examples every `every_n_steps`)
against alert delay and false alarms. For each setting this runs, from the test suite's models:
- a learning rate 100x too high (`ThrashingMLP`), seeds 0-9, 300 steps: the step of the `thrashing` alert;
- a learning rate of 1e-7, seeds 0-4, 220 steps: the alerts (expected: `frozen`);
- the healthy MLP (seeds 0-2) and every healthy zoo model (seeds 0-1), 300 steps: any alert is a false alarm.

    python benchmarks/dynamics_defaults.py --every 25 --window 4 --examples 12 [16 32 8 ...]

About 3 minutes per setting on one CPU thread. Results: `benchmarks/results/dynamics_defaults.md`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch

from lightning_recipe import PredictionDynamicsLogger
from tests.models import cluster_data, loader, trainer
from tests.test_prediction_dynamics import ThrashingMLP, overlapping_clusters
from tests.zoo import HEALTHY, MLP


class TinyLR(MLP):
    lr = 1e-7


def study(every: int, window: int, examples: int) -> dict:
    def logger(**kwargs) -> PredictionDynamicsLogger:
        return PredictionDynamicsLogger(every_n_steps=every, window=window, num_examples=examples, **kwargs)

    thrashing = []
    for seed in range(10):
        L.seed_everything(seed, verbose=False)
        monitor = logger()
        trainer(max_steps=300, callbacks=[monitor]).fit(ThrashingMLP(), overlapping_clusters())
        thrashing.append(next((a.step for a in monitor.alerts if a.kind == "thrashing"), None))
    frozen = []
    for seed in range(5):
        L.seed_everything(seed, verbose=False)
        monitor = logger()
        trainer(max_steps=220, callbacks=[monitor]).fit(TinyLR(), loader(cluster_data()))
        frozen.append(next((a.step for a in monitor.alerts if a.kind == "frozen"), None))
    false_alarms = []
    runs = [("healthy MLP", seed, MLP, overlapping_clusters, {}, {}) for seed in range(3)]
    runs += [(str(c), seed, c.model, c.data, c.check_kwargs, c.trainer_kwargs) for c in HEALTHY for seed in range(2)]
    for name, seed, model, data, check_kwargs, trainer_kwargs in runs:
        L.seed_everything(seed, verbose=False)
        monitor = logger(**check_kwargs)
        trainer(max_steps=300, callbacks=[monitor], **trainer_kwargs).fit(model(), data())
        false_alarms += [f"{name} (seed {seed}): {a.kind} at {a.step}" for a in monitor.alerts]
    return {"thrashing": thrashing, "frozen": frozen, "healthy_runs": len(runs), "false_alarms": false_alarms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, nargs="+", default=[25])
    parser.add_argument("--window", type=int, nargs="+", default=[4])
    parser.add_argument("--examples", type=int, nargs="+", default=[12])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(
        "| every_n_steps | window | num_examples | thrashing alerted at (seeds 0-9) | by step 200 | frozen at | "
        "false alarms |"
    )
    print("|---|---|---|---|---|---|---|")
    for every in args.every:
        for window in args.window:
            for examples in args.examples:
                r = study(every, window, examples)
                steps = ", ".join("-" if s is None else str(s) for s in r["thrashing"])
                by_200 = sum(s is not None and s <= 200 for s in r["thrashing"])
                frozen = ", ".join(sorted({"-" if s is None else str(s) for s in r["frozen"]}))
                alarms = "; ".join(r["false_alarms"]) or f"none in {r['healthy_runs']} runs"
                print(f"| {every} | {window} | {examples} | {steps} | {by_200}/10 | {frozen} | {alarms} |", flush=True)


if __name__ == "__main__":
    main()
