"""The zoo over 20 seeds: no healthy model may raise a false alarm at any of them, and every bug is caught
but for the measured, explained misses below. This is the calibration evidence behind the default thresholds."""

from __future__ import annotations

import lightning.pytorch as L
import pytest

import lightning_recipe
from lightning_recipe import CheckStatus
from tests.models import trainer
from tests.zoo import BUGS, CHECKS, HEALTHY, MONITOR_BUGS, MONITORS, Case, MonitorCase

SEEDS = range(1, 21)
#: measured misses (50-seed sweep, 2026-11-22), each with why it is not a defect of the check
KNOWN_MISSES = {
    # the std-3 head meets small hidden activations: loss at init 1.60 vs chance 1.39, no symptom to catch
    ("huge_final_layer_init", 13): "the bug has no symptom at this seed",
    # only biases train, and biases alone fit these 4 examples; the pass names the 95% frozen weights.
    # Freezing most weights is legitimate (backbones, BitFit): not a failure by itself
    ("weights_frozen_by_name", 12): "biases alone fit the 4 examples",
    ("weights_frozen_by_name", 14): "biases alone fit the 4 examples",
}


def _results(case: Case, seed: int, names: tuple[str, ...]) -> list[lightning_recipe.CheckResult]:
    L.seed_everything(seed, verbose=False)
    checks = [getattr(lightning_recipe, n)(on_fail="warn", **case.check_kwargs) for n in names]
    trainer(max_steps=1, callbacks=checks, **case.trainer_kwargs).fit(case.model(), case.data())
    return [c.result for c in checks]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", HEALTHY, ids=str)
def test_healthy_model_passes_at_every_seed(case: Case, seed: int):
    for result in _results(case, seed, CHECKS):
        assert result.status is CheckStatus.PASSED, result.format()


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", BUGS, ids=str)
def test_bug_is_caught_at_every_seed(case: Case, seed: int):
    if (case.name, seed) in KNOWN_MISSES:
        pytest.skip(KNOWN_MISSES[case.name, seed])
    (result,) = _results(case, seed, (case.catches,))
    assert result.status is CheckStatus.FAILED, result.format()


MONITOR_SEEDS = range(1, 11)


@pytest.mark.slow
@pytest.mark.parametrize("seed", MONITOR_SEEDS)
@pytest.mark.parametrize("case", HEALTHY, ids=str)
def test_healthy_model_raises_no_monitor_alert_at_any_seed(case: Case, seed: int):
    L.seed_everything(seed, verbose=False)
    monitors = [getattr(lightning_recipe, name)(**case.check_kwargs) for name in MONITORS]
    trainer(max_steps=300, callbacks=monitors, **case.trainer_kwargs).fit(case.model(), case.data())
    for monitor in monitors:
        assert monitor.enabled and monitor.alerts == [], (monitor.name, [a.message for a in monitor.alerts])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
@pytest.mark.parametrize("seed", MONITOR_SEEDS)
@pytest.mark.parametrize("case", MONITOR_BUGS, ids=str)
def test_training_bug_is_alerted_in_time_at_every_seed(case: MonitorCase, seed: int):
    L.seed_everything(seed, verbose=False)
    monitor = getattr(lightning_recipe, case.monitor)()
    trainer(max_steps=case.within + 20, callbacks=[monitor]).fit(case.model(), case.data())
    steps = [a.step for a in monitor.alerts if a.kind == case.alert]
    assert steps and steps[0] <= case.within, [(a.kind, a.step) for a in monitor.alerts]
