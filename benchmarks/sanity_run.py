"""Wall time of a sanity run of the quick-start model against 100 ordinary training steps of the same script.

The script is examples/slurm/train.py (the quick-start CNN with RecipeSuite): once with
LIGHTNING_RECIPE_SANITY_RUN=1 (checks, report, exit) and once as it is with ``--max-steps 100`` (the checks,
then 100 steps with the monitors, a validation every 16 steps, the final ``trainer.validate``). Two views:

- in-process: ``train.main()`` called in this process (imports paid once), interleaved, median over repeats;
  the sanity run's own ``SanityRunExit`` is caught. This is the cost of the work itself.
- as a job sees it: each command in a fresh ``python`` process, imports and start-up included.

    python benchmarks/sanity_run.py --repeats 5 --process-repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "slurm" / "train.py"
ENV_VAR = "LIGHTNING_RECIPE_SANITY_RUN"


def in_process(repeats: int) -> dict[str, list[float]]:
    sys.path.insert(0, str(TRAIN.parent))
    import train

    from lightning_recipe import SanityRunExit

    seconds: dict[str, list[float]] = {"sanity_run": [], "train_100_steps": [], "check_seconds": []}
    with tempfile.TemporaryDirectory() as logdir:
        base = ["--accelerator", "cpu", "--logdir", logdir]
        for _ in range(repeats):
            os.environ[ENV_VAR] = "1"
            start = time.perf_counter()
            try:
                train.main(base)
            except SanityRunExit as stop:
                seconds["check_seconds"].append(sum(r.duration_s for r in stop.report.results))
            seconds["sanity_run"].append(time.perf_counter() - start)
            os.environ[ENV_VAR] = "0"
            start = time.perf_counter()
            train.main([*base, "--max-steps", "100"])
            seconds["train_100_steps"].append(time.perf_counter() - start)
    return seconds


def as_processes(repeats: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"sanity_run": [], "train_100_steps": [], "python_import_only": []}
    commands = {
        "sanity_run": ([str(TRAIN), "--accelerator", "cpu"], "1"),
        "train_100_steps": ([str(TRAIN), "--accelerator", "cpu", "--max-steps", "100"], "0"),
        "python_import_only": (["-c", "import lightning.pytorch, lightning_recipe"], "0"),
    }
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(repeats):
            for name, (args, flag) in commands.items():
                env = {**os.environ, ENV_VAR: flag, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
                seconds[name].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--process-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sanity_run"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    inner = {k: summary(v) for k, v in in_process(args.repeats).items()}
    outer = {k: summary(v) for k, v in as_processes(args.process_repeats).items()}
    command = f"python benchmarks/sanity_run.py --repeats {args.repeats} --process-repeats {args.process_repeats}"
    result = {
        "command": command,
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "in_process": inner,
        "processes": outer,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    ratio = inner["sanity_run"]["median"] / inner["train_100_steps"]["median"]
    job_ratio = outer["sanity_run"]["median"] / outer["train_100_steps"]["median"]
    train_only = inner["train_100_steps"]["median"] - inner["check_seconds"]["median"]
    per_step = train_only / 100
    check_steps = inner["check_seconds"]["median"] / per_step
    rows = "\n".join(
        f"| {label} | {view[key]['median']:.2f} | {view[key]['min']:.2f} | {view[key]['max']:.2f} |"
        for label, view, key in [
            ("in-process: sanity run (checks, report, exit)", inner, "sanity_run"),
            ("in-process: of which the three checks", inner, "check_seconds"),
            ("in-process: 100 training steps (checks, monitors, validation)", inner, "train_100_steps"),
            ("fresh process: sanity run", outer, "sanity_run"),
            ("fresh process: 100 training steps", outer, "train_100_steps"),
            ("fresh process: `import lightning.pytorch, lightning_recipe` only", outer, "python_import_only"),
        ]
    )
    text = f"""# Sanity run vs 100 training steps of the same script

Command: `{command}`\\
Machine: {result["machine"]}\\
Script: `examples/slurm/train.py` (the quick-start CNN, batch 32, 1x16x16, with `RecipeSuite()`), on CPU.\\
In-process: median of {args.repeats} interleaved repeats; fresh process: median of {args.process_repeats}.

| run | wall time (s), median | min | max |
|---|---|---|---|
{rows}

A sanity run costs {ratio:.2f}x the time of 100 training steps of the same script in-process, and
{job_ratio:.2f}x as a job sees it (Python start-up and imports included, which dominate both here). The
100-step run pays for the checks too (RecipeSuite runs them before training); without them its 100 steps,
monitors and validations take {train_only:.2f} s, {per_step * 1000:.1f} ms a step, so the three checks cost
about {check_steps:.0f} training steps of this model. On a cluster the fixed costs of a step (start-up,
imports, data loading, process-group set-up) are paid by the sanity step and the training step alike.
"""
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
