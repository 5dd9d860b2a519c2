"""The same checks and monitors on a CUDA device, under the precisions people train with there. Skipped where
there is no GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import math
import os

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_recipe
from lightning_recipe import (
    BatchLeakageProbe,
    CheckStatus,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    RecipeCheckError,
    UpdateRatioMonitor,
)
from tests.models import trainer
from tests.tensorboard import read_events
from tests.zoo import MONITOR_BUGS, BatchNormCNN, HugeFinalInit, clusters, shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRECISIONS = ["32-true", "bf16-mixed", "16-mixed", "bf16-true"]


def _gpu_trainer(tmp_path=None, **kwargs) -> L.Trainer:
    return trainer(tmp_path, accelerator="gpu", devices=1, **kwargs)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_checks_pass_on_a_healthy_model(precision):
    L.seed_everything(0, verbose=False)
    checks = [InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()]
    _gpu_trainer(max_steps=2, precision=precision, callbacks=checks).fit(BatchNormCNN(), shapes())
    for check in checks:
        assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_failed_check_stops_fit_before_the_first_step(precision):
    L.seed_everything(0, verbose=False)
    t = _gpu_trainer(max_steps=2, precision=precision, callbacks=[InitLossCheck()])
    with pytest.raises(RecipeCheckError, match="far above chance"):
        t.fit(HugeFinalInit(), clusters())
    assert t.global_step == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_monitors_measure_log_and_stay_quiet_on_a_healthy_model(tmp_path, precision):
    L.seed_everything(0, verbose=False)
    ratio = UpdateRatioMonitor(every_n_steps=20)
    dynamics = PredictionDynamicsLogger(every_n_steps=20, figure_every_n_steps=100)
    first = FirstLayerVisualizer(every_n_steps=50, measure_every_n_steps=20)
    t = _gpu_trainer(
        max_steps=120,
        precision=precision,
        callbacks=[ratio, dynamics, first],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
    )
    t.fit(BatchNormCNN(), shapes(), shapes())
    for monitor in (ratio, dynamics, first):
        assert monitor.enabled, f"{monitor.name} switched itself off"
    if precision != "bf16-true":  # bf16 weights without fp32 master copies barely move: an alert may be right
        for monitor in (ratio, dynamics, first):
            assert monitor.alerts == [], [a.message for a in monitor.alerts]
    assert ratio.measured_steps and all(math.isfinite(r) for r in ratio.last_ratios.values())
    assert [e.step for e in dynamics.history] == list(range(0, 121, 20))
    assert all(math.isfinite(e.loss) for e in dynamics.history)
    assert dynamics.batch[0].device.type == "cuda"
    assert first.layer_name == "features.0" and first.last_moved is not None and first.last_moved > 0
    t.logger.experiment.flush()
    acc = read_events(t.logger.log_dir)
    tags = acc.Tags()
    assert "recipe/update_ratio_monitor/median_log10_ratio" in tags["scalars"]
    assert "recipe/update_ratio_monitor/log10_ratios" in tags["histograms"]
    assert "recipe/prediction_dynamics_logger/trajectories" in tags["images"]
    assert "recipe/first_layer_visualizer/filters" in tags["images"]


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
@pytest.mark.parametrize("case", MONITOR_BUGS, ids=str)
def test_training_bugs_are_alerted_on_the_gpu_under_bf16_mixed(case):
    L.seed_everything(0, verbose=False)
    monitor = getattr(lightning_recipe, case.monitor)()
    _gpu_trainer(max_steps=case.within + 20, precision="bf16-mixed", callbacks=[monitor]).fit(case.model(), case.data())
    kinds = {a.kind: a for a in monitor.alerts}
    assert case.alert in kinds, [(a.kind, a.step) for a in monitor.alerts]
    assert kinds[case.alert].step <= case.within


class DeterministicCNN(BatchNormCNN):
    """BatchNormCNN without pooling layers, whose CUDA backward has no deterministic implementation."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8 * 16 * 16, 3))


def test_a_seeded_gpu_run_ends_bit_identical_with_and_without_the_checks_and_monitors(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))

    def run(with_recipe: bool) -> dict[str, torch.Tensor]:
        L.seed_everything(123, workers=True, verbose=False)
        model = DeterministicCNN()
        callbacks = []
        if with_recipe:
            callbacks = [InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()]
            monitors = (UpdateRatioMonitor, PredictionDynamicsLogger, FirstLayerVisualizer)
            callbacks += [m(every_n_steps=1) for m in monitors]
        _gpu_trainer(max_steps=8, deterministic=True, callbacks=callbacks).fit(model, shapes(), shapes())
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state["__cuda_rng__"] = torch.cuda.get_rng_state()
        state["__cpu_rng__"] = torch.get_rng_state()
        return state

    plain, checked = run(False), run(True)
    for key, value in plain.items():
        assert torch.equal(value, checked[key]), f"{key} differs"
