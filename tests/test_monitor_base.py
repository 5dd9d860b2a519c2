"""The contract every monitor shares, on a monitor written for the test: alerts once per kind and key, an
internal error switches the monitor off with one warning and training goes on, and its cost is counted."""

from __future__ import annotations

import pytest
import torch

from lightning_recipe import RecipeWarning
from lightning_recipe.callbacks._monitor import Monitor
from tests.models import MLPClassifier, cluster_data, loader, trainer


class Probe(Monitor):
    def __init__(self, fail_at: int | None = None, **kwargs):
        super().__init__(every_n_steps=2, **kwargs)
        self.fail_at = fail_at
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.enabled or not self.due(trainer.global_step):
            return
        with self.guard(trainer):
            self.calls += 1
            if trainer.global_step == self.fail_at:
                raise RuntimeError("boom")
            self.alert(trainer, "seen", f"measured step {trainer.global_step}; expected nothing; fix: none")


def _fit(monitor, steps=8):
    torch.manual_seed(0)
    t = trainer(max_steps=steps, callbacks=[monitor])
    t.fit(MLPClassifier(), loader(cluster_data()))
    return t


def test_an_alert_is_recorded_and_warned_once_per_kind():
    monitor = Probe()
    with pytest.warns(RecipeWarning, match="Probe alert `seen` at step 2") as record:
        _fit(monitor)
    assert monitor.calls == 4  # steps 2, 4, 6, 8
    assert [(a.kind, a.step) for a in monitor.alerts] == [("seen", 2)]
    assert sum("alert `seen`" in str(w.message) for w in record) == 1
    assert monitor.seconds > 0


def test_an_internal_error_switches_the_monitor_off_and_training_goes_on():
    monitor = Probe(fail_at=4)
    with pytest.warns(RecipeWarning) as record:
        t = _fit(monitor)
    assert t.global_step == 8
    assert not monitor.enabled
    assert monitor.calls == 2  # step 2, then the error at step 4, then nothing
    errors = [w for w in record if "switched itself off" in str(w.message)]
    assert len(errors) == 1 and "RuntimeError: boom" in str(errors[0].message)


def test_every_n_steps_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"Expected `every_n_steps` to be an integer >= 1, but got 0"):
        Probe.__bases__[0](every_n_steps=0)
