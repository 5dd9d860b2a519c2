"""Run a check under `strategy="ddp"` with two CPU processes, in a subprocess, and read what every rank saw.

Inside pytest, Lightning's DDP re-runs the pytest command as rank 1 and a failure there alone leaves the
exit code 0 (ENVIRONMENT.md). So a test calls :func:`run_ddp`, which runs this file as a script; every rank
writes ``rank{r}.json``; the test asserts on all of them and on the exit code.

    python -m tests.ddp SPEC_JSON OUT_DIR
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_ddp(
    tmp_path: Path,
    model: str,
    data: str,
    check: str | list[str],
    check_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    max_steps: int = 2,
    timeout: float = 240,
    tensorboard: bool = False,
) -> tuple[int, dict[int, dict[str, Any]], str]:
    """Returns (exit code, {rank: what it saw}, combined output). ``model`` and ``data`` are
    ``"module:attr"`` paths to a LightningModule class and a function returning a DataLoader;
    ``check`` names a check class exported by lightning_recipe, or several (each rank then also records
    ``results``, one per check, and ``check_kwargs`` go to every one). Monitors work too: each rank records
    their ``alerts`` as ``[kind, step]`` and whether they are still ``enabled``. With ``tensorboard=True`` the
    Trainer logs to ``tmp_path/tb`` (rank zero writes; a test can count the event files)."""
    spec = dict(
        model=model,
        data=data,
        check=check,
        check_kwargs=check_kwargs or {},
        model_kwargs=model_kwargs or {},
        max_steps=max_steps,
        tensorboard=tensorboard,
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ddp", json.dumps(spec), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(tmp_path).glob("rank*.json")}
    return proc.returncode, ranks, proc.stdout + proc.stderr


def run_script(
    tmp_path: Path, source: str, ranks: int = 2, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, list[dict[str, Any]]]:
    """Run ``source``, a script that writes ``rank{r}.json`` into the folder ``sys.argv[1]`` (for strategies
    :func:`run_ddp` does not cover: FSDP2, ModelParallelStrategy), in a subprocess that can import this repo.
    Returns the process and what each rank wrote, in rank order (asserting that every rank wrote)."""
    script = Path(tmp_path) / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, [json.loads((Path(tmp_path) / f"rank{r}.json").read_text()) for r in range(ranks)]


def _main(spec: dict[str, Any], out: Path) -> int:
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_recipe

    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    names = spec["check"] if isinstance(spec["check"], list) else [spec["check"]]
    checks = [getattr(lightning_recipe, name)(**spec["check_kwargs"]) for name in names]
    check = checks[0]
    model = _load(spec["model"])(**spec["model_kwargs"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=spec["max_steps"],
        logger=TensorBoardLogger(str(out / "tb"), name="") if spec.get("tensorboard") else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=checks,
    )
    seen: dict[str, Any] = {"error": None}
    try:
        trainer.fit(model, _load(spec["data"])())
    except lightning_recipe.RecipeCheckError as error:
        seen["error"] = "RecipeCheckError"
        seen["message"] = str(error)
    except Exception as error:  # noqa: BLE001 - recorded for the test to assert on
        seen["error"] = type(error).__name__
        seen["message"] = traceback.format_exc()
    seen["rank"] = trainer.global_rank
    seen["global_step"] = trainer.global_step
    seen["result"] = _result(check)
    seen["results"] = [_result(c) for c in checks]
    seen["alerts"] = [[[a.kind, a.step] for a in getattr(c, "alerts", [])] for c in checks]
    seen["enabled"] = [getattr(c, "enabled", True) for c in checks]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    return 1 if seen["error"] else 0


def _result(check: Any) -> dict[str, Any] | None:
    result = getattr(check, "result", None)
    return None if result is None else result.to_dict()


if __name__ == "__main__":
    sys.exit(_main(json.loads(sys.argv[1]), Path(sys.argv[2])))
