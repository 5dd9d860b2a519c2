"""The quick-start example, run the way the README says: it prints a verdict and leaves TensorBoard event files
with the checks' figures; with an injected bug it stops with the fix and a non-zero exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tensorboard import read_events

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"), "--logdir", str(tmp_path), "--epochs", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_quickstart_prints_a_verdict_and_logs_the_evidence(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("InitLossCheck", "OverfitOneBatch", "BatchLeakageProbe"):
        assert f"{name}" in proc.stdout and "passed" in proc.stdout
    assert "Trained 16 steps" in proc.stdout
    (log_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    events = read_events(str(log_dir))
    tags = events.Tags()
    assert "recipe/overfit_one_batch/predictions" in tags["images"]
    assert "recipe/overfit_one_batch/loss_curve" in tags["images"]
    assert any(t.startswith("recipe/init_loss_check/") for t in tags["scalars"])
    assert any(t.startswith("recipe/batch_leakage_probe/verdict") for t in tags["tensors"])
    assert "recipe/first_layer_visualizer/filters" in tags["images"]
    assert "recipe/update_ratio_monitor/median_log10_ratio" in tags["scalars"]
    assert "recipe/prediction_dynamics_logger/accuracy" in tags["scalars"]
    assert "Monitor alerts: none" in proc.stdout


def test_quickstart_with_a_bug_stops_with_the_fix(tmp_path):
    proc = _run(tmp_path, "--bug", "batch-stats")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BatchLeakageProbe" in proc.stdout and "failed" in proc.stdout
    assert "Training stopped before the first step" in proc.stdout


def test_quickstart_with_a_training_bug_trains_on_and_alerts(tmp_path):
    proc = _run(tmp_path, "--bug", "lr-too-high", "--epochs", "14")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Trained 224 steps" in proc.stdout
    assert "UpdateRatioMonitor `ratio_too_high`" in proc.stdout
