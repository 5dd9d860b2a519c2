"""PredictionDynamicsLogger: the diagnostics on tensors with known answers, then the callback in real
``Trainer.fit`` runs (fixed batch, mode and RNG restored, TensorBoard read back, alerts, DDP)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import TensorDataset

from lightning_recipe import PredictionDynamicsLogger, RecipeWarning
from lightning_recipe.diagnostics import dynamics_verdict as dv
from lightning_recipe.diagnostics import prediction_dynamics as pd
from tests.ddp import run_ddp
from tests.models import cluster_data, loader, trainer
from tests.tensorboard import read_events
from tests.zoo import (
    MLP,
    BatchNormCNN,
    MultilabelMLP,
    RegressionWithMeanBias,
    ZooModule,
    multilabel,
    regression,
    shapes,
)

TAG = "recipe/prediction_dynamics_logger/"

# -- models (module level: DDP imports them) --------------------------------------------------------


class Validated:
    """Mixin: a ``validation_step``, without which Lightning skips the validation loader altogether."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(self(x), y))  # type: ignore[attr-defined]


class ValidatedMLP(Validated, MLP):
    pass


class ValidatedBatchNormCNN(Validated, BatchNormCNN):
    pass


class ThrashingMLP(MLP):
    """Adam at 0.3 on overlapping clusters: predictions jump between evaluations and the loss never settles."""

    lr = 0.3


def overlapping_clusters() -> Any:
    return loader(cluster_data(spread=1.0))


class BinaryMLP(ZooModule):
    """One logit per example, ``(N, 1)`` float 0/1 targets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)


def binary_loader() -> Any:
    x, y = cluster_data(classes=2).tensors
    return loader(TensorDataset(x, y[:, None].float()))


class FrozenNormMLP(MLP):
    """A BatchNorm the user keeps in eval mode (frozen statistics) inside a model that trains: the logger's
    eval pass must put back exactly this mix of modes."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.norm.eval()
        self.drop = nn.Dropout(0.3)
        self.modes_seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.net(self.norm(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.modes_seen.append((self.norm.training, self.drop.training, self.training))
        return super().training_step(batch, batch_idx)


class NanWhenEval(MLP):
    """Finite while training, NaN in eval mode after step 10: a stand-in for a diverged model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * math.nan if not self.training and self.global_step >= 10 else out


class BrokenInEval(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.global_step > 0:
            raise RuntimeError("boom")
        return super().forward(x)


# -- diagnostics ----------------------------------------------------------------------------------


def test_churn_counts_the_labels_that_changed():
    targets = torch.tensor([0, 1, 2, 0])
    before = pd.snapshot(torch.eye(3)[[0, 1, 2, 0]] * 4, targets, step=0)
    after = pd.snapshot(torch.eye(3)[[0, 1, 1, 2]] * 4, targets, step=10)
    assert pd.churn(before, after) == 0.5
    assert pd.churn(before, before) == 0.0
    assert before.accuracy == 1.0 and after.accuracy == 0.5


def test_jitter_is_mean_change_of_true_class_probability():
    targets = torch.tensor([0, 1])
    before = pd.snapshot(torch.zeros(2, 2), targets, step=0)  # p(true) = 0.5, 0.5
    logit = math.log(3.0)  # p = 0.75 for the larger of two
    after = pd.snapshot(torch.tensor([[logit, 0.0], [logit, 0.0]]), targets, step=1)  # p(true) = 0.75, 0.25
    assert pd.jitter(before, after) == pytest.approx(0.25)
    assert after.scores.flatten().tolist() == pytest.approx([0.75, 0.25])
    assert after.loss == pytest.approx(F.cross_entropy(after.outputs, targets).item())


def test_binary_and_multilabel_read_per_label_probabilities():
    binary = pd.snapshot(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [0.0]]), step=0)
    assert binary.task == "binary"
    assert binary.scores.flatten().tolist() == pytest.approx([0.5, 1 - torch.sigmoid(torch.tensor(2.0)).item()])
    assert binary.accuracy == 0.0
    multi = pd.snapshot(torch.tensor([[3.0, -3.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0]]), step=0)
    assert multi.task == "multilabel" and multi.accuracy == pytest.approx(1 / 3)
    assert multi.per_example().shape == (1,)


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_equals_torchmetrics_micro_accuracy(seed: int):
    """The reference implementation: torchmetrics, for each classification task (with ties and exact 0.5)."""
    import torchmetrics.functional as tmf

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, 5, generator=g).round()  # rounding makes argmax ties
    labels = torch.randint(0, 5, (40,), generator=g)
    multiclass = pd.snapshot(logits, labels, step=0)
    reference = tmf.accuracy(logits.softmax(-1), labels, task="multiclass", num_classes=5, average="micro")
    assert multiclass.task == "multiclass" and multiclass.accuracy == pytest.approx(float(reference))

    binary_logits = torch.randn(40, 1, generator=g).round()  # logit 0 is p = 0.5 exactly
    binary_targets = torch.randint(0, 2, (40, 1), generator=g).float()
    binary = pd.snapshot(binary_logits, binary_targets, step=0)
    reference = tmf.accuracy(torch.sigmoid(binary_logits).flatten(), binary_targets.flatten().long(), task="binary")
    assert binary.task == "binary" and binary.accuracy == pytest.approx(float(reference))

    multi_logits = torch.randn(40, 4, generator=g).round()
    multi_targets = torch.randint(0, 2, (40, 4), generator=g).float()
    multilabel = pd.snapshot(multi_logits, multi_targets, step=0)
    reference = tmf.accuracy(
        torch.sigmoid(multi_logits), multi_targets.long(), task="multilabel", num_labels=4, average="micro"
    )
    assert multilabel.task == "multilabel" and multilabel.accuracy == pytest.approx(float(reference))


def _layouts() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    labels[0, :2] = -100  # ignored positions
    probabilities = torch.rand(4, 3, generator=g).softmax(-1)
    return {
        "multiclass": (torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)),
        "per position (N, T, C)": (torch.randn(4, 6, 5, generator=g), labels),
        "segmentation (N, C, H, W)": (
            torch.randn(2, 3, 4, 4, generator=g),
            torch.randint(0, 3, (2, 4, 4), generator=g),
        ),
        "flattened (N*T, V) vs (N, T)": (torch.randn(24, 5, generator=g), labels),
        "class probabilities": (torch.randn(4, 3, generator=g), probabilities),
        "binary": (torch.randn(8, 1, generator=g), torch.randint(0, 2, (8, 1), generator=g).float()),
        "multilabel": (torch.randn(8, 4, generator=g), torch.randint(0, 2, (8, 4), generator=g).float()),
        "regression": (torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_a_reading_resolved_once_reads_later_outputs_as_task_views_does(layout: str):
    """The fixed batch's reading is resolved from the first outputs: later outputs of the same shape (other
    values, some not finite) must give the very snapshot a fresh inference gives."""
    first, targets = _layouts()[layout]
    reading = pd.OutputReading.resolve(first, targets)
    assert reading is not None and reading.shape == tuple(first.shape)
    later = torch.randn(first.shape, generator=torch.Generator().manual_seed(1)) * 3
    later.view(-1)[1] = math.nan
    for outputs in (first, later):
        fresh = pd.snapshot(outputs, targets, step=5)
        fast = pd.snapshot(outputs, targets, step=5, reading=reading)
        assert (fast.task, fast.finite, fast.examples) == (fresh.task, fresh.finite, fresh.examples)
        assert torch.equal(fast.outputs, fresh.outputs) and torch.equal(fast.targets, fresh.targets)
        assert torch.equal(fast.scores, fresh.scores)
        assert (fast.labels is None) == (fresh.labels is None)
        assert fast.labels is None or torch.equal(fast.labels, fresh.labels)
        assert fast.loss == fresh.loss and fast.accuracy == fresh.accuracy


def test_a_reading_for_another_shape_is_not_used():
    reading = pd.OutputReading.resolve(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    assert reading is not None
    snap = pd.snapshot(torch.zeros(4, 1), torch.tensor([[0.0], [1.0], [1.0], [0.0]]), step=0, reading=reading)
    assert snap.task == "binary"  # inferred afresh: the multiclass reading was for (4, 3) outputs


def test_regression_jitter_is_relative_to_the_target_spread():
    targets = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    before = pd.snapshot(targets.clone(), targets, step=0)
    after = pd.snapshot(targets + 1.0, targets, step=1)
    assert before.task == "regression" and before.accuracy is None and before.labels is None
    assert pd.churn(before, after) is None
    assert pd.jitter(before, after) == pytest.approx(1.0 / targets.std().item())
    assert after.loss == pytest.approx(1.0)


def test_probability_outputs_are_not_softmaxed_twice():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    snap = pd.snapshot(probs, torch.tensor([0, 1]), step=0)
    assert snap.scores.flatten().tolist() == pytest.approx([0.9, 0.8])


def test_movement_is_zero_when_nothing_moves_and_ignores_a_softmax_shift():
    targets = torch.tensor([0, 1, 2])
    a = pd.snapshot(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)), targets, step=0)
    shifted = pd.snapshot(a.outputs + 5.0, targets, step=1)
    assert pd.movement(a, a) == 0.0
    assert pd.movement(a, shifted) == pytest.approx(0.0, abs=1e-6)
    assert pd.movement(a, pd.snapshot(a.outputs * 2, targets, step=2)) > 0.3


def test_non_finite_outputs_are_flagged_not_raised():
    snap = pd.snapshot(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]), step=3)
    assert not snap.finite and snap.loss == math.inf
    assert not pd.snapshot(torch.tensor([[math.inf, -math.inf]]), torch.tensor([0]), step=3).finite
    huge = pd.snapshot(torch.full((2, 2), 3e38), torch.tensor([0, 1]), step=3)  # finite, but the sum overflows
    assert huge.finite and math.isfinite(huge.loss)


def _history(jitters: list[float], losses: list[float], every: int = 20) -> list[dv.Evaluation]:
    return [
        dv.Evaluation(i * every, loss, None, None, j) for i, (j, loss) in enumerate(zip(jitters, losses, strict=True))
    ]


JUDGE = dict(window=5, warmup_steps=50, thrash_jitter=0.05, frozen_movement=5e-3)


def test_thrashing_needs_high_jitter_a_stalled_loss_and_warm_up():
    flat = [1.0, 0.9, 0.95, 0.9, 1.0, 0.92, 0.97]
    jumpy = [math.nan] + [0.2] * 6
    assert dv.judge(_history(jumpy, flat), 0.5, **JUDGE).kind == "thrashing"
    falling = [1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1]
    assert dv.judge(_history(jumpy, falling), 0.5, **JUDGE).kind is None  # early training: moves and learns
    calm = [math.nan] + [0.01] * 6
    assert dv.judge(_history(calm, flat), 0.5, **JUDGE).kind is None
    assert dv.judge(_history(jumpy, flat, every=5), 0.5, **JUDGE).kind is None  # still in warm-up
    assert dv.judge(_history(jumpy[:5], flat[:5]), 0.5, **JUDGE).kind is None  # window not full


def test_frozen_needs_no_movement_and_no_progress():
    flat = [1.0] * 7
    still = [math.nan] + [0.0] * 6
    verdict = dv.judge(_history(still, flat), 1e-5, **JUDGE)
    assert verdict.kind == "frozen" and verdict.evidence["window_movement"] == 1e-5
    assert dv.judge(_history(still, flat), 0.05, **JUDGE).kind is None
    learnt_then_settled = [1.0, 0.5, 0.1, 0.05, 0.05, 0.05, 0.05]  # e.g. a cosine schedule reaching zero
    assert dv.judge(_history(still, learnt_then_settled), 1e-5, **JUDGE).kind is None


def test_movement_is_computed_only_when_the_frozen_verdict_needs_it():
    calls = []

    def moved() -> float:
        calls.append(1)
        return 1e-5

    still = [math.nan] + [0.0] * 6
    assert dv.judge(_history(still, [1.0] * 7), moved, **JUDGE).kind == "frozen" and calls == [1]
    learnt = [1.0, 0.5, 0.1, 0.05, 0.05, 0.05, 0.05]
    verdict = dv.judge(_history(still, learnt), moved, **JUDGE)
    assert verdict.kind is None and calls == [1] and verdict.evidence["window_movement"] is None


def test_a_trimmed_history_with_the_run_extremes_judges_like_the_whole_history():
    losses = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # learnt early, then settled
    still = [math.nan] + [0.0] * 9
    whole = _history(still, losses)
    for history, movement in ((whole, 1e-5), (whole, 0.5), (_history([math.nan] + [0.2] * 9, [3.0] * 10), 0.5)):
        trimmed = history[-2 * JUDGE["window"] - 1 :]  # the window and as many before it (the trend)
        first, best = history[0].loss, min(e.loss for e in history)
        assert dv.judge(history, movement, **JUDGE) == dv.judge(
            trimmed, movement, first_loss=first, best_loss=best, **JUDGE
        )
    assert dv.judge(whole, 1e-5, **JUDGE).kind is None  # it learnt: settled, not frozen
    assert dv.judge(whole[-6:], 1e-5, **JUDGE).kind == "frozen"  # the window alone cannot tell


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` to be an integer >= 1, but got 0"),
        ({"num_examples": 0}, r"`num_examples` to be an integer >= 1"),
        ({"source": "test"}, r"`source` to be one of \['val', 'train'\], but got 'test'"),
        ({"thrash_jitter": 2.0}, r"`thrash_jitter` to be a number in the \(0, 1\) range"),
        ({"frozen_movement": -1}, r"`frozen_movement` to be a finite positive number"),
        ({"window": 1}, r"`window` to be an integer >= 2"),
        ({"task": "ranking"}, r"`task` to be one of \['auto', 'multiclass'"),
    ],
)
def test_bad_arguments_are_refused_with_the_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictionDynamicsLogger(**kwargs)


# -- through a real Trainer -----------------------------------------------------------------------


def _tb_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return trainer(logger=TensorBoardLogger(str(tmp_path), name="tb"), log_every_n_steps=1, **kwargs)


def _events(t: L.Trainer) -> Any:
    t.logger.experiment.flush()
    acc = read_events(t.logger.log_dir)
    return acc


def test_fixed_batch_comes_from_the_validation_loader():
    train = cluster_data()
    val_x = torch.full((40, 8), 7.0) + torch.arange(40.0)[:, None]
    val = TensorDataset(val_x, torch.arange(40) % 4)
    monitor = PredictionDynamicsLogger(every_n_steps=5, num_examples=24)
    t = trainer(max_steps=10, callbacks=[monitor])
    t.fit(ValidatedMLP(), loader(train), loader(val, batch_size=16, shuffle=False))
    assert monitor.batch_source == "val"
    x, y = monitor.batch
    assert torch.equal(x, val_x[:24]) and torch.equal(y, (torch.arange(40) % 4)[:24])  # two batches joined, cut
    assert [e.step for e in monitor.history] == [0, 5, 10]


def test_falls_back_to_the_first_training_batch_and_says_so(tmp_path):
    data = cluster_data()
    monitor = PredictionDynamicsLogger(every_n_steps=5, num_examples=8)
    t = _tb_trainer(tmp_path, max_steps=5, callbacks=[monitor])
    t.fit(MLP(), loader(data, shuffle=False))
    assert monitor.batch_source == "train"
    assert torch.equal(monitor.batch[0], data.tensors[0][:8])
    text = _events(t).Tensors(TAG + "batch/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "training batch" in text and "no validation loader" in text


def test_train_eval_mode_of_every_submodule_is_restored():
    model = FrozenNormMLP()
    trainer(max_steps=30, callbacks=[PredictionDynamicsLogger(every_n_steps=1)]).fit(model, loader(cluster_data()))
    assert len(model.modes_seen) == 30
    assert set(model.modes_seen) == {(False, True, True)}


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_the_fixed_batch_is_converted_to_the_parameters_precision(precision):
    """With bf16/fp64 parameters, Lightning converts each batch before `training_step`; the fixed batch too,
    or the model refuses it and the logger switches itself off."""
    monitor = PredictionDynamicsLogger(every_n_steps=5)
    trainer(max_steps=10, precision=precision, callbacks=[monitor]).fit(MLP(), loader(cluster_data()))
    assert monitor.enabled
    assert [e.step for e in monitor.history] == [0, 5, 10]
    assert all(math.isfinite(e.loss) for e in monitor.history)


def test_one_evaluation_per_optimizer_step_with_gradient_accumulation():
    monitor = PredictionDynamicsLogger(every_n_steps=2)
    trainer(max_steps=6, accumulate_grad_batches=3, callbacks=[monitor]).fit(MLP(), loader(cluster_data()))
    assert [e.step for e in monitor.history] == [0, 2, 4, 6]


def test_scalars_and_trajectory_figures_in_tensorboard(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = PredictionDynamicsLogger(every_n_steps=10, figure_every_n_steps=20)
    t = _tb_trainer(tmp_path, max_steps=40, callbacks=[monitor])
    t.fit(ValidatedMLP(), loader(cluster_data()), loader(cluster_data(n=64), shuffle=False))
    acc = _events(t)
    steps = {q: [e.step for e in acc.Scalars(TAG + q)] for q in ("loss", "accuracy", "churn", "jitter")}
    assert steps == {
        "loss": [0, 10, 20, 30, 40],
        "accuracy": [0, 10, 20, 30, 40],
        "churn": [10, 20, 30, 40],
        "jitter": [10, 20, 30, 40],
    }
    losses = [e.value for e in acc.Scalars(TAG + "loss")]
    assert losses[-1] < losses[0]
    assert [e.value for e in acc.Scalars(TAG + "loss")] == pytest.approx([h.loss for h in monitor.history])
    assert all(0 <= e.value <= 1 for q in ("accuracy", "churn", "jitter") for e in acc.Scalars(TAG + q))
    images = acc.Images(TAG + "trajectories")
    assert [i.step for i in images] == [20, 40]  # at multiples of 20, and at the end
    assert images[-1].width > 100 and images[-1].height > 100
    assert monitor.alerts == []


def test_regression_logs_loss_and_jitter_and_draws_prediction_vs_target(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = PredictionDynamicsLogger(every_n_steps=10)
    t = _tb_trainer(tmp_path, max_steps=30, callbacks=[monitor])
    t.fit(RegressionWithMeanBias(), regression())
    acc = _events(t)
    tags = acc.Tags()
    assert {TAG + "loss", TAG + "jitter"} <= set(tags["scalars"])
    assert TAG + "accuracy" not in tags["scalars"] and TAG + "churn" not in tags["scalars"]
    assert [i.step for i in acc.Images(TAG + "trajectories")] == [30]
    x, y = monitor.batch
    with torch.no_grad():
        expected = F.mse_loss(t.lightning_module(x), y).item()
    assert monitor.history[-1].loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("model", "data"), [(BinaryMLP, binary_loader), (MultilabelMLP, multilabel)], ids=["binary", "multilabel"]
)
def test_binary_and_multilabel_log_accuracy_and_figures(tmp_path, model, data):
    L.seed_everything(0, verbose=False)
    monitor = PredictionDynamicsLogger(every_n_steps=10)
    t = _tb_trainer(tmp_path, max_steps=30, callbacks=[monitor])
    t.fit(model(), data())
    acc = _events(t)
    accuracy = [e.value for e in acc.Scalars(TAG + "accuracy")]
    assert len(accuracy) == 4 and all(0 <= a <= 1 for a in accuracy)
    assert len(acc.Scalars(TAG + "churn")) == 3
    assert len(acc.Images(TAG + "trajectories")) == 1
    assert monitor.alerts == []


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
def test_lr_far_too_high_is_alerted_as_thrashing():
    L.seed_everything(3, verbose=False)  # over seeds 0-9 all alerted between steps 100 and 200
    monitor = PredictionDynamicsLogger()
    trainer(max_steps=250, callbacks=[monitor]).fit(ThrashingMLP(), overlapping_clusters())
    assert monitor.enabled
    alert = next(a for a in monitor.alerts if a.kind == "thrashing")
    assert alert.step <= 200
    assert "lower the learning rate ~10x" in alert.message
    assert alert.details["mean_jitter"] >= 0.05


def test_healthy_lr_on_the_same_data_raises_no_alert():
    L.seed_everything(0, verbose=False)
    monitor = PredictionDynamicsLogger()
    trainer(max_steps=300, callbacks=[monitor]).fit(MLP(), overlapping_clusters())
    assert monitor.alerts == []


def test_lr_1e7_is_alerted_as_frozen_with_the_fix():
    class TinyLR(MLP):
        lr = 1e-7

    L.seed_everything(0, verbose=False)
    monitor = PredictionDynamicsLogger()
    with pytest.warns(RecipeWarning, match="alert `frozen`"):
        trainer(max_steps=200, callbacks=[monitor]).fit(TinyLR(), loader(cluster_data()))
    (alert,) = monitor.alerts
    assert alert.kind == "frozen" and alert.step <= 200
    assert "raise the learning rate" in alert.message and "configure_optimizers" in alert.message


def test_non_finite_predictions_are_alerted():
    monitor = PredictionDynamicsLogger(every_n_steps=5)
    with pytest.warns(RecipeWarning, match="alert `non_finite`"):
        trainer(max_steps=20, callbacks=[monitor]).fit(NanWhenEval(), loader(cluster_data()))
    assert [a.kind for a in monitor.alerts] == ["non_finite"] and monitor.alerts[0].step == 10
    assert monitor.enabled


def test_an_internal_error_switches_the_logger_off_and_training_goes_on():
    monitor = PredictionDynamicsLogger(every_n_steps=2)
    t = trainer(max_steps=10, callbacks=[monitor])
    with pytest.warns(RecipeWarning, match="switched itself off"):
        t.fit(BrokenInEval(), loader(cluster_data()))
    assert t.global_step == 10 and not monitor.enabled


def _seeded_run(with_logger: bool) -> dict[str, torch.Tensor]:
    L.seed_everything(0, workers=True, verbose=False)
    model = ValidatedBatchNormCNN()
    callbacks = [PredictionDynamicsLogger(every_n_steps=3)] if with_logger else []
    val = shapes()  # shuffled: reading it draws from the RNG the logger must put back
    trainer(max_steps=25, deterministic=True, val_check_interval=4, callbacks=callbacks).fit(model, shapes(), val)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_seeded_run_ends_bit_identical_with_and_without_the_logger():
    without, with_logger = _seeded_run(False), _seeded_run(True)
    assert without.keys() == with_logger.keys()
    assert all(torch.equal(without[k], with_logger[k]) for k in without)


def test_ddp_both_ranks_evaluate_and_only_rank_zero_writes(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path,
        model="tests.models:MLPClassifier",
        data="tests.models:cluster_loader",
        check="PredictionDynamicsLogger",
        check_kwargs={"every_n_steps": 2, "figure_every_n_steps": 2},
        max_steps=6,
        tensorboard=True,
    )
    assert code == 0, output[-3000:]
    assert sorted(ranks) == [0, 1]
    for seen in ranks.values():
        assert seen["error"] is None, seen.get("message")
        assert seen["enabled"] == [True] and seen["global_step"] == 6
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = read_events(str(events[0].parent))
    assert [e.step for e in acc.Scalars(TAG + "loss")] == [0, 2, 4, 6]
    assert len(acc.Images(TAG + "trajectories")) >= 3


# -- a statistical thrashing verdict: noise at this batch size is not thrashing (issue 10) ------------------------


def test_label_flips_are_beyond_chance_from_the_binomial_upper_tail():
    # 12 labels x 4 evaluations under a 5% flip rate: P[X >= 7] = 0.0036, P[X >= 6] = 0.013 (alpha 0.01)
    assert dv.flips_beyond_chance(7, 48) and not dv.flips_beyond_chance(6, 48)
    assert dv.flips_beyond_chance(4, 12) and not dv.flips_beyond_chance(3, 12)  # one evaluation: P[X >= 4] = 0.002
    assert not dv.flips_beyond_chance(0, 48) and not dv.flips_beyond_chance(3, 0)
    assert dv.flips_beyond_chance(60, 768) and not dv.flips_beyond_chance(45, 768)  # 12 x 16 positions x 4: mean 38


def _flipping(churns: list[float | None], jitters: list[float], losses: list[float]) -> list[dv.Evaluation]:
    return [
        dv.Evaluation(i * 25, loss, None, c, j, labels=12)
        for i, (c, j, loss) in enumerate(zip(churns, jitters, losses, strict=True))
    ]


def test_one_loss_spike_of_a_converged_model_is_not_thrashing():
    # the tiny BERT at lr 1e-3 (seed 3): converged, then one Adam spike flips 3 of 12 labels and back
    churns = [None, 1.0, 0.75, 0, 0, 0, 0, 0, 0, 0, 0, 0.25, 0.25]
    jitters = [math.nan, 0.1, 0.5, 0.006, 0.004, 0.006, 0.002, 0.001, 0.001, 0.0, 0.0, 0.227, 0.229]
    losses = [0.69, 0.74, 0.013, 0.01, 0.01, 0.004, 0.002, 0.002, 0.001, 0.001, 0.001, 0.949, 0.005]
    for end in range(6, len(losses) + 1):
        verdict = dv.judge(_flipping(churns[:end], jitters[:end], losses[:end]), 0.5, **THRASH_JUDGE)
        assert verdict.kind is None, (end, verdict.evidence)


def test_labels_flipping_again_and_again_on_a_stalled_loss_are_thrashing():
    # the MLP at Adam 0.3 (seed 9): p(true class) barely moves, but 7 of 12 labels flip every other evaluation
    churns = [None, 0.67, 0.58, 0.0, 0.0, 0.0, 1 / 12, 7 / 12]
    jitters = [math.nan, 0.38, 0.2, 0.011, 0.025, 0.02, 0.076, 0.029]
    losses = [1.36, 0.96, 0.73, 0.76, 0.63, 0.72, 0.71, 0.74]
    verdict = dv.judge(_flipping(churns, jitters, losses), 0.5, **THRASH_JUDGE)
    assert verdict.kind == "thrashing" and verdict.evidence["flips"] == 8 and verdict.evidence["flip_trials"] == 48
    # the same flips on a falling loss are learning
    falling = [1.36, 0.96, 0.73, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert dv.judge(_flipping(churns, jitters, falling), 0.5, **THRASH_JUDGE).kind is None


THRASH_JUDGE = dict(window=4, warmup_steps=50, thrash_jitter=0.05, frozen_movement=5e-3)


class NoForward(L.LightningModule):
    """A LightningModule without `forward` whose `training_step` chains two modules of its own: no one model to
    call in its place."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 4)
        self.head = nn.Linear(4, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.net(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NeedsMask(NoForward):
    """`forward(x, attention_mask)`: the default call `module(x)` cannot work."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x * attention_mask))


class WrapsOneModel(L.LightningModule):
    """No `forward`, one model: `self.model(x)` in `training_step`, as Hugging Face users write it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_forward_that_wraps_one_model_is_read_through_it():
    monitor = PredictionDynamicsLogger(every_n_steps=2)
    trainer(max_steps=6, callbacks=[monitor]).fit(WrapsOneModel(), loader(cluster_data()))
    assert monitor.enabled and len(monitor.history) == 4  # steps 0, 2, 4, and the end of training at 6


@pytest.mark.parametrize("model", [NoForward, NeedsMask], ids=["no_forward", "forward_needs_attention_mask"])
def test_a_batch_it_cannot_read_gets_one_warning_naming_the_adapter_not_please_report(model):
    monitor = PredictionDynamicsLogger(every_n_steps=2)
    t = trainer(max_steps=6, callbacks=[monitor])
    with pytest.warns(RecipeWarning) as record:
        t.fit(model(), loader(cluster_data()))
    texts = [str(w.message) for w in record if issubclass(w.category, RecipeWarning)]
    assert len(texts) == 1, texts
    assert "`inputs=" in texts[0] and "`forward=" in texts[0] and "switched itself off" in texts[0]
    assert "report" not in texts[0].lower() and "Traceback" not in texts[0]
    assert t.global_step == 6 and not monitor.enabled and monitor.alerts == []


def test_a_tiny_bert_classifier_that_spikes_once_raises_no_thrashing_alert():
    pytest.importorskip("transformers")
    from tests.transformer_models import BertClassifier, marker_loaders

    L.seed_everything(1, verbose=False)  # alerted `thrashing` at step 250 before the verdict was statistical
    monitor = PredictionDynamicsLogger()
    train, val = marker_loaders(1)
    trainer(max_steps=300, callbacks=[monitor], limit_val_batches=0).fit(BertClassifier(lr=1e-3), train, val)
    assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]


def test_a_language_model_at_its_noise_floor_is_not_thrashing():
    # the tiny GPT-2 at AdamW 1e-3 (seed 0): p(true class) moves ~0.057 per evaluation and 8-12% of 192 near-tie
    # positions flip, but the loss stays within 2% (it sits at the entropy of its data)
    churns = [None, 0.87, 0.15, 0.08, 0.11, 0.03, 0.13, 0.09, 0.11, 0.12, 0.08]
    jitters = [math.nan, 0.118, 0.13, 0.073, 0.048, 0.034, 0.034, 0.037, 0.058, 0.058, 0.056]
    losses = [3.455, 2.256, 1.815, 1.629, 1.561, 1.522, 1.489, 1.474, 1.498, 1.493, 1.490]
    history = [
        dv.Evaluation(i * 25, loss, None, c, j, labels=192)
        for i, (c, j, loss) in enumerate(zip(churns, jitters, losses, strict=True))
    ]
    verdict = dv.judge(history, 0.5, **THRASH_JUDGE)
    assert verdict.kind is None and verdict.evidence["loss_jump"] < 0.02
    # the same jitter with a loss that jumps by 10-30% between evaluations is thrashing
    jumping = [*losses[:-4], 1.9, 1.4, 2.0, 1.5]
    history = [replace(e, loss=loss) for e, loss in zip(history, jumping, strict=True)]
    assert dv.judge(history, 0.5, **THRASH_JUDGE).kind == "thrashing"


def test_regression_has_no_flips_to_count_so_a_thrash_needs_most_of_the_window():
    losses = [3.0, 2.0, 1.5, 1.0, 3.0, 1.2, 2.8, 1.1]  # stalls and jumps between 1 and 3 from step 75 on
    spike = [math.nan, 0.5, 0.3, 0.01, 0.2, 0.2, 0.01, 0.01]  # two wobbling evaluations of the last four
    steady = [math.nan, 0.5, 0.3, 0.01, 0.2, 0.2, 0.2, 0.01]  # three
    assert dv.judge(_flipping([None] * 8, spike, losses), 0.5, **THRASH_JUDGE).kind is None
    assert dv.judge(_flipping([None] * 8, steady, losses), 0.5, **THRASH_JUDGE).kind == "thrashing"


def test_a_jumpy_run_whose_loss_falls_4x_from_one_window_to_the_next_is_learning():
    # SGD at 0.1 on the polynomial regression (seed 4): 14x jumps between evaluations, yet 980 -> 170 -> 20
    losses = [862.0, 1107.0, 2359.0, 557.0, 166.6, 207.9, 154.4, 34.3, 471.2]
    jitters = [math.nan, 1.1, 0.47, 0.52, 0.22, 0.06, 0.051, 0.136, 0.34]
    verdict = dv.judge(_flipping([None] * 9, jitters, losses), 0.5, **THRASH_JUDGE)
    assert verdict.kind is None and verdict.evidence["loss_median_before_window"] == pytest.approx(984.5)
    flat_before = [300.0] * 4 + losses[4:]  # the same window after a plateau: thrashing
    assert dv.judge(_flipping([None] * 9, jitters, flat_before), 0.5, **THRASH_JUDGE).kind == "thrashing"
