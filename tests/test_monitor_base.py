"""The contract every monitor shares, on a monitor written for the test: the lifecycle the base owns (start,
waiting for the first batch, measuring on the schedule once per optimizer step, finishing), alerts once per kind
and key, an internal error switches the monitor off with one warning and training goes on, and its cost is
counted."""

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

    def measure(self, trainer, pl_module, step):
        self.calls += 1
        if step == self.fail_at:
            raise RuntimeError("boom")
        self.alert(trainer, "seen", f"measured step {step}; expected nothing; fix: none")


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


class Lifecycle(Monitor):
    """Records what the base calls, in order; waits for the first batch when asked to."""

    def __init__(self, wait: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.wait = wait
        self.events = []

    def start(self, trainer, pl_module):
        self.events.append(("start", trainer.global_step))
        if self.wait:
            self.wait_for_first_batch("a stream")

    def start_with_batch(self, trainer, pl_module, batch, reason):
        self.events.append(("start_with_batch", trainer.global_step, reason))
        batch[0].zero_()  # the monitor's own copy: training's batch is untouched

    def measure(self, trainer, pl_module, step):
        self.events.append(("measure", step))

    def finish(self, trainer, pl_module):
        self.events.append(("finish", trainer.global_step))


def test_the_base_calls_the_lifecycle_in_order_on_the_schedule():
    monitor = Lifecycle(every_n_steps=3)
    _fit(monitor, steps=7)
    assert monitor.events == [("start", 0), ("measure", 3), ("measure", 6), ("finish", 7)]


def test_gradient_accumulation_measures_once_per_optimizer_step():
    monitor = Lifecycle(every_n_steps=2)
    torch.manual_seed(0)
    trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[monitor]).fit(MLPClassifier(), loader(cluster_data()))
    assert [e for e in monitor.events if e[0] == "measure"] == [("measure", 2), ("measure", 4)]


def test_an_injected_schedule_says_when():
    monitor = Lifecycle(every_n_steps=100)
    monitor.schedule = lambda step: step in (1, 5)
    _fit(monitor, steps=6)
    assert [e for e in monitor.events if e[0] == "measure"] == [("measure", 1), ("measure", 5)]


def test_a_waiting_monitor_starts_on_its_own_copy_of_the_first_batch():
    seen = []

    class Model(MLPClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                seen.append(batch[0].abs().sum().item())
            return super().training_step(batch, batch_idx)

    monitor = Lifecycle(wait=True, every_n_steps=2)
    torch.manual_seed(0)
    trainer(max_steps=2, callbacks=[monitor]).fit(Model(), loader(cluster_data()))
    assert monitor.events[:2] == [("start", 0), ("start_with_batch", 0, "a stream")]
    assert seen[0] > 0  # the monitor zeroed its copy, not the batch training stepped on


def test_a_monitor_that_is_not_ready_is_not_measured_nor_finished():
    class NotReady(Lifecycle):
        def ready(self):
            return False

    monitor = NotReady(every_n_steps=1)
    _fit(monitor, steps=3)
    assert monitor.events == [("start", 0)]


def test_an_error_in_start_switches_the_monitor_off_and_nothing_else_runs():
    class Broken(Lifecycle):
        def start(self, trainer, pl_module):
            super().start(trainer, pl_module)
            raise RuntimeError("broken start")

    monitor = Broken(every_n_steps=1)
    with pytest.warns(RecipeWarning, match="switched itself off.*broken start"):
        t = _fit(monitor, steps=3)
    assert t.global_step == 3 and not monitor.enabled
    assert monitor.events == [("start", 0)]


# -- reads that wait for the device: the GPU path, forced on CPU tensors -------------------------------------


def test_a_deferred_read_runs_at_the_next_flush_in_order_on_a_copy(defer_reads):
    monitor = Probe()
    defer_reads(True)
    seen = []
    value = torch.tensor([1.0])
    monitor.defer([value], lambda host: seen.append(("a", host[0].item())))
    value.add_(1)  # a later optimizer step writes to the tensor: the read must see the value at defer time
    monitor.defer([value], lambda host: seen.append(("b", host[0].item())))
    assert seen == []
    monitor.flush()
    assert seen == [("a", 1.0), ("b", 2.0)]
    defer_reads(False)
    monitor.defer([value], lambda host: seen.append(("now", host[0].item())))
    assert seen[-1] == ("now", 2.0)  # nothing pending: read at once


def test_a_read_behind_a_pending_one_waits_its_turn_and_the_end_drains_all(defer_reads):
    monitor = Probe()
    defer_reads(True)
    seen = []
    monitor.defer([torch.zeros(1)], lambda host: seen.append(1))
    defer_reads(False)
    monitor.defer([torch.zeros(1)], lambda host: seen.append(2))  # would be immediate, but 1 is still pending
    assert seen == []
    monitor.flush(wait=True)
    assert seen == [1, 2]


def test_an_error_in_a_deferred_read_switches_the_monitor_off_and_drops_the_rest(defer_reads):
    monitor = Probe()
    defer_reads(True)
    monitor.defer([torch.zeros(1)], lambda host: 1 / 0)
    monitor.defer([torch.zeros(1)], lambda host: pytest.fail("read after the monitor switched off"))
    with pytest.warns(RecipeWarning, match="switched itself off.*ZeroDivisionError"), monitor.guard():
        monitor.flush()
    assert not monitor.enabled and not monitor._pending
