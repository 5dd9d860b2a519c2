"""On a GPU the monitors read their measurements a hook later, so the host never waits for the device. Forced on
the CPU here: the alerts (kind, step, message) and the recorded evidence must be what the immediate reads give."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest

import lightning_recipe
from tests.models import trainer
from tests.tensorboard import read_events
from tests.zoo import HEALTHY, MONITOR_BUGS, MONITORS


def _run(defer_reads, case_model, case_data, monitor_name: str, steps: int, deferred: bool, **kwargs):
    L.seed_everything(0, verbose=False)
    monitor = getattr(lightning_recipe, monitor_name)(**kwargs)
    defer_reads(deferred)
    trainer(max_steps=steps, callbacks=[monitor]).fit(case_model(), case_data())
    assert monitor.enabled and not monitor._pending
    return monitor


def _evidence(monitor) -> object:
    if isinstance(monitor, lightning_recipe.UpdateRatioMonitor):
        return monitor.measured_steps, {k: v for k, v in monitor.last_ratios.items() if math.isfinite(v)}
    if isinstance(monitor, lightning_recipe.PredictionDynamicsLogger):
        return [(e.step, e.loss, e.accuracy, e.churn) for e in monitor.history]
    return monitor.last_moved


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
@pytest.mark.parametrize("case", MONITOR_BUGS, ids=str)
def test_deferred_reads_raise_the_same_alerts_at_the_same_steps(case, defer_reads):
    runs = [
        _run(defer_reads, case.model, case.data, case.monitor, case.within + 20, deferred) for deferred in (False, True)
    ]
    immediate, deferred = ([(a.kind, a.step, a.message) for a in m.alerts] for m in runs)
    assert case.alert in {kind for kind, _, _ in deferred}
    assert deferred == immediate
    assert _evidence(runs[1]) == _evidence(runs[0])


@pytest.mark.parametrize("monitor_name", MONITORS)
def test_deferred_reads_record_the_same_evidence_on_a_healthy_model(monitor_name, defer_reads):
    case = next(c for c in HEALTHY if c.name == "batchnorm_dropout_cnn")  # every monitor has something to show
    kwargs = {"every_n_steps": 3} if monitor_name != "FirstLayerVisualizer" else {"measure_every_n_steps": 3}
    runs = [_run(defer_reads, case.model, case.data, monitor_name, 30, d, **kwargs) for d in (False, True)]
    assert runs[1].alerts == runs[0].alerts == []
    assert _evidence(runs[1]) == _evidence(runs[0])


def _logged_steps(tmp_path, defer_reads, deferred: bool) -> dict[str, list[int]]:
    from lightning.pytorch.loggers import TensorBoardLogger

    case = next(c for c in HEALTHY if c.name == "batchnorm_dropout_cnn")
    L.seed_everything(0, verbose=False)
    monitors = [
        lightning_recipe.UpdateRatioMonitor(every_n_steps=4),
        lightning_recipe.PredictionDynamicsLogger(every_n_steps=4, figure_every_n_steps=8),
        lightning_recipe.FirstLayerVisualizer(every_n_steps=8, measure_every_n_steps=4),
    ]
    defer_reads(deferred)
    logger = TensorBoardLogger(str(tmp_path), name="deferred" if deferred else "immediate")
    trainer(max_steps=18, callbacks=monitors, logger=logger).fit(case.model(), case.data())
    logger.experiment.flush()
    acc = read_events(logger.log_dir)
    tags = acc.Tags()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in tags["scalars"] if tag.startswith("recipe/")}
    steps.update({tag: [e.step for e in acc.Images(tag)] for tag in tags["images"]})
    steps.update({tag: [e.step for e in acc.Histograms(tag)] for tag in tags["histograms"]})
    return steps


def test_deferred_reads_log_at_the_steps_they_measured(tmp_path, defer_reads):
    immediate, deferred = _logged_steps(tmp_path, defer_reads, False), _logged_steps(tmp_path, defer_reads, True)
    assert deferred == immediate
    assert immediate["recipe/prediction_dynamics_logger/trajectories"] == [8, 16, 18]
    assert immediate["recipe/first_layer_visualizer/filters"] == [0, 8, 16, 18]
