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


# -- reads that wait for the device: the GPU path, forced on CPU tensors -------------------------------------


def test_a_deferred_read_runs_at_the_next_flush_in_order_on_a_copy():
    monitor = Probe()
    monitor._always_defer = True
    seen = []
    value = torch.tensor([1.0])
    monitor.defer([value], lambda host: seen.append(("a", host[0].item())))
    value.add_(1)  # a later optimizer step writes to the tensor: the read must see the value at defer time
    monitor.defer([value], lambda host: seen.append(("b", host[0].item())))
    assert seen == []
    monitor.flush()
    assert seen == [("a", 1.0), ("b", 2.0)]
    monitor._always_defer = False
    monitor.defer([value], lambda host: seen.append(("now", host[0].item())))
    assert seen[-1] == ("now", 2.0)  # nothing pending: read at once


def test_a_read_behind_a_pending_one_waits_its_turn_and_the_end_drains_all():
    monitor = Probe()
    monitor._always_defer = True
    seen = []
    monitor.defer([torch.zeros(1)], lambda host: seen.append(1))
    monitor._always_defer = False
    monitor.defer([torch.zeros(1)], lambda host: seen.append(2))  # would be immediate, but 1 is still pending
    assert seen == []
    monitor.flush(wait=True)
    assert seen == [1, 2]


def test_an_error_in_a_deferred_read_switches_the_monitor_off_and_drops_the_rest():
    monitor = Probe()
    monitor._always_defer = True
    monitor.defer([torch.zeros(1)], lambda host: 1 / 0)
    monitor.defer([torch.zeros(1)], lambda host: pytest.fail("read after the monitor switched off"))
    with pytest.warns(RecipeWarning, match="switched itself off.*ZeroDivisionError"), monitor.guard():
        monitor.flush()
    assert not monitor.enabled and not monitor._pending
