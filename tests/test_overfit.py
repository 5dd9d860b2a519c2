"""OverfitOneBatch: the diagnostic on plain modules where the answer is known, then the callback through a
real Trainer (side effects, verdicts, TensorBoard, arguments, DDP)."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import CheckStatus, OverfitOneBatch, RecipeCheckError, RecipeWarning
from lightning_recipe.callbacks._overfit_text import TEXT, wording
from lightning_recipe.diagnostics.dependence import output_dependence
from lightning_recipe.diagnostics.labels import decode_predictions, looks_like_probabilities
from lightning_recipe.diagnostics.overfit import Attempt, OverfitEvidence, overfit_batch
from lightning_recipe.diagnostics.overfit_cause import Cause, OutputFacts, diagnose
from lightning_recipe.diagnostics.state import TrainingState
from tests.ddp import run_ddp
from tests.models import MLPClassifier, cluster_data, loader, trainer
from tests.tensorboard import read_events

# -- the diagnostic on plain modules ---------------------------------------------------------------


def _points(n=4, in_dim=3, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_dim, generator=g), torch.arange(n) % classes


def _run(model, loss_fn, predict=None, targets=None, **kwargs):
    state = TrainingState.capture(model)
    labels = None if predict is None else (lambda: decode_predictions(predict(), targets))
    return overfit_batch(model.named_parameters(), loss_fn, reset=state.restore, labels=labels, **kwargs)


def test_a_linear_model_overfits_four_points_quickly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = _points()
    ev = _run(model, lambda: F.cross_entropy(model(x), y), lambda: model(x), y)
    assert ev.passed
    fit = ev.decisive
    assert fit.reached and fit.stop == "fit" and fit is ev.attempts[-1]  # the search ends at the first fit
    assert fit.final_loss <= 0.1 * ev.start_loss
    assert fit.correct == fit.total == 4
    assert ev.total_steps < 300
    assert ev.no_grad_params == () and ev.frozen_params == ()


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.trunk(x).detach())


def test_detach_in_the_middle_reports_the_trunk_as_getting_no_gradient():
    torch.manual_seed(0)
    model = Detached()
    x, y = _points()
    ev = _run(model, lambda: F.cross_entropy(model(x), y), lambda: model(x), y)
    assert not ev.passed
    assert ev.no_grad_params == ("trunk.0.weight", "trunk.0.bias")
    assert len(ev.attempts) == 1  # no gradient fails at every lr: the others are not tried


def _sign_balanced_l1():
    """An L1 regression whose errors are two positive and two negative: the bias's gradient (the mean of the
    errors' signs) is exactly 0, the weight's is not."""
    model = nn.Linear(1, 1)
    x, y = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[100.0], [100.0], [-100.0], [-100.0]])
    return model, lambda: F.l1_loss(model(x), y)


def test_a_gradient_cancelled_by_balanced_signs_is_told_from_a_missing_one():
    torch.manual_seed(0)
    model, loss_fn = _sign_balanced_l1()
    loss_fn().backward()
    assert model.bias.grad.item() == 0.0 and model.weight.grad.item() != 0.0  # the premise
    model.zero_grad(set_to_none=True)
    assert _run(model, loss_fn).no_grad_params == ("bias",)  # the loss gradient alone cannot tell
    ev = _run(model, loss_fn, depends=lambda params: output_dependence(model, loss_fn, params))
    assert ev.no_grad_params == ()


def test_output_dependence_is_false_behind_a_detach_and_behind_zero_weights():
    torch.manual_seed(0)
    model = Detached()
    x, y = _points()
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = [p for _, p in model.named_parameters()]
    assert output_dependence(model, loss_fn, params) == [False, False, True, True]
    zeroed = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    for p in zeroed.parameters():
        nn.init.zeros_(p)
    params = list(zeroed.parameters())
    assert output_dependence(zeroed, lambda: F.cross_entropy(zeroed(x), y), params) == [False, False, False, True]
    assert all(p.grad is None for p in params)  # it writes no .grad


def test_zero_initialised_layers_are_still_reported_with_output_dependence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    for p in model.parameters():
        nn.init.zeros_(p)
    x, y = _points()
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    ev = _run(model, loss_fn, lambda: model(x), y, depends=lambda params: output_dependence(model, loss_fn, params))
    assert not ev.passed
    assert ev.no_grad_params == ("0.weight", "0.bias", "2.weight")
    assert len(ev.attempts) == 1


def test_a_rate_that_runs_out_of_steps_on_course_gets_one_larger_attempt():
    """Adam moves the bias ~lr per step: at 0.03 it gets ~6 of the 20 it must travel in 200 steps, still descending
    when the steps run out, so 0.3 is tried, and fits."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    x = torch.randn(4, 1)
    y = x + 20.0
    ev = _run(model, lambda: F.mse_loss(model(x), y))
    assert ev.passed
    assert [a.lr for a in ev.attempts] == [3e-3, 3e-2, 3e-4, 0.3]
    assert [a.stop for a in ev.attempts] == ["max_steps", "max_steps", "plateau", "fit"]


def test_a_loss_that_refuses_diverged_weights_ends_the_attempt_as_a_divergence():
    """BCE raises on outputs outside [0, 1]: a learning rate too large for the model drives the outputs to NaN and
    the user's loss raises rather than returning NaN. That is this attempt diverging, not an error to propagate;
    the same error on the starting weights is the user's and propagates."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.tensor([[1.0], [0.0], [1.0], [0.0]])

    def loss_fn():
        out = model(x).exp().exp()  # overflows to inf, then the sigmoid of inf - inf is NaN
        return F.binary_cross_entropy(torch.sigmoid(out - out.detach() * 2 + 1), y)

    ev = _run(model, loss_fn, lrs=(1e3,))
    (attempt,) = ev.attempts
    assert attempt.stop == "nonfinite" and attempt.nonfinite_step > 0 and not ev.passed
    assert attempt.raised.startswith("RuntimeError: all elements of input should be between 0 and 1")
    with torch.no_grad():
        model.bias.fill_(100.0)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        overfit_batch(model.named_parameters(), loss_fn, reset=lambda: None)


def test_frozen_parameters_are_listed_apart_from_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    x, y = _points()
    ev = _run(model, lambda: F.cross_entropy(model(x), y), lambda: model(x), y)
    assert ev.frozen_params == ("0.weight", "0.bias")
    assert ev.no_grad_params == ()
    assert ev.trainable_params == ("2.weight", "2.bias")


def test_double_softmax_stops_at_a_floor_with_every_label_right():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = _points(classes=4)
    ev = _run(model, lambda: F.cross_entropy(model(x).softmax(-1), y), lambda: model(x).softmax(-1), y)
    assert not ev.passed
    best = ev.decisive
    assert best.all_match
    # softmax outputs are in [0, 1]: cross-entropy over them cannot go below log(1 + 3/e) = 0.74
    assert best.best_loss >= math.log(1 + 3 / math.e) - 1e-3
    # 0.03 ran out of steps still creeping towards the floor, so 10x is tried too, and plateaus there
    assert [(a.lr, a.stop) for a in ev.attempts][-2:] == [(3e-4, "plateau"), (0.3, "plateau")]
    assert looks_like_probabilities(model(x).softmax(-1), y)
    assert not looks_like_probabilities(model(x), y)


def test_clamped_output_cannot_reach_the_targets_and_has_zero_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = _points()[0]
    target = torch.full((4, 1), 5.0) + torch.randn(4, 1)
    ev = _run(model, lambda: F.mse_loss(model(x).clamp(-1, 1), target))
    assert not ev.passed
    best = ev.decisive
    assert best.lr == 3e-2 and best.stop == "plateau"  # stuck at the clamp: stopped early, not at 200 steps
    assert best.steps < 200
    assert best.best_loss > 0.5 * ev.start_loss
    assert best.final_grad_norm == 0.0


def test_nan_loss_is_reported_with_its_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = _points()
    calls = {"n": 0}

    def loss_fn():
        calls["n"] += 1
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if calls["n"] % 100 == 8 else loss

    ev = _run(model, loss_fn, lambda: model(x), y, lrs=(1e-4,), max_steps=50)
    assert not ev.passed
    assert ev.attempts[0].stop == "nonfinite"
    assert ev.attempts[0].nonfinite_step == 7


def test_loss_without_a_graph_is_reported():
    model = nn.Linear(3, 2)
    x, y = _points()
    ev = _run(model, lambda: F.cross_entropy(model(x).detach(), y))
    assert not ev.passed and not ev.loss_has_graph


@pytest.mark.parametrize(
    ("outputs", "targets", "task", "total"),
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), "multiclass", 4),
        (torch.randn(4, 5, 3), torch.randint(0, 3, (4, 5)), "multiclass", 20),
        (torch.randn(20, 7), torch.randint(0, 7, (4, 5)), "multiclass", 20),  # flattened (N*T, V)
        (torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)), "multiclass", 32),  # segmentation
        (torch.randn(4, 5), (torch.randn(4, 5) > 0).float(), "binary", 20),  # multilabel logits
        (torch.randn(4, 1), torch.tensor([0.0, 1.0, 1.0, 0.0]), "binary", 4),
        (torch.randn(4, 3), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float(), "multiclass", 4),
        (torch.randn(4, 3), torch.tensor([0, -100, 2, 0]), "multiclass", 3),  # ignore_index left out
    ],
)
def test_predictions_are_decoded_as_labels(outputs, targets, task, total):
    decoded = decode_predictions(outputs, targets)
    assert decoded is not None and decoded.task == task and decoded.total == total


def test_regression_targets_have_no_labels_and_probabilities_use_half_threshold():
    assert decode_predictions(torch.randn(4, 1), torch.randn(4, 1) * 3) is None
    probs = decode_predictions(torch.tensor([0.2, 0.7, 0.9]), torch.tensor([0.0, 1.0, 1.0]))
    assert probs.correct == 3


# -- the cause classifier on evidence built by hand ----------------------------------------------------


def _attempt(curve=(2.0, 1.0, 0.5), reached=False, stop="plateau", correct=None, total=None, grad=0.1, **kwargs):
    return Attempt(
        lr=kwargs.pop("lr", 3e-3),
        curve=tuple(curve),
        steps=len(curve) - 1,
        reached=reached,
        stop=stop,
        nonfinite_step=kwargs.pop("nonfinite_step", None),
        correct=correct,
        total=total,
        final_grad_norm=grad,
        **kwargs,
    )


def _evidence(*attempts, **kwargs):
    fields = dict(loss_fraction=0.1, no_grad_params=(), frozen_params=(), trainable_params=("w", "b"))
    return OverfitEvidence(attempts=attempts, **{**fields, **kwargs})


_PROBABILITIES = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
_LOGITS = torch.tensor([[2.0, -1.0, 0.1], [0.1, 3.0, -2.0], [0.3, -0.3, 0.4], [1.5, 0.25, -0.25]])
_LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("evidence", "facts", "cause"),
    [
        (_evidence(trainable_params=(), frozen_params=("w",), frozen_numel=3), None, Cause.ALL_FROZEN),
        (_evidence(_attempt(curve=(math.nan,))), None, Cause.NONFINITE_START),
        (_evidence(_attempt(curve=(0.0,))), None, Cause.NONPOSITIVE_START),
        (_evidence(_attempt(curve=(-1.0, -2.0))), None, Cause.NONPOSITIVE_START),
        (_evidence(_attempt(curve=(2.0,)), loss_has_graph=False), None, Cause.NO_GRAPH),
        (_evidence(_attempt(), no_grad_params=("w",)), None, Cause.NO_GRADIENT),
        (_evidence(_attempt(curve=(2.0, 0.1), reached=True, stop="fit")), None, Cause.FITTED),
        (_evidence(_attempt(curve=(2.0, math.nan), stop="nonfinite", nonfinite_step=1)), None, Cause.NONFINITE),
        (_evidence(_attempt(curve=(2.0, 0.1), correct=3, total=4)), None, Cause.LABELS_NOT_FITTED),
        (_evidence(_attempt(correct=4, total=4)), OutputFacts.read(_PROBABILITIES, _LABELS), Cause.DOUBLE_SOFTMAX),
        (
            _evidence(_attempt()),
            OutputFacts.read(torch.tensor([[0.9], [0.2]]), torch.tensor([[1.0], [0.0]])),
            Cause.DOUBLE_SIGMOID,
        ),
        (_evidence(_attempt(correct=4, total=4, grad=0.0)), OutputFacts.read(_LOGITS, _LABELS), Cause.CLAMPED_LOSS),
        (_evidence(_attempt(correct=4, total=4, grad=0.5)), None, Cause.LOSS_FLOOR),
        (_evidence(_attempt(correct=2, total=4), frozen_params=("f",)), None, Cause.FROZEN),
        (_evidence(_attempt(grad=1e-13)), None, Cause.SATURATED),
        (_evidence(_attempt(grad=None)), None, Cause.PLATEAU),
    ],
)
def test_each_cause_is_named_from_the_evidence(evidence, facts, cause):
    diagnosis = diagnose(evidence, facts)
    assert diagnosis.cause is cause
    assert diagnosis.start_loss == evidence.start_loss or math.isnan(evidence.start_loss)
    summary, hint = wording(diagnosis, evidence, facts or OutputFacts(), used=4)
    assert summary and "{" not in summary
    assert bool(hint) is (cause not in (Cause.FITTED, Cause.NONPOSITIVE_START))


def test_the_causes_of_a_failure_come_in_order_of_what_explains_most():
    """A loss that fell to its target with labels unpredicted is a label mismatch even when the outputs look
    like probabilities; double softmax comes before the all-labels-right floor; no gradient comes before a fit."""
    fell = _attempt(curve=(2.0, 0.1), correct=3, total=4, grad=0.0)
    facts = OutputFacts.read(_PROBABILITIES, _LABELS)
    assert facts.probabilities and not facts.binary_probabilities
    assert diagnose(_evidence(fell), facts).cause is Cause.LABELS_NOT_FITTED
    stuck = _attempt(correct=4, total=4, grad=0.0)
    assert diagnose(_evidence(stuck), facts).cause is Cause.DOUBLE_SOFTMAX
    fitted = _attempt(curve=(2.0, 0.1), reached=True, stop="fit")
    assert diagnose(_evidence(fitted, no_grad_params=("w",))).cause is Cause.NO_GRADIENT
    # the decisive attempt is the closest one: its zero gradient makes the failure a saturation
    closest, other = _attempt(curve=(2.0, 1.5), grad=0.0), _attempt(curve=(2.0, 1.9), grad=0.3, lr=3e-2)
    diagnosis = diagnose(_evidence(other, closest))
    assert diagnosis.cause is Cause.SATURATED and diagnosis.attempt is closest and diagnosis.flat_gradient


def test_outputs_that_cannot_reach_the_targets_are_told_from_ones_that_can():
    targets = torch.tensor([[5.0], [4.0], [6.0], [5.5]])
    clamped = OutputFacts.read(torch.tensor([[0.5], [0.9], [-0.2], [0.99]]), targets)
    assert clamped.output_range == pytest.approx((-0.2, 0.99)) and clamped.target_range == (4.0, 6.0)
    assert clamped.out_of_reach
    assert not OutputFacts.read(torch.tensor([[5.0], [-4.0], [6.0], [0.5]]), targets).out_of_reach
    assert not OutputFacts.read(torch.zeros(0, 1), torch.zeros(0, 1)).out_of_reach  # nothing to compare
    assert OutputFacts.read(None, targets) == OutputFacts()
    diagnosis = diagnose(_evidence(_attempt()), clamped)
    assert diagnosis.cause is Cause.PLATEAU and diagnosis.out_of_reach
    summary, _ = wording(diagnosis, _evidence(_attempt()), clamped, used=4)
    assert summary.endswith(
        "the loss plateaus above a floor. The outputs stay within [-0.2, 0.99] while the targets span [4, 6]: "
        "the output cannot reach them (clamp, ReLU, sigmoid or tanh on the output?)."
    )


def test_every_cause_has_one_row_of_words():
    assert set(TEXT) == set(Cause)


# -- models for the callback (module level: the DDP test imports them) ------------------------------


class BatchNormDropoutMLP(MLPClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


class DoubleSoftmax(MLPClassifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


class DetachedTrunk(MLPClassifier):
    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x)).detach())


class FrozenLayers(MLPClassifier):
    """Meant to freeze a backbone; froze every weight, so only the biases can learn."""

    def __init__(self):
        super().__init__()
        for name, p in self.named_parameters():
            if name.endswith("weight"):
                p.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TinyLearningRate(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-9)


class ManualOptimization(MLPClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def _fit(model, check=None, steps=5, tmp_path=None, **trainer_kwargs):
    callbacks = [] if check is None else [check]
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks, deterministic=True, **trainer_kwargs)
    t.fit(model, loader(cluster_data(), shuffle=True))
    return t


def _seeded_final_state(model_cls, check):
    L.seed_everything(0, workers=True)
    model = model_cls()
    t = _fit(model, check)
    return copy.deepcopy(model.state_dict()), copy.deepcopy(t.optimizers[0].state_dict())


@pytest.mark.parametrize("model_cls", [MLPClassifier, BatchNormDropoutMLP])
def test_healthy_model_passes_and_training_afterwards_is_bit_identical(model_cls):
    check = OverfitOneBatch()
    plain_model, plain_opt = _seeded_final_state(model_cls, None)
    checked_model, checked_opt = _seeded_final_state(model_cls, check)
    assert check.result.status is CheckStatus.PASSED, check.result.summary
    assert "Fitted 4 examples" in check.result.summary
    details = check.result.details
    assert details["final_loss"] <= 0.1 * details["start_loss"]
    assert details["accuracy"] == 1.0
    assert details["no_grad_params"] == [] and details["frozen_params"] == []
    assert 1 <= len(details["loss_curve"]) <= 50
    for key, value in plain_model.items():
        assert torch.equal(value, checked_model[key]), key
    for (_, a), (_, b) in zip(plain_opt["state"].items(), checked_opt["state"].items(), strict=True):
        for name in a:
            assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def test_the_users_optimizer_and_learning_rate_do_not_matter():
    torch.manual_seed(0)
    check = OverfitOneBatch()
    _fit(TinyLearningRate(), check, steps=1)
    assert check.result.status is CheckStatus.PASSED, check.result.summary


def test_double_softmax_fails_naming_the_floor_and_the_fix():
    torch.manual_seed(0)
    model = DoubleSoftmax()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeCheckError, match="floor") as info:
        _fit(model, OverfitOneBatch())
    result = info.value.result
    assert "softmax a second time" in result.summary
    assert "Remove the `.softmax()`" in result.hint
    assert result.details["accuracy"] == 1.0
    assert result.details["best_loss"] > 0.5 * result.details["start_loss"]
    # every Adam learning rate, then the run's own optimizer (the model's Adam at 1e-2): a floor fails at all
    assert result.details["lrs_tried"] == [3e-3, 3e-2, 3e-4, 1e-2]
    assert [a["optimizer"] for a in result.details["attempts"]] == ["Adam", "Adam", "Adam", "your Adam"]
    assert "and your Adam at lr 0.01" in result.summary
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_detached_trunk_fails_naming_the_parameters_without_gradient():
    torch.manual_seed(0)
    with pytest.raises(RecipeCheckError, match=r"never received a gradient: net\.0\.weight, net\.0\.bias") as info:
        _fit(DetachedTrunk(), OverfitOneBatch())
    assert ".detach()" in info.value.result.hint
    assert info.value.result.details["no_grad_params"] == ["net.0.weight", "net.0.bias"]


def test_frozen_weights_fail_and_are_named():
    torch.manual_seed(0)
    with pytest.raises(RecipeCheckError, match=r"frozen \(requires_grad=False\): net\.0\.weight") as info:
        _fit(FrozenLayers(), OverfitOneBatch())
    assert info.value.result.details["frozen_params"] == ["net.0.weight", "net.2.weight"]
    assert "requires_grad_(True)" in info.value.result.hint


def test_failure_with_warn_emits_a_recipe_warning_and_training_goes_on():
    torch.manual_seed(0)
    with pytest.warns(RecipeWarning, match="OverfitOneBatch: FAILED"):
        t = _fit(DoubleSoftmax(), OverfitOneBatch(on_fail="warn"), steps=3)
    assert t.global_step == 3


def test_manual_optimization_is_skipped_with_the_reason():
    torch.manual_seed(0)
    check = OverfitOneBatch()
    _fit(ManualOptimization(), check, steps=1)
    assert check.result.status is CheckStatus.SKIPPED
    assert "manual optimization" in check.result.summary


def test_loss_curve_and_figures_are_logged_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    check = OverfitOneBatch()
    t = _fit(MLPClassifier(), check, steps=1, tmp_path=tmp_path, logger=TensorBoardLogger(tmp_path))
    t.logger.experiment.flush()
    events = read_events(t.logger.log_dir)
    tags = events.Tags()
    assert {"recipe/overfit_one_batch/loss_curve", "recipe/overfit_one_batch/predictions"} <= set(tags["images"])
    losses = events.Scalars("recipe/overfit_one_batch/loss")
    assert [e.step for e in losses] == list(range(check.result.details["steps"] + 1))
    assert losses[0].value == pytest.approx(check.result.details["start_loss"], rel=1e-5)
    assert losses[-1].value == pytest.approx(check.result.details["final_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": 1}, r"Expected `num_examples` to be an integer >= 2, but got 1"),
        ({"max_steps": 0}, r"Expected `max_steps` to be an integer >= 1, but got 0"),
        ({"loss_fraction": 1.5}, r"Expected `loss_fraction` to be a number in the \(0, 1\) range"),
        ({"lr": -1.0}, r"Expected `lr` to be a finite positive number, but got -1.0"),
        ({"lrs": []}, r"Expected `lrs` to be a non-empty sequence of positive numbers"),
        ({"on_fail": "ignore"}, r"Expected `on_fail` to be one of \['raise', 'warn'\]"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OverfitOneBatch(**kwargs)


def test_lr_argument_tries_exactly_that_learning_rate():
    torch.manual_seed(0)
    check = OverfitOneBatch(lr=1e-2, on_fail="warn")
    _fit(MLPClassifier(), check, steps=1)
    assert check.result.details["lrs_tried"] == [1e-2]


def test_ddp_healthy_passes_on_both_ranks(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path, "tests.models:MLPClassifier", "tests.models:cluster_loader", "OverfitOneBatch"
    )
    assert code == 0, output
    assert sorted(ranks) == [0, 1]
    assert all(r["result"]["status"] == "passed" and r["error"] is None for r in ranks.values()), output


def test_ddp_double_softmax_fails_on_both_ranks_without_hanging(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path, "tests.test_overfit:DoubleSoftmax", "tests.models:cluster_loader", "OverfitOneBatch"
    )
    assert code != 0
    assert sorted(ranks) == [0, 1], output
    assert all(r["error"] == "RecipeCheckError" and r["global_step"] == 0 for r in ranks.values()), output
    assert ranks[0]["result"]["summary"] == ranks[1]["result"]["summary"]
    assert "softmax a second time" in ranks[0]["result"]["summary"]


def test_conflicting_labels_marks_identical_inputs_with_different_labels():
    from lightning_recipe.diagnostics.labels import conflicting_labels

    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]])
    assert conflicting_labels(x, torch.tensor([0, 1, 0, 0])).tolist() == [True, True, False, False]
    tokens = torch.tensor([[4, 5, 6], [4, 6, 8], [7, 5, 6]])
    next_tokens = torch.tensor([[5, 6, 7], [6, 8, 10], [5, 6, 7]])
    # position 0: examples 0 and 1 share the prefix [4] and want 5 vs 6; nothing else shares a prefix
    expected = [[True, False, False], [True, False, False], [False, False, False]]
    assert conflicting_labels(tokens, next_tokens).tolist() == expected
    assert conflicting_labels(torch.zeros(3, 2), torch.tensor([0, 1])) is None


class BosDataset(torch.utils.data.Dataset):
    """Counting sequences that all start with the same BOS token 0: position 0 cannot be predicted."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        stride = 1 + i % 3
        seq = torch.cat([torch.zeros(1, dtype=torch.long), (1 + i % 5 + stride * torch.arange(12)) % 15 + 1])
        return seq[:-1], seq[1:]


def test_language_model_with_a_shared_bos_token_passes():
    from tests.zoo import CausalLM

    L.seed_everything(0, verbose=False)
    check = OverfitOneBatch()
    trainer(max_steps=1, callbacks=[check]).fit(CausalLM(), DataLoader(BosDataset(), batch_size=16, shuffle=True))
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert "undecidable" in check.result.summary


def test_the_runs_own_optimizer_is_tried_when_no_adam_learning_rate_fits():
    """pytorch/examples' polynomial regression (5 parameters, smooth L1, SGD at 0.1) with targets far from 0: Adam
    moves the bias ~lr per step, too slowly at every default learning rate; the run's own SGD fits it."""
    from tests.real_models import PolynomialRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    features = torch.cat([x**i for i in range(1, 5)], 1)
    y = features @ (torch.randn(4, 1, generator=g) * 5) - 12.0
    check = OverfitOneBatch()
    trainer(max_steps=1, callbacks=[check]).fit(PolynomialRegression(), loader(TensorDataset(features, y)))
    result = check.result
    assert result.passed, result.format()
    assert result.details["attempts"][-1]["optimizer"] == "your SGD"
    assert "your SGD at lr 0.1" in result.summary


class PixelAutoencoder(L.LightningModule):
    """A sigmoid decoder trained with summed BCE against its own grey-level inputs; the labels in the batch are
    never read (pytorch/examples' VAE without the sampling). BCE against intensities in (0, 1) cannot fall below
    their entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16))

    def forward(self, x):
        return torch.sigmoid(self.net(x))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.binary_cross_entropy(self(x), x, reduction="sum")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_loss_against_the_inputs_is_fitted_to_its_floor_not_to_the_unused_labels():
    from lightning_recipe.diagnostics.loss_reading import Reading, loss_floor
    from lightning_recipe.diagnostics.task import TaskView

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 16, generator=g) * 0.8 + 0.1
    check = OverfitOneBatch()
    data = loader(TensorDataset(x, torch.arange(64) % 10), shuffle=False)
    trainer(max_steps=1, callbacks=[check]).fit(PixelAutoencoder(), data)
    result = check.result
    assert result.passed, result.format()
    assert result.details["loss_reading"] == "BCE on probabilities (summed) vs the inputs"
    assert result.details["accuracy"] is None  # the labels are not what the loss reads
    first = x[:4]
    expected = float(-(first * first.log() + (1 - first) * (1 - first).log()).sum())
    assert result.details["loss_floor"] == pytest.approx(expected, rel=1e-4)
    assert "the entropy of the soft targets" in result.summary
    # the floor of hard labels and regression is 0
    view = TaskView("regression", "mse", torch.zeros(4, 2), torch.ones(4, 2), "")
    assert loss_floor(Reading("mse", "mean", view, 1.0, 1.0)) == 0.0
