"""What users do that a naive check trips over: each of the three checks must give a clear verdict or a
clear skip, never a traceback from deep inside, and never lose the run."""

from __future__ import annotations

from collections import namedtuple

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_recipe import (
    BatchLeakageProbe,
    CheckStatus,
    InitLossCheck,
    OverfitOneBatch,
    RecipeCheckError,
    RecipeSuite,
)
from lightning_recipe.registry import CHECKS as REGISTERED_CHECKS
from tests.models import MLPClassifier, cluster_data, loader, trainer
from tests.zoo import DictDataset

CHECKS = list(REGISTERED_CHECKS.values())  # every registered check
ids = [c.__name__ for c in CHECKS]


def _fit(model, data, check, **kwargs):
    L.seed_everything(0, verbose=False)
    t = trainer(max_steps=2, callbacks=[check], **kwargs)
    t.fit(model, data)
    return t


class NoBatchIdx(MLPClassifier):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class ReturnsNothing(MLPClassifier):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)


class Manual(MLPClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


Pair = namedtuple("Pair", ["features", "label"])


class Stream(IterableDataset):
    """An iterable dataset that draws its examples from the global RNG as it goes."""

    def __iter__(self):
        data = cluster_data()
        for i in torch.randperm(len(data)).tolist():
            yield data[i]


class ToyDataModule(L.LightningDataModule):
    def train_dataloader(self):
        return loader(cluster_data())


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_training_step_without_batch_idx(check_cls):
    check = check_cls()
    _fit(NoBatchIdx(), loader(cluster_data()), check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("check_cls", [InitLossCheck, OverfitOneBatch], ids=["InitLossCheck", "OverfitOneBatch"])
def test_training_step_that_returns_nothing_is_skipped_saying_why(check_cls):
    check = check_cls()
    t = _fit(ReturnsNothing(), loader(cluster_data()), check)
    assert check.result.status is CheckStatus.SKIPPED
    assert "`training_step` returned no loss" in check.result.summary
    assert t.state.finished  # the run goes on


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_dict_batch_with_unknown_keys_is_skipped_naming_the_argument(check_cls):
    check = check_cls()

    class DictModel(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["pixels"]), batch["answer"])

    t = _fit(DictModel(), loader(DictDataset(cluster_data())), check)
    assert check.result.status is CheckStatus.SKIPPED
    assert "inputs=" in check.result.summary
    assert t.global_step == 2


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_namedtuple_batches_work_like_tuples(check_cls):
    check = check_cls()
    data = [Pair(x, y) for x, y in cluster_data()]
    _fit(NoBatchIdx(), DataLoader(data, batch_size=32, shuffle=True), check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("check_cls", [InitLossCheck, OverfitOneBatch], ids=["InitLossCheck", "OverfitOneBatch"])
def test_nan_in_the_data_fails_saying_non_finite(check_cls):
    data = cluster_data()
    data.tensors[0][::7, 0] = float("nan")
    with pytest.raises(RecipeCheckError, match=r"(?i)non-finite|nan"):
        _fit(MLPClassifier(), loader(data, shuffle=False), check_cls())


def test_nan_in_the_data_does_not_look_like_a_leak():
    data = cluster_data()
    data.tensors[0][::7, 0] = float("nan")
    check = BatchLeakageProbe()
    _fit(MLPClassifier(), loader(data, shuffle=False), check)
    assert check.result.status is not CheckStatus.FAILED or "nan" in check.result.summary.lower()


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_manual_optimization(check_cls):
    check = check_cls()
    t = _fit(Manual(), loader(cluster_data()), check)
    assert t.global_step == 2
    if check_cls is OverfitOneBatch:
        assert check.result.status is CheckStatus.SKIPPED
        assert "manual optimization" in check.result.summary
    else:
        assert check.result.status is CheckStatus.PASSED, check.result.format()
    if check_cls is InitLossCheck:
        assert check.result.details["loss_source"] == "inferred"


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_several_training_dataloaders_are_checked_on_the_first_batch_training_fetches(check_cls):
    """A dict of loaders cannot be read twice as one: the check takes the combined batch training fetches. Its
    reading needs `inputs=` / `targets=`, and without them the check skips naming them."""

    class TwoLoaders(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx)

    data = {"a": loader(cluster_data()), "b": loader(cluster_data(seed=1))}
    check = check_cls()
    t = _fit(TwoLoaders(), data, check)
    assert check.result.status is CheckStatus.SKIPPED and "`inputs=" in check.result.summary
    assert "the training loader is a dict, not one DataLoader" in check.result.summary
    assert t.global_step == 2
    check = check_cls(inputs=lambda b: b["a"][0], targets=lambda b: b["a"][1])
    _fit(TwoLoaders(), data, check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert "Read from the first batch training fetched" in check.result.summary


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_datamodule_iterable_dataset_and_workers(check_cls):
    for data in (ToyDataModule(), DataLoader(Stream(), batch_size=32), loader(cluster_data(), num_workers=2)):
        check = check_cls()
        if isinstance(data, L.LightningDataModule):
            L.seed_everything(0, verbose=False)
            trainer(max_steps=2, callbacks=[check]).fit(MLPClassifier(), datamodule=data)
        else:
            _fit(MLPClassifier(), data, check)
        assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_mixed_and_true_precisions(check_cls, precision):
    """Under `-true` precisions the parameters are bf16/fp64: the batch must be converted as Lightning converts
    it before `training_step`, or the model refuses the fp32 input and the check skips."""
    check = check_cls()
    _fit(MLPClassifier(), loader(cluster_data()), check, precision=precision)
    assert check.result.status is CheckStatus.PASSED, check.result.format()


class DictToTuple(MLPClassifier):
    """Turns the loader's dict batches into `(x, y)` in `on_before_batch_transfer`, before the device move."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch["pixels"], batch["answer"]


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_batches_go_through_on_before_batch_transfer_as_in_training(check_cls):
    data = DictDataset(cluster_data())
    check = check_cls()
    _fit(DictToTuple(), DataLoader(data, batch_size=32), check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_arguments_are_checked_at_construction(check_cls):
    with pytest.raises(ValueError, match=r"Expected `on_fail` to be one of \['raise', 'warn'\], but got 'ignore'"):
        check_cls(on_fail="ignore")
    with pytest.raises(TypeError, match="Expected `inputs` to be a callable"):
        check_cls(inputs="x")
    assert check_cls().result is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OverfitOneBatch(lr=float("inf")), r"Expected `lr` to be a finite positive number, but got inf\."),
        (lambda: OverfitOneBatch(lr=float("nan")), r"Expected `lr` to be a finite positive number, but got nan\."),
        (lambda: OverfitOneBatch(lrs=(1e-3, float("inf"))), r"Expected `lrs` to be a finite positive number"),
        (
            lambda: InitLossCheck(expected=-1),
            r"Expected `expected` to be the loss at initialization, a finite "
            r"number >= 0, or None, but got -1\.",
        ),
        (lambda: InitLossCheck(expected=float("inf")), r"`expected` to be .* but got inf\."),
        (lambda: InitLossCheck(ignore_index="a"), r"Expected `ignore_index` to be an integer, but got 'a'\."),
        (lambda: InitLossCheck(ignore_index=1.5), r"Expected `ignore_index` to be an integer, but got 1\.5\."),
        (lambda: BatchLeakageProbe(causal=1), r"Expected `causal` to be one of \[None, True, False\], but got 1\."),
        (lambda: BatchLeakageProbe(graph=0.0), r"Expected `graph` to be one of \[None, True, False\], but got 0\.0"),
        (
            lambda: RecipeSuite(sanity_run=False, exit_process=1),
            r"Expected `exit_process` to be one of \[True, False\], but got 1\.",
        ),
    ],
)
def test_arguments_that_cannot_work_are_refused_at_construction(make, message):
    """inf passes `> 0`, and `1 == True`: both let a value through that gives a wrong verdict later."""
    with pytest.raises(ValueError, match=message):
        make()


def test_monitor_thresholds_must_be_finite():
    from lightning_recipe import FirstLayerVisualizer, PredictionDynamicsLogger, UpdateRatioMonitor

    with pytest.raises(ValueError, match=r"Expected `max_ratio` to be a finite positive number, but got inf\."):
        UpdateRatioMonitor(max_ratio=float("inf"))
    with pytest.raises(ValueError, match=r"Expected `frozen_movement` to be a finite positive number"):
        PredictionDynamicsLogger(frozen_movement=float("inf"))
    with pytest.raises(ValueError, match=r"Expected `noisy_above` to be a finite positive number"):
        FirstLayerVisualizer(noisy_above=float("nan"))


def test_iterable_dataset_run_is_bit_identical_with_all_checks():
    def run(callbacks):
        L.seed_everything(3, verbose=False)
        model = MLPClassifier()
        trainer(max_steps=5, callbacks=callbacks).fit(model, DataLoader(Stream(), batch_size=32))
        return model.state_dict()

    plain, checked = run([]), run([c() for c in CHECKS])
    assert all(torch.equal(plain[k], checked[k]) for k in plain)


class WholeBatchForward(MLPClassifier):
    """`forward(self, batch)` takes the whole batch, as many LightningModules do."""

    def forward(self, batch):
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        return self.net(x)

    def training_step(self, batch, batch_idx):
        y = batch["y"] if isinstance(batch, dict) else batch[1]
        return F.cross_entropy(self(batch), y)


class DictOf(torch.utils.data.Dataset):
    def __init__(self):
        self.base = cluster_data()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"x": x, "y": y}


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuple", "dict"])
def test_forward_that_takes_the_whole_batch_works_unchanged(check_cls, dict_batches):
    check = check_cls()
    data = loader(DictOf()) if dict_batches else loader(cluster_data())
    _fit(WholeBatchForward(), data, check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()


@pytest.mark.parametrize("check_cls", CHECKS, ids=ids)
def test_forward_that_fails_on_every_guess_is_skipped_naming_the_arguments(check_cls):
    class TwoArguments(MLPClassifier):
        def forward(self, x, mask):
            return self.net(x * mask)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x, torch.ones_like(x)), y)

    check = check_cls()
    t = _fit(TwoArguments(), loader(cluster_data()), check)
    assert check.result.status is CheckStatus.SKIPPED
    assert "`module(x)` with x = a tensor of shape (32, 8)" in check.result.summary
    assert "Pass `inputs=lambda batch: ...`" in check.result.summary
    assert t.global_step == 2


class SkipsFirstBatch(MLPClassifier):
    """Returns None on the first batch of each epoch (a warm-up batch it skips), a loss on the others."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 0 else loss


class SkipsBatchesWithoutClassZero(MLPClassifier):
    """Returns None on batches whose first label is not 0: which ones is read from the data, not the index."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss if int(batch[1][0]) == 0 else None


@pytest.mark.parametrize("check_cls", [InitLossCheck, OverfitOneBatch], ids=["InitLossCheck", "OverfitOneBatch"])
@pytest.mark.parametrize("model_cls", [SkipsFirstBatch, SkipsBatchesWithoutClassZero])
def test_batches_on_which_training_step_returns_none_are_passed_over(check_cls, model_cls):
    torch.manual_seed(0)
    check = check_cls()
    _fit(model_cls(), loader(cluster_data(n=512), batch_size=16), check)
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    if check_cls is InitLossCheck:  # up to 4 batches with a loss among the first 4 + 8 of the pass
        assert 2 <= check.result.details["batches"] <= 4
