"""The guarantee users rely on: a seeded run with all three checks and all three monitors ends bit-identical to
the same run without them (parameters, buffers, optimizer and scheduler state, the global RNG), with BatchNorm,
dropout, shuffling, a validation loader and an LR schedule."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch

from lightning_recipe import (
    BatchLeakageProbe,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    UpdateRatioMonitor,
)
from tests.models import trainer
from tests.zoo import BatchNormCNN, CausalLM, shapes, tokens


class Validated:
    """A validation step, so Lightning runs the validation loader (and the dynamics logger reads from it)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.loss(self(x), y))


class ValidatedLM(Validated, CausalLM):
    pass


class ScheduledCNN(Validated, BatchNormCNN):
    """BatchNorm, dropout, SGD with momentum and a per-step LR schedule: every kind of state."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _run(model_cls, data, with_checks: bool, steps: int = 8):
    L.seed_everything(123, workers=True, verbose=False)
    model = model_cls()
    checks = [InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()] if with_checks else []
    # the monitors measure every step: the most chances to disturb the run
    monitors = [m(every_n_steps=1) for m in (UpdateRatioMonitor, PredictionDynamicsLogger, FirstLayerVisualizer)]
    t = trainer(max_steps=steps, callbacks=checks + (monitors if with_checks else []), deterministic=True)
    t.fit(model, data(), data())
    if with_checks:
        assert all(c.result is not None and c.result.passed for c in checks)
        assert all(m.enabled for m in monitors)
    opt = t.optimizers[0]
    scheds = [c.scheduler.state_dict() for c in t.lr_scheduler_configs]
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), scheds, torch.get_rng_state()


@pytest.mark.parametrize(("model_cls", "data"), [(ScheduledCNN, shapes), (ValidatedLM, tokens)], ids=["cnn", "lm"])
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
