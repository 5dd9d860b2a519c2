"""Compiled models (`torch.compile(submodule)`, `module.compile()`): the package's own forward passes run with dynamo
off, so the leakage probe's hooks work, and training compiles exactly the graphs it compiles without the package.

A counting backend stands in for inductor: it records every graph dynamo hands it and runs it eagerly, so these
tests cost no code generation. The run with inductor itself is in tests/test_no_side_effects.py (slow)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_recipe import (
    BatchLeakageProbe,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    RecipeCheckError,
    UpdateRatioMonitor,
)
from lightning_recipe.callbacks._preflight import _one_line
from lightning_recipe.diagnostics.compiled import eager
from tests.models import cluster_data, loader, trainer


class Counting:
    """A dynamo backend that counts the graphs it is given (one per compile or recompile) and runs them as is."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


class BatchMean(nn.Module):
    """The planted bug: centring over dim 0 mixes every example of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class Classifier(L.LightningModule):
    log_loss = True

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), BatchMean() if leak else nn.Identity(), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _compiled(how: str, backend, leak: bool = False) -> nn.Module:
    """``how``: ``torch.compile(submodule)``, ``module.compile()``, or ``trainer.fit(torch.compile(module))`` (which
    Lightning unwraps, compiling the module's ``forward``)."""
    model = Classifier(leak)
    if how == "submodule":
        model.net = torch.compile(model.net, backend=backend)
    elif how == "module":
        model.compile(backend=backend)
    else:
        # with the whole LightningModule compiled, torch 2.13 traces `self.log` in `training_step` and fails,
        # with or without this package: that model logs nothing
        model.log_loss = False
        return torch.compile(model, backend=backend)
    return model


def test_eager_runs_compiled_code_without_compiling():
    backend = Counting()
    fn = torch.compile(lambda x: x * 2 + 1, backend=backend)
    with eager():
        assert torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0))
    assert backend.graphs == 0
    fn(torch.ones(2))
    assert backend.graphs == 1, "outside the block, compilation is back"


def test_eager_without_set_stance_uses_dynamos_disable_switch(monkeypatch):
    """torch 2.3-2.5 have no `torch.compiler.set_stance`."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    backend = Counting()
    fn = torch.compile(lambda x: x - 1, backend=backend)
    with eager():
        fn(torch.ones(3))
    assert backend.graphs == 0


@pytest.mark.parametrize("how", ["submodule", "module"])
def test_leakage_probe_checks_a_compiled_model(how):
    probe = BatchLeakageProbe()
    trainer(max_steps=1, callbacks=[probe]).fit(_compiled(how, "eager"), loader(cluster_data()))
    assert probe.result.status.value == "passed", probe.result.summary
    assert probe.result.details["num_examples"] >= 2


@pytest.mark.parametrize("how", ["submodule", "module"])
def test_leakage_probe_catches_a_batch_leak_in_a_compiled_model(how):
    probe = BatchLeakageProbe()
    with pytest.raises(RecipeCheckError):
        trainer(max_steps=1, callbacks=[probe]).fit(_compiled(how, "eager", leak=True), loader(cluster_data()))
    result = probe.result
    assert result.status.value == "failed"
    assert "mix through the batch" in result.summary and "\n" not in result.summary
    assert result.details["first_mixing_module"]["type"].startswith("BatchMean"), result.details


def _graphs_compiled(how: str, callbacks: list) -> int:
    L.seed_everything(0, verbose=False)
    backend = Counting()
    trainer(max_steps=3, callbacks=callbacks).fit(_compiled(how, backend), loader(cluster_data()))
    return backend.graphs


@pytest.mark.parametrize("how", ["submodule", "module", "fit"])
def test_the_package_makes_dynamo_compile_nothing_training_would_not(how):
    """The cause of the drift seen with inductor: a forward of ours (eval mode, no gradients, hooks, another batch
    size) compiled its own graph, and training's next call recompiled. With every component attached, dynamo
    receives exactly the graphs it receives without them."""
    plain = _graphs_compiled(how, [])
    callbacks = [
        InitLossCheck(),
        OverfitOneBatch(),
        BatchLeakageProbe(),
        UpdateRatioMonitor(every_n_steps=1),
        PredictionDynamicsLogger(every_n_steps=1),
        FirstLayerVisualizer(every_n_steps=1),
    ]
    assert _graphs_compiled(how, callbacks) == plain
    assert all(c.result.status.value == "passed" for c in callbacks[:3]), [c.result.summary for c in callbacks[:3]]
    assert all(m.enabled for m in callbacks[3:])
    assert callbacks[-1].layer_name in ("net.0", "net._orig_mod.0")  # the name `layer=` takes


def test_an_internal_error_summary_is_one_line():
    error = RuntimeError("first line of it\n\n" + "internals\n" * 200)
    assert _one_line(error) == "first line of it"
    assert len(_one_line(RuntimeError("x" * 5000))) == 300
