"""The monitors on the zoo: healthy models train 300 steps with all three monitors at default settings and
raise no alert; each training bug is alerted, with the right kind, within its step budget."""

from __future__ import annotations

import lightning.pytorch as L
import pytest

import lightning_recipe
from tests.models import trainer
from tests.zoo import HEALTHY, MONITOR_BUGS, MONITORS, Case, MonitorCase


@pytest.mark.parametrize("case", HEALTHY, ids=str)
def test_healthy_model_raises_no_alert_in_300_steps(case: Case):
    L.seed_everything(0, verbose=False)
    monitors = [getattr(lightning_recipe, name)(**case.check_kwargs) for name in MONITORS]
    t = trainer(max_steps=300, callbacks=monitors, **case.trainer_kwargs)
    t.fit(case.model(), case.data())
    assert t.global_step == 300
    for monitor in monitors:
        assert monitor.enabled, f"{monitor.name} switched itself off"
        assert monitor.alerts == [], f"{monitor.name}: {[a.message for a in monitor.alerts]}"


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
@pytest.mark.parametrize("case", MONITOR_BUGS, ids=str)
def test_training_bug_is_alerted_in_time(case: MonitorCase):
    L.seed_everything(0, verbose=False)
    monitor = getattr(lightning_recipe, case.monitor)()
    trainer(max_steps=case.within + 20, callbacks=[monitor]).fit(case.model(), case.data())
    assert monitor.enabled
    kinds = {a.kind: a for a in monitor.alerts}
    assert case.alert in kinds, [(a.kind, a.step, a.message) for a in monitor.alerts]
    alert = kinds[case.alert]
    assert alert.step <= case.within
    assert len(alert.message) > 40  # measured, expected, cause, fix: not a bare label
