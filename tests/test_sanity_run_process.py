"""The sanity run as a cluster job sees it: a real, unchanged training script in a subprocess with
LIGHTNING_RECIPE_SANITY_RUN=1, its exit status and the report it leaves; and under `strategy="ddp"` with two
CPU processes, one report and the same exit status on every rank (each rank records the SystemExit it raises,
since Lightning's launcher only shows rank zero's status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.ddp import REPO

TRAIN = REPO / "examples" / "slurm" / "train.py"


def run(args: list[str], cwd: Path, sanity: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTNING_RECIPE_SANITY_RUN", None)
    if sanity:
        env["LIGHTNING_RECIPE_SANITY_RUN"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def reports(folder: Path) -> list[Path]:
    return sorted(folder.rglob("sanity_run.json"))


@pytest.mark.parametrize(("bug", "code"), [("none", 0), ("double-softmax", 1)])
def test_the_environment_variable_turns_a_training_script_into_a_sanity_run(tmp_path, bug, code):
    proc = run([str(TRAIN), "--accelerator", "cpu", "--bug", bug], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    [path] = reports(tmp_path)
    assert path.parent == tmp_path / "recipe_logs" / "train" / "version_0"
    data = json.loads(path.read_text())
    assert data["passed"] is (code == 0) and data["global_step"] == 0
    statuses = [(c["name"], c["status"]) for c in data["checks"]]
    expected = "passed" if code == 0 else "failed"
    assert statuses == [("InitLossCheck", "passed"), ("BatchLeakageProbe", "passed"), ("OverfitOneBatch", expected)]
    assert path.with_suffix(".md").is_file()
    assert f"Sanity run: training skipped, exit status {code}." in proc.stdout
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing after `fit` ran, nothing was saved


RESUMED = """
import sys
import lightning.pytorch as L
from lightning_recipe import RecipeSuite
from tests.zoo import MLP, clusters
L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
          default_root_dir=sys.argv[1], callbacks=[RecipeSuite()]).fit(MLP(), clusters(), ckpt_path=sys.argv[2])
print("TRAINED")
"""


def test_a_sanity_run_of_a_script_that_resumes_exits_3_nothing_checked(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.models import trainer
    from tests.zoo import MLP, clusters

    saver = ModelCheckpoint(tmp_path, save_last=True)
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[saver]).fit(MLP(), clusters())
    script = tmp_path / "train.py"
    script.write_text(RESUMED)
    proc = run([str(script), str(tmp_path), str(tmp_path / "last.ckpt")], tmp_path)
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-4000:]
    assert "TRAINED" not in proc.stdout and "exit status 3: nothing was checked" in proc.stdout
    data = json.loads((tmp_path / "sanity_run.json").read_text())
    assert data["passed"] is False and data["checked"] is False


def test_without_the_variable_the_same_script_trains(tmp_path):
    proc = run([str(TRAIN), "--accelerator", "cpu", "--max-steps", "3"], tmp_path, sanity=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not reports(tmp_path)
    assert list(tmp_path.rglob("*.ckpt"))


DDP_SCRIPT = """
import json, sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_recipe import RecipeSuite
from tests import zoo

torch.set_num_threads(1)
L.seed_everything(0, workers=True)
out = Path(sys.argv[1])
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=50, logger=TensorBoardLogger(str(out), name="tb"),
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[RecipeSuite()],
)
try:
    trainer.fit(getattr(zoo, sys.argv[2])(), zoo.clusters(), ckpt_path=sys.argv[3] if len(sys.argv) > 3 else None)
except SystemExit as stop:
    seen = {"code": stop.code, "global_step": trainer.global_step, "passed": stop.report.passed}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    raise
"""


@pytest.mark.parametrize(("model", "code"), [("MLP", 0), ("DoubleSoftmax", 1)])
def test_under_ddp_rank_zero_writes_one_report_and_every_rank_exits_with_the_verdict(tmp_path, model, code):
    script = tmp_path / "ddp_sanity.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = run([str(script), str(tmp_path), model], REPO)
    output = proc.stdout + proc.stderr
    # rank zero's status; Lightning's launcher may SIGKILL rank zero once rank one has exited non-zero (-9)
    assert (proc.returncode == 0) if code == 0 else (proc.returncode in (1, -9)), output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"code": code, "global_step": 0, "passed": code == 0}] * 2, output[-4000:]
    [path] = reports(tmp_path)
    data = json.loads(path.read_text())
    assert data["world_size"] == 2 and data["passed"] is (code == 0)
    assert all(c["details"]["world_size"] == 2 for c in data["checks"])
    assert output.count("lightning_recipe sanity run:") == 1, output[-4000:]


def test_under_ddp_a_resumed_sanity_run_exits_3_nothing_checked_on_every_rank(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.models import trainer
    from tests.zoo import MLP, clusters

    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[saver]).fit(MLP(), clusters())
    script = tmp_path / "ddp_sanity.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = run([str(script), str(tmp_path), "MLP", str(tmp_path / "ckpt" / "last.ckpt")], REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode in (3, -9), output[-4000:]  # -9: Lightning's launcher may kill rank zero
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"code": 3, "global_step": 3, "passed": False}] * 2, output[-4000:]
    [path] = reports(tmp_path)
    data = json.loads(path.read_text())
    assert data["world_size"] == 2 and data["checked"] is False
    assert all(c["status"] == "skipped" and "resumed" in c["summary"] for c in data["checks"])


@pytest.mark.slow
def test_under_torchrun_the_job_fails_when_a_check_fails(tmp_path):
    args = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(TRAIN),
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
    ]
    (tmp_path / "healthy").mkdir()
    (tmp_path / "buggy").mkdir()
    healthy = run(args, tmp_path / "healthy")
    assert healthy.returncode == 0, (healthy.stdout + healthy.stderr)[-4000:]
    buggy = run([*args, "--bug", "double-softmax"], tmp_path / "buggy")
    assert buggy.returncode == 1, (buggy.stdout + buggy.stderr)[-4000:]
    for folder in ("healthy", "buggy"):
        [path] = reports(tmp_path / folder)
        assert json.loads(path.read_text())["passed"] is (folder == "healthy")


SPAWN_SCRIPT = """
import sys

import lightning.pytorch as L
import torch

from lightning_recipe import RecipeSuite
from tests import zoo

if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=50, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecipeSuite()],
    )
    trainer.fit(getattr(zoo, sys.argv[1])(), zoo.clusters())
    print(f"after fit: global_step={trainer.global_step}")
"""


@pytest.mark.slow
@pytest.mark.parametrize(("model", "code"), [("MLP", 0), ("DoubleSoftmax", 1)])
def test_under_ddp_spawn_a_failure_fails_the_job_and_a_pass_returns_from_fit(tmp_path, model, code):
    script = tmp_path / "spawn_sanity.py"
    script.write_text(textwrap.dedent(SPAWN_SCRIPT))
    proc = run([str(script), model], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-4000:]
    assert ("after fit: global_step=0" in proc.stdout) is (code == 0), output[-4000:]
    assert json.loads((tmp_path / "sanity_run.json").read_text())["passed"] is (code == 0)
