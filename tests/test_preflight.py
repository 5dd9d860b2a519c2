"""The shared machinery of pre-flight checks, through a real Trainer with a check written for the test."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_recipe import CheckStatus, RecipeCheckError, RecipeWarning
from lightning_recipe.callbacks._context import CheckContext
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.diagnostics.batch import BatchAdapter, BatchNotUnderstood, default_inputs, select_output
from lightning_recipe.diagnostics.state import preserved
from tests.models import MLPClassifier, cluster_data, loader, trainer


class Vandal(PreflightCheck):
    """Disturbs everything a check could disturb, then fails or passes as told."""

    num_batches = 3

    def __init__(self, verdict="passed", **kwargs):
        super().__init__(**kwargs)
        self.verdict = verdict
        self.seen = None

    def run(self, ctx: CheckContext):
        self.seen = [b[0].clone() for b in ctx.batches]
        model = ctx.module
        opt = ctx.trainer.optimizers[0]
        for batch in ctx.batches:
            loss = ctx.training_step_loss(batch)  # calls self.log inside: must be silenced
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model.net[0].weight.requires_grad_(False)
        torch.rand(5)
        if self.verdict == "failed":
            return self.failed("measured 1, expected 0", "do the thing")
        if self.verdict == "error":
            raise RuntimeError("boom")
        return self.passed("all good")


def _fit(callbacks, seed=0, steps=6, **loader_kwargs):
    torch.manual_seed(seed)
    model = MLPClassifier()
    t = trainer(max_steps=steps, callbacks=callbacks)
    t.fit(model, loader(cluster_data(), **loader_kwargs))
    return model, t


def _final_state(model, t):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(t.optimizers[0].state_dict())


def _assert_identical(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for (ka, va), (_, vb) in zip(oa["state"].items(), ob["state"].items(), strict=True):
        for name in va:
            assert torch.equal(torch.as_tensor(va[name]), torch.as_tensor(vb[name])), (ka, name)


def test_a_disturbing_check_leaves_the_run_bit_identical():
    plain = _final_state(*_fit([]))
    check = Vandal()
    checked = _final_state(*_fit([check]))
    assert check.result.status is CheckStatus.PASSED
    _assert_identical(plain, checked)


def test_check_sees_the_first_batches_of_a_fresh_pass_without_moving_the_real_one():
    torch.manual_seed(0)
    first_real = []

    class Spy(MLPClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                first_real.append(batch[0].clone())
            return super().training_step(batch, batch_idx)

    check = Vandal()
    model = Spy()
    trainer(max_steps=2, callbacks=[check]).fit(model, loader(cluster_data(), shuffle=False))
    assert len(check.seen) == 3
    assert torch.equal(check.seen[0], first_real[0])  # unshuffled: the check's first batch is the real first


class LogsWhatItSees(MLPClassifier):
    """Logs 1000 from any training_step call that is not a real training step, 1 otherwise."""

    real = False

    def on_train_batch_start(self, batch, batch_idx):
        self.real = True

    def training_step(self, batch, batch_idx):
        self.log("probe", 1.0 if self.real else 1000.0, on_step=True, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_self_log_inside_training_step_neither_crashes_nor_leaks_into_metrics():
    torch.manual_seed(0)
    check = Vandal()
    t = trainer(max_steps=2, callbacks=[check])
    t.fit(LogsWhatItSees(), loader(cluster_data()))
    assert check.result.status is CheckStatus.PASSED, check.result.summary  # self.log(on_step=True) would raise
    assert t.callback_metrics["probe_epoch"].item() == 1.0
    assert "log" not in t.lightning_module.__dict__


def test_failed_check_raises_before_any_optimizer_step():
    torch.manual_seed(0)
    model = MLPClassifier()
    before = copy.deepcopy(model.state_dict())
    t = trainer(callbacks=[Vandal("failed")])
    with pytest.raises(RecipeCheckError, match="measured 1, expected 0") as info:
        t.fit(model, loader(cluster_data()))
    assert info.value.result.status is CheckStatus.FAILED
    assert info.value.result.hint == "do the thing"
    assert t.global_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_failed_check_with_warn_lets_training_go_on():
    with pytest.warns(RecipeWarning, match="measured 1"):
        _, t = _fit([Vandal("failed", on_fail="warn")], steps=2)
    assert t.global_step == 2


def test_internal_error_is_a_skip_with_one_warning_and_training_goes_on():
    check = Vandal("error")
    with pytest.warns(RecipeWarning, match="Please report this: RuntimeError: boom"):
        _, t = _fit([check], steps=2)
    assert check.result.status is CheckStatus.SKIPPED
    assert t.global_step == 2


def test_batch_it_cannot_understand_is_skipped_naming_the_argument():
    check = Vandal()
    check.run = lambda ctx: (ctx.adapter.get_inputs({"pixels": 1}), None)[1]
    _fit([check], steps=1)
    assert check.result.status is CheckStatus.SKIPPED
    assert "inputs=" in check.result.summary


def test_persistent_worker_loader_is_read_without_resetting_the_live_iterator():
    plain = _final_state(*_fit([], num_workers=1, persistent_workers=True))
    checked = _final_state(*_fit([Vandal()], num_workers=1, persistent_workers=True))
    _assert_identical(plain, checked)


def test_sampler_with_its_own_generator_is_restored():
    def run(callbacks):
        g = torch.Generator().manual_seed(7)
        return _final_state(*_fit(callbacks, generator=g))

    _assert_identical(run([]), run([Vandal()]))


def test_bad_on_fail_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"Expected `on_fail` to be one of \['raise', 'warn'\], but got 'stop'"):
        Vandal(on_fail="stop")


def test_preserved_restores_buffers_modes_grads_and_rng():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    expected_next = torch.get_rng_state()
    with preserved(model, [opt]):
        loss = model(torch.randn(8, 3)).pow(2).sum()
        loss.backward()
        opt.step()
        model.eval()
        model[0].bias.requires_grad_(False)
    assert torch.equal(torch.get_rng_state(), expected_next)
    assert model.training and model[1].training and model[0].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["state"] == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_default_batch_understanding():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert default_inputs((x, y)) is x
    assert default_inputs({"image": x, "label": y}) is x
    assert BatchAdapter().get_targets({"image": x, "label": y}) is y
    with pytest.raises(BatchNotUnderstood, match="Pass `inputs="):
        default_inputs({"pixels": x})
    with pytest.raises(BatchNotUnderstood, match="Pass `targets="):
        BatchAdapter().get_targets((x,))
    assert select_output({"loss": torch.tensor(1.0), "logits": x}) is x
    assert select_output((x, y)) is x


def test_without_tensorboard_scalars_still_reach_the_logger_and_figures_warn_once(tmp_path, monkeypatch):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_recipe import InitLossCheck, OverfitOneBatch, _logging

    monkeypatch.setattr(_logging, "_warned_no_tensorboard", False)
    torch.manual_seed(0)
    logger = CSVLogger(str(tmp_path))
    with pytest.warns(UserWarning, match="has no TensorBoardLogger") as record:
        trainer(max_steps=1, logger=logger, callbacks=[InitLossCheck(), OverfitOneBatch()]).fit(
            MLPClassifier(), loader(cluster_data())
        )
    assert sum("TensorBoardLogger" in str(w.message) for w in record) == 1
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "recipe/init_loss_check/measured_loss" in columns
    assert "recipe/overfit_one_batch/loss" in columns
