"""False alarms of the monitors on healthy models, next to their alert delay on the monitor bugs, at the
default settings (issue 10).

Every healthy run trains 300 optimizer steps with all three monitors (UpdateRatioMonitor,
PredictionDynamicsLogger, FirstLayerVisualizer) at their defaults; any alert is a false alarm. Healthy models:
- a tiny Hugging Face BERT classifier (``BertForSequenceClassification``, AdamW at 1e-3, 5e-4 and 3e-4, the
  learning rates issue 10 saw false alarms at; dict batches with attention masks, a validation loader), a
  transformer LM (``nn.TransformerEncoder`` with a causal mask, AdamW 1e-3) and a tiny Hugging Face GPT-2 LM
  (``tests/transformer_models.py``);
- the classic cases issue 10 found: a 5-parameter polynomial regression at SGD 0.1, an MLP whose
  ``training_step`` skips every other batch, a Linear + BatchNorm MLP under SGD, a CNN whose first conv is
  pretrained-looking and frozen on purpose;
- every healthy model of the zoo (``tests/zoo.py``).
Bugs: every monitor bug of the zoo plus a learning rate 100x too high for the PredictionDynamicsLogger
(``ThrashingMLP``), 220 steps each with the monitor that must catch it: the step of the first alert of the
expected kind ("-": none).

    python benchmarks/false_alarms.py --seeds 10 [--only bert,encoder_lm] [--out benchmarks/results/false_alarms.md]

On one CPU thread. Results: ``benchmarks/results/false_alarms.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch

import lightning_recipe
from tests.models import cluster_loader, trainer
from tests.test_first_layer import PretrainedFrozenConv
from tests.test_prediction_dynamics import ThrashingMLP, overlapping_clusters
from tests.test_update_ratio import (
    BiasBeforeBatchNorm,
    PolynomialRegression,
    SkipsEveryOtherBatch,
    polynomial_loader,
)
from tests.transformer_models import GPT2LM, BertClassifier, EncoderLM, lm_loaders, marker_loaders
from tests.zoo import HEALTHY, MONITOR_BUGS, MONITORS, MonitorCase, shapes

Run = tuple[Callable[[], L.LightningModule], Callable[[int], tuple[Any, ...]], dict[str, Any], dict[str, Any]]


def _healthy() -> dict[str, Run]:
    """name -> (model, seed -> fit loaders, monitor kwargs, trainer kwargs)."""
    runs: dict[str, Run] = {
        "bert_classifier (HF, AdamW 1e-3)": (BertClassifier, lambda s: marker_loaders(s), {}, {}),
        "bert_classifier (HF, AdamW 5e-4)": (lambda: BertClassifier(lr=5e-4), lambda s: marker_loaders(s), {}, {}),
        "bert_classifier (HF, AdamW 3e-4)": (lambda: BertClassifier(lr=3e-4), lambda s: marker_loaders(s), {}, {}),
        "encoder_lm (nn.TransformerEncoder, causal)": (EncoderLM, lambda s: lm_loaders(s), {}, {}),
        "gpt2_lm (HF, shift in the batch)": (GPT2LM, lambda s: lm_loaders(s), {}, {}),
        "polynomial_regression (SGD 0.1)": (PolynomialRegression, lambda s: (polynomial_loader(s),), {}, {}),
        "skips_every_other_batch": (SkipsEveryOtherBatch, lambda s: (cluster_loader(),), {}, {}),
        "bias_before_batchnorm (SGD)": (BiasBeforeBatchNorm, lambda s: (cluster_loader(),), {}, {}),
        "pretrained_first_conv_frozen": (PretrainedFrozenConv, lambda s: (shapes(),), {}, {}),
    }
    for case in HEALTHY:
        runs[f"zoo: {case.name}"] = (case.model, lambda s, c=case: (c.data(),), case.check_kwargs, case.trainer_kwargs)
    return runs


def _bugs() -> list[MonitorCase]:
    return [
        *MONITOR_BUGS,
        MonitorCase("lr_100x_too_high", ThrashingMLP, overlapping_clusters, "PredictionDynamicsLogger", "thrashing"),
    ]


def healthy_run(run: Run, seed: int) -> list[str]:
    model, data, monitor_kwargs, trainer_kwargs = run
    L.seed_everything(seed, verbose=False)
    monitors = [getattr(lightning_recipe, name)(**monitor_kwargs) for name in MONITORS]
    trainer(max_steps=300, callbacks=monitors, **trainer_kwargs).fit(model(), *data(seed))
    alarms = [f"{m.name} {a.kind}@{a.step}" for m in monitors for a in m.alerts]
    alarms += [f"{m.name} switched off" for m in monitors if not m.enabled]
    return alarms


def bug_run(case: MonitorCase, seed: int) -> int | None:
    L.seed_everything(seed, verbose=False)
    monitor = getattr(lightning_recipe, case.monitor)()
    trainer(max_steps=case.within + 20, callbacks=[monitor]).fit(case.model(), case.data())
    return next((a.step for a in monitor.alerts if a.kind == case.alert), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..n-1 for every model")
    parser.add_argument("--only", default="", help="comma-separated substrings of the run names to keep")
    parser.add_argument("--no-bugs", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="append the Markdown tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    keep = [k for k in args.only.split(",") if k]
    lines = [
        f"Seeds 0-{args.seeds - 1}, 300 steps, all three monitors at their defaults.",
        "",
        "| healthy model | runs | false alarms | seconds |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    total_runs = total_alarms = 0
    for name, run in _healthy().items():
        if keep and not any(k in name for k in keep):
            continue
        start = time.perf_counter()
        alarms = [f"seed {s}: {a}" for s in range(args.seeds) for a in healthy_run(run, s)]
        total_runs += args.seeds
        total_alarms += len(alarms)
        line = f"| {name} | {args.seeds} | {'; '.join(alarms) or 0} | {time.perf_counter() - start:.0f} |"
        lines.append(line)
        print(line, flush=True)
    noun = "false alarm" if total_alarms == 1 else "false alarms"
    lines += ["", f"**{total_alarms} {noun} in {total_runs} healthy runs.**", ""]
    print("\n".join(lines[-3:]), flush=True)
    if not args.no_bugs:
        header = [
            "| bug | monitor | expected alert | alerted at step (per seed) | within 200 |",
            "|---|---|---|---|---|",
        ]
        lines += header
        print("\n".join(header), flush=True)
        for case in _bugs():
            if keep and not any(k in case.name for k in keep):
                continue
            steps = [bug_run(case, s) for s in range(args.seeds)]
            within = sum(s is not None and s <= case.within for s in steps)
            shown = ", ".join("-" if s is None else str(s) for s in steps)
            line = f"| {case.name} | {case.monitor} | {case.alert} | {shown} | {within}/{len(steps)} |"
            lines.append(line)
            print(line, flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
