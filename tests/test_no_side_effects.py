"""The guarantee users rely on: a seeded run with all three checks and all three monitors ends bit-identical to
the same run without them (parameters, buffers, optimizer and scheduler state, the global RNG, the module's own
attributes), with BatchNorm, dropout, shuffling, a validation loader and an LR schedule; for a stateful module that
carries an LSTM hidden state across batches (Lightning's own `LightningLSTM` demo); and for compiled models
(`torch.compile(submodule)` and `module.compile()`)."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.lstm import LightningLSTM, SimpleLSTM
from torch.utils.data import DataLoader

from lightning_recipe import (
    BatchLeakageProbe,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
)
from lightning_recipe.registry import CHECKS, MONITORS
from tests.models import trainer
from tests.zoo import BatchNormCNN, CausalLM, shapes, token_data, tokens


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


class StatefulLSTM(LightningLSTM):
    """Lightning's `LightningLSTM` demo, small: `training_step` carries `self.hidden` from batch to batch, and
    counts its calls and keeps its losses in a list (plain attributes a check must put back)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=16)
        self.model = SimpleLSTM(vocab_size=16, ninp=16, nhid=24, nlayers=2, dropout=0.2)
        self.calls = 0
        self.losses: list[torch.Tensor] = []

    def prepare_data(self) -> None:
        pass  # the demo downloads WikiText-2; these tests make their own tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(N*T, V)`` from a fresh hidden state, for the monitors and the probe."""
        return self.model(x, self.model.init_hidden(x.size(0)))[0]

    def training_step(self, batch, batch_idx):
        self.calls += 1
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.nll_loss(self(x), y.view(-1)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def stream_tokens() -> DataLoader:
    """Fixed-size batches (the carried hidden state needs one batch size), in a shuffled order."""
    return DataLoader(token_data(n=192), batch_size=16, shuffle=True, drop_last=True)  # 12 batches: no epoch end


def _attributes(model: L.LightningModule) -> dict:
    if not isinstance(model, StatefulLSTM):
        return {}
    # the losses depend on the hidden state carried into each step (the demo drops it at the epoch end)
    return {"calls": model.calls, "losses": torch.stack(model.losses)}


def _compiled_submodules(backend: str):
    def make() -> ScheduledCNN:
        model = ScheduledCNN()
        model.features = torch.compile(model.features, backend=backend)
        model.head = torch.compile(model.head, backend=backend)
        return model

    return make


def _compiled_module(backend: str):
    def make() -> ScheduledCNN:
        model = ScheduledCNN()
        model.compile(backend=backend)
        return model

    return make


def _run(make_model, data, with_checks: bool, steps: int = 8, deterministic: bool = True, checks_too: bool = True):
    L.seed_everything(123, workers=True, verbose=False)
    model = make_model()
    checks = [cls() for cls in CHECKS.values()] if with_checks and checks_too else []  # every registered check
    # the monitors measure every step: the most chances to disturb the run
    monitors = [cls(every_n_steps=1) for cls in MONITORS.values()]
    t = trainer(max_steps=steps, callbacks=checks + (monitors if with_checks else []), deterministic=deterministic)
    t.fit(model, data(), data())
    if with_checks:
        # passed, not skipped: a check that cannot read a compiled or stateful model guarantees nothing
        assert all(c.result.status.value == "passed" for c in checks), [c.result.summary for c in checks]
        assert all(m.enabled and not m.alerts for m in monitors)
    opt = t.optimizers[0]
    scheds = [c.scheduler.state_dict() for c in t.lr_scheduler_configs]
    state = copy.deepcopy(model.state_dict())
    return state, copy.deepcopy(opt.state_dict()), scheds, torch.get_rng_state(), _attributes(model)


def _assert_identical(plain, checked) -> None:
    for key, value in plain[0].items():
        assert torch.equal(value, checked[0][key]), f"{key} differs"
    assert plain[1]["param_groups"] == checked[1]["param_groups"]
    for index, state in plain[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(checked[1]["state"][index][name])), name
    assert plain[2] == checked[2]
    assert torch.equal(plain[3], checked[3]), "the global RNG ended in a different state"
    assert plain[4].keys() == checked[4].keys()
    for name, value in plain[4].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(checked[4][name])), f"attribute {name} differs"


@pytest.mark.parametrize(
    ("make_model", "data"),
    [
        (ScheduledCNN, shapes),
        (ValidatedLM, tokens),
        (StatefulLSTM, stream_tokens),
        (_compiled_submodules("eager"), shapes),
        (_compiled_module("eager"), shapes),
    ],
    ids=["cnn", "lm", "stateful-lstm", "compiled-submodules", "compiled-module"],
)
def test_run_with_checks_ends_bit_identical_to_run_without(make_model, data):
    plain = _run(make_model, data, with_checks=False)
    checked = _run(make_model, data, with_checks=True)
    _assert_identical(plain, checked)


@pytest.mark.slow
@pytest.mark.parametrize("checks_too", [True, False], ids=["all", "monitors-only"])
@pytest.mark.parametrize(
    "make_model", [_compiled_submodules("inductor"), _compiled_module("inductor")], ids=["submodules", "module"]
)
def test_inductor_compiled_run_with_checks_ends_bit_identical(make_model, checks_too):
    """The default backend generates its own kernels. A graph compiled for one of the package's forward passes
    (eval mode, no gradients, hooks) made dynamo recompile training's graph and the run drift: seen with the
    monitors alone, whose forward is then the first call the compiled model gets. Without `deterministic=True`, as
    compiled models are usually trained (inductor then generates its own dropout masks)."""
    plain = _run(make_model, shapes, with_checks=False, deterministic=False)
    checked = _run(make_model, shapes, with_checks=True, deterministic=False, checks_too=checks_too)
    _assert_identical(plain, checked)


class _AttributesAtStart(L.Callback):
    """Placed after a check: what the module's attributes are when training is about to start."""

    def on_train_start(self, trainer, pl_module):
        self.seen = (pl_module.hidden, pl_module.calls, list(pl_module.losses))


@pytest.mark.parametrize("check", [InitLossCheck, OverfitOneBatch, BatchLeakageProbe])
def test_each_check_leaves_a_stateful_modules_attributes_as_it_found_them(check):
    """Lightning's LSTM demo carries `self.hidden`: a check left it set (OverfitOneBatch: for 4 examples, so the
    first real step crashed on a 16-example batch), its call counter advanced and its loss list grown."""
    torch.manual_seed(0)
    model, seen = StatefulLSTM(), _AttributesAtStart()
    c = check()
    trainer(max_steps=2, callbacks=[c, seen]).fit(model, stream_tokens())
    assert c.result.status.value == "passed", c.result.summary
    assert seen.seen == (None, 0, [])
    assert model.calls == 2 and len(model.losses) == 2


class CachingCNN(BatchNormCNN):
    """A forward that counts its calls and caches its last output: the monitors' own forward passes (the first
    layer's trace, the fixed batch's predictions) must leave both as training left them."""

    def __init__(self) -> None:
        super().__init__()
        self.forward_calls = 0
        self.last_output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        self.last_output = super().forward(x)
        return self.last_output


def test_monitors_forward_passes_leave_the_modules_attributes_alone():
    torch.manual_seed(0)
    model = CachingCNN()
    monitors = [PredictionDynamicsLogger(every_n_steps=1), FirstLayerVisualizer(every_n_steps=1)]
    trainer(max_steps=3, callbacks=monitors).fit(model, shapes())
    assert all(m.enabled for m in monitors) and monitors[1].layer_name is not None
    assert model.forward_calls == 3, "only training's own forward passes count"
    assert model.last_output is not None and model.last_output.shape[0] == 32, "training's batch, not the 12 examples"
