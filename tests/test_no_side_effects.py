"""The guarantee users rely on: a seeded run with all three checks ends bit-identical to the same run
without them (parameters, buffers, optimizer and scheduler state), with BatchNorm, dropout and shuffling."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch

from lightning_recipe import BatchLeakageProbe, InitLossCheck, OverfitOneBatch
from tests.models import trainer
from tests.zoo import BatchNormCNN, CausalLM, shapes, tokens


class ScheduledCNN(BatchNormCNN):
    """BatchNorm, dropout, SGD with momentum and a per-step LR schedule: every kind of state."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _run(model_cls, data, with_checks: bool, steps: int = 8):
    L.seed_everything(123, workers=True, verbose=False)
    model = model_cls()
    callbacks = [InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()] if with_checks else []
    t = trainer(max_steps=steps, callbacks=callbacks, deterministic=True)
    t.fit(model, data())
    if with_checks:
        assert all(c.result is not None and c.result.passed for c in callbacks)
    opt = t.optimizers[0]
    scheds = [c.scheduler.state_dict() for c in t.lr_scheduler_configs]
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), scheds, torch.get_rng_state()


@pytest.mark.parametrize(("model_cls", "data"), [(ScheduledCNN, shapes), (CausalLM, tokens)], ids=["cnn", "lm"])
def test_run_with_checks_ends_bit_identical_to_run_without(model_cls, data):
    plain = _run(model_cls, data, with_checks=False)
    checked = _run(model_cls, data, with_checks=True)
    for key, value in plain[0].items():
        assert torch.equal(value, checked[0][key]), f"{key} differs"
    assert plain[1]["param_groups"] == checked[1]["param_groups"]
    for index, state in plain[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(checked[1]["state"][index][name])), name
    assert plain[2] == checked[2]
    assert torch.equal(plain[3], checked[3]), "the global RNG ended in a different state"
