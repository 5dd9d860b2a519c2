"""InitLossCheck: the references on tensors with known answers, then the check through a real Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import CheckStatus, InitLossCheck, RecipeCheckError, RecipeWarning
from lightning_recipe.diagnostics.init_loss import output_stats, references, standard_loss
from lightning_recipe.diagnostics.init_loss_cause import judge_init_loss
from lightning_recipe.diagnostics.task import TaskNotInferred, task_views
from tests.ddp import run_ddp
from tests.models import MLPClassifier, cluster_data, loader, trainer


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # model inits in these tests are built after this


# -- the references on tensors ----------------------------------------------------------------------


def _view(outputs, targets, **kwargs):
    return task_views(outputs, targets, **kwargs)[0]


def test_uniform_logits_over_c_classes_cost_exactly_ln_c():
    for classes in (2, 5, 100):
        view = _view(torch.zeros(40, classes), torch.arange(40) % classes)
        assert references(view).chance == pytest.approx(math.log(classes))
        assert float(standard_loss(view)) == pytest.approx(math.log(classes))
        stats = output_stats(view)
        assert stats["mean_entropy"] == pytest.approx(math.log(classes))
        assert stats["logit_std"] == 0


def test_prior_optimal_is_the_entropy_of_the_label_prior():
    labels = torch.tensor([0, 0, 0, 1] * 5)  # p = (0.75, 0.25, 0)
    refs = references(_view(torch.zeros(20, 3), labels))
    assert refs.prior == pytest.approx([0.75, 0.25, 0.0])
    assert refs.prior_optimal == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert refs.imbalance == pytest.approx(math.log(3) - refs.prior_optimal)


def test_log_prior_bias_reproduces_the_prior_optimal_cross_entropy():
    labels = torch.tensor([0] * 14 + [1] * 4 + [2] * 2)
    view = _view(torch.zeros(20, 3), labels)
    refs = references(view)
    constant = torch.tensor(refs.suggested_bias).expand(20, 3)
    assert refs.suggested_bias == pytest.approx([math.log(0.7), math.log(0.2), math.log(0.1)])
    assert float(F.cross_entropy(constant, labels)) == pytest.approx(refs.prior_optimal, rel=1e-6)


def test_log_odds_bias_reproduces_the_prior_optimal_bce_and_chance_is_ln_2():
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]] * 5)  # p = (0.25, 0.5)
    view = _view(torch.zeros(20, 2), y)
    assert (view.task, view.loss_kind) == ("multilabel", "bce")
    refs = references(view)
    assert refs.chance == pytest.approx(math.log(2))
    assert refs.suggested_bias == pytest.approx([math.log(0.25 / 0.75), 0.0], abs=1e-6)
    constant = torch.tensor(refs.suggested_bias, dtype=torch.float32).expand(20, 2)
    assert float(F.binary_cross_entropy_with_logits(constant, y)) == pytest.approx(refs.prior_optimal, rel=1e-5)


def test_regression_references_are_second_moment_variance_and_mean():
    y = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mse = _view(torch.zeros(4), y, regression_loss="mse")
    refs = references(mse)
    assert refs.chance == pytest.approx((1 + 4 + 9 + 36) / 4)
    assert refs.prior_optimal == pytest.approx(float(y.var(unbiased=False)))
    assert refs.suggested_bias == pytest.approx([3.0])
    l1 = references(_view(torch.zeros(4), y, regression_loss="l1"))
    assert l1.chance == pytest.approx(3.0)
    # torch's median of an even count is the lower middle value (2.0): |1-2|+0+1+4 over 4
    assert l1.prior_optimal == pytest.approx(6 / 4)


def test_measured_loss_tells_mse_from_l1():
    y = 50 + torch.randn(64, generator=torch.Generator().manual_seed(0))
    zeros, at_the_mean = torch.zeros(64), torch.full((64,), float(y.mean()))
    assert _explains(zeros, y, float((y**2).mean()))[0] == ("mse", "mean")
    assert _explains(zeros, y, float(y.abs().mean()))[0] == ("l1", "mean")
    # a bias that already sits at the target mean: the loss is the variance, still read as MSE
    assert _explains(at_the_mean, y, float(y.var(unbiased=False)))[0] == ("mse", "mean")


@pytest.mark.parametrize(
    ("outputs", "targets", "task", "width", "rows"),
    [
        (torch.zeros(6, 4), torch.arange(6) % 4, "multiclass", 4, 6),
        (torch.zeros(2, 5, 7), torch.arange(10).reshape(2, 5) % 7, "multiclass", 7, 10),  # (N, T, C)
        (torch.zeros(2, 3, 4, 4), torch.arange(32).reshape(2, 4, 4) % 3, "multiclass", 3, 32),  # (N, C, H, W)
        (torch.zeros(10, 9), torch.arange(10).reshape(2, 5) % 9, "multiclass", 9, 10),  # (N*T, V) vs (N, T)
        (torch.zeros(8), torch.tensor([0.0, 1.0] * 4), "binary", 1, 8),
        (torch.zeros(8, 1), torch.tensor([0, 1] * 4), "binary", 1, 8),
        (torch.zeros(8, 3), (torch.arange(24).reshape(8, 3) % 2).float(), "multilabel", 3, 8),
        (torch.zeros(8, 2), torch.randn(8, 2), "regression", 2, 8),
        (torch.zeros(8, 1), torch.randn(8), "regression", 1, 8),
    ],
)
def test_task_inferred_from_each_shape_family(outputs, targets, task, width, rows):
    view = task_views(outputs, targets)[0]
    assert (view.task, view.width, view.rows) == (task, width, rows)


def test_ignore_index_positions_are_left_out():
    targets = torch.tensor([[1, 2, -100, -100], [0, -100, 3, 1]])
    view = task_views(torch.zeros(8, 4), targets)[0]  # flattened LM logits
    assert view.rows == 5
    assert view.targets.tolist() == [1, 2, 0, 3, 1]


def test_explicit_task_that_does_not_fit_the_shapes_is_explained():
    with pytest.raises(TaskNotInferred, match=r"task='regression'.*\(6, 4\).*`expected=`"):
        task_views(torch.zeros(6, 4), torch.arange(6) % 4, task="regression")


def test_judge_init_loss_thresholds_for_cross_entropy():
    refs = references(_view(torch.zeros(40, 4), torch.arange(40) % 4))
    ln4 = math.log(4)
    assert judge_init_loss(ln4 + 0.9, "cross_entropy", refs).ok  # default init on roughly standardised inputs
    assert judge_init_loss(ln4 + 1.1, "cross_entropy", refs).reason == "above_chance"
    assert judge_init_loss(0.2, "cross_entropy", refs).reason == "below_prior"
    assert judge_init_loss(0.2, "cross_entropy", refs, expected=0.2).ok


# -- the check through a real Trainer ---------------------------------------------------------------


class InitClassifier(MLPClassifier):
    """An MLP classifier whose final layer is scaled or biased at init."""

    def __init__(self, in_dim: int = 8, classes: int = 4, scale: float = 1.0, bias=None, loss_scale: float = 1.0):
        super().__init__(in_dim=in_dim, classes=classes)
        self.loss_scale = loss_scale
        with torch.no_grad():
            self.net[2].weight.mul_(scale)
            if bias is not None:
                self.net[2].bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_scale * F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


class LeakyClassifier(MLPClassifier):
    """The one-hot label rides along in the input, and the model reads it with a strong weight."""

    def forward(self, x):
        return self.net(x[:, :8]) + 100.0 * x[:, 8:]


class NoLossClassifier(MLPClassifier):
    def training_step(self, batch, batch_idx):
        return None


class ManualClassifier(MLPClassifier):
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


class Regressor(L.LightningModule):
    def __init__(self, bias: float | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
        if bias is not None:
            nn.init.constant_(self.net[2].bias, bias)

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Tagger(L.LightningModule):
    """Per-position classification: (N, T) tokens in, (N, T, C) logits out."""

    def __init__(self, vocab: int = 12, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])

    def training_step(self, batch, batch_idx):
        tokens, tags = batch
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class MultilabelNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


PRIORS = [0.7, 0.1, 0.1, 0.1]


def imbalanced_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(torch.tensor(PRIORS), 256, replacement=True, generator=g)
    x = torch.randn(256, 8, generator=g) + F.one_hot(y, 8).float()
    return loader(TensorDataset(x, y), shuffle=False)


def regression_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = 50.0 + x @ torch.randn(6, generator=g) * 0.5
    return loader(TensorDataset(x, y), shuffle=False)


def raw_inputs_loader() -> DataLoader:
    data = cluster_data()
    return loader(TensorDataset(data.tensors[0] * 1000, data.tensors[1]))


def leaky_loader() -> DataLoader:
    x, y = cluster_data().tensors
    return loader(TensorDataset(torch.cat([x, F.one_hot(y, 4).float()], 1), y))


def tagging_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (64, 10), generator=g)
    tags = tokens % 5
    tags[:, -2:] = -100  # padding
    return loader(TensorDataset(tokens, tags))


def multilabel_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    return loader(TensorDataset(x, (x[:, :5] > 0).float()))


def _run(model, data, steps: int = 1, **check_kwargs):
    torch.manual_seed(0)
    check = InitLossCheck(**check_kwargs)
    t = trainer(max_steps=steps, callbacks=[check])
    t.fit(model, data)
    return check, t


def _fails(model, data, **check_kwargs):
    with pytest.raises(RecipeCheckError) as info:
        _run(model, data, **check_kwargs)
    return info.value.result


def test_healthy_mlp_passes_with_logit_statistics_in_details():
    check, t = _run(MLPClassifier(), loader(cluster_data()), steps=2)
    result = check.result
    assert result.status is CheckStatus.PASSED, result.format()
    d = result.details
    assert d["task"] == "multiclass" and d["num_classes"] == 4 and d["batches"] == 4
    assert d["chance_loss"] == pytest.approx(math.log(4))
    assert d["loss_source"] == "training_step"
    assert 0 < d["logit_std"] < 1 and d["mean_entropy"] <= d["max_entropy"]
    assert result.summary.startswith(f"measured {d['measured_loss']:.4g} vs expected ~1.386 (chance: ln 4)")
    assert t.global_step == 2


def test_huge_final_layer_init_fails_naming_the_final_layer():
    result = _fails(InitClassifier(scale=100.0), loader(cluster_data()))
    assert result.details["reason"] == "above_chance"
    assert "final layer `net.2`" in result.hint and "0.01" in result.hint
    assert "far above chance" in result.summary


def test_unnormalised_inputs_fail_saying_normalise():
    result = _fails(MLPClassifier(), raw_inputs_loader())
    assert "normalise inputs to zero mean and unit variance" in result.hint


def test_large_final_bias_fails_saying_bias():
    result = _fails(InitClassifier(bias=[10.0, 0.0, 0.0, -10.0]), loader(cluster_data()))
    assert "bias" in result.hint and "too large" in result.hint


def test_label_leak_is_far_below_prior_optimal_and_says_how_a_pretrained_model_opts_out():
    result = _fails(LeakyClassifier(in_dim=8), leaky_loader())
    assert result.details["reason"] == "below_prior"
    assert "below the prior-optimal" in result.summary
    assert "leak" in result.hint and "expected=" in result.hint and 'on_fail="warn"' in result.hint


def test_imbalanced_classes_with_log_prior_bias_pass_below_chance():
    check, _ = _run(InitClassifier(bias=[math.log(p) for p in PRIORS]), imbalanced_loader())
    d = check.result.details
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert d["measured_loss"] < d["chance_loss"] - 0.3
    assert d["measured_loss"] == pytest.approx(d["prior_optimal_loss"], abs=0.15)
    assert check.result.hint is None


def test_imbalanced_classes_with_zero_bias_pass_with_the_exact_log_priors_in_the_hint():
    # calibration: an imbalanced prior the bias does not express is advice, not a failure
    check, _ = _run(InitClassifier(bias=[0.0] * 4), imbalanced_loader())
    result = check.result
    assert result.status is CheckStatus.PASSED
    bias = result.details["suggested_final_bias"]
    prior = result.details["prior"]
    assert bias == pytest.approx([math.log(p) for p in prior])
    assert prior[0] == pytest.approx(0.7, abs=0.08)
    assert "log class priors [" + ", ".join(f"{b:.4g}" for b in bias) + "]" in result.hint


def test_regression_with_mean_50_targets_and_no_bias_fails_with_the_bias_value():
    result = _fails(Regressor(), regression_loader())
    mean = result.details["suggested_final_bias"][0]
    assert mean == pytest.approx(50.0, abs=0.3)
    assert result.details["reason"] == "target_offset"
    assert f"Set the final bias to {mean:.4g}" in result.hint


def test_regression_with_the_mean_as_bias_passes():
    check, _ = _run(Regressor(bias=50.0), regression_loader())
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert check.result.details["loss_kind"] == "mse"


def test_per_position_sequence_model_with_padding_passes():
    check, _ = _run(Tagger(), tagging_loader())
    d = check.result.details
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert d["task"] == "multiclass" and d["num_classes"] == 5 and d["rows"] == 64 * 8 and d["batches"] == 2


def test_multilabel_bce_chance_is_ln_2():
    check, _ = _run(MultilabelNet(), multilabel_loader())
    d = check.result.details
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert (d["task"], d["num_classes"]) == ("multilabel", 5)
    assert d["chance_loss"] == pytest.approx(math.log(2))


def test_expected_overrides_the_reference_for_a_custom_loss():
    # a loss that no standard reading explains (10x cross-entropy) is not judged against chance: skipped,
    # naming `expected=` and the readings it was compared with; `expected=` then checks it
    scaled = 10 * math.log(4)
    check, _ = _run(InitClassifier(scale=0.1, loss_scale=10.0), loader(cluster_data()))
    result = check.result
    assert result.status is CheckStatus.SKIPPED, result.format()
    assert "not a standard loss" in result.summary and "expected=" in result.summary
    assert "cross-entropy (mean) gives 1.3" in result.summary
    assert "targets=" not in result.summary  # the targets are read right: the loss is what is unknown
    check, _ = _run(InitClassifier(scale=0.1, loss_scale=10.0), loader(cluster_data()), expected=scaled)
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert "(`expected=`)" in check.result.summary


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`task` to be one of \['auto', 'multiclass', 'binary', 'multilabel'"):
        InitLossCheck(task="classification")
    with pytest.raises(ValueError, match=r"`regression_loss` to be one of"):
        InitLossCheck(regression_loss="huber")
    with pytest.raises(ValueError, match=r"`expected` to be the loss at initialization, a finite number >= 0"):
        InitLossCheck(expected=float("nan"))


def test_on_fail_warn_lets_training_go_on():
    with pytest.warns(RecipeWarning, match="far above chance"):
        check, t = _run(InitClassifier(scale=100.0), loader(cluster_data()), steps=3, on_fail="warn")
    assert check.result.status is CheckStatus.FAILED
    assert t.global_step == 3


@pytest.mark.filterwarnings("ignore:.*training_step. returned .None")
def test_training_step_returning_none_is_skipped():
    check, _ = _run(NoLossClassifier(), loader(cluster_data()))
    assert check.result.status is CheckStatus.SKIPPED
    assert "returned no loss" in check.result.summary


def test_manual_optimization_uses_the_inferred_loss_without_calling_training_step():
    model = ManualClassifier()
    check, _ = _run(model, loader(cluster_data()))
    assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert check.result.details["loss_source"] == "inferred"


def test_non_finite_loss_fails_saying_where_the_nan_is():
    x, y = cluster_data().tensors
    x = x.clone()
    x[3, 2] = float("nan")
    result = _fails(MLPClassifier(), loader(TensorDataset(x, y), shuffle=False))
    assert "non-finite" in result.summary and "inputs contain NaN" in result.hint


@pytest.mark.filterwarnings("ignore:.*has no TensorBoardLogger")
def test_scalars_are_logged_under_recipe_init_loss_check(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    check = InitLossCheck()
    logger = CSVLogger(tmp_path)
    trainer(max_steps=1, callbacks=[check], logger=logger).fit(MLPClassifier(), loader(cluster_data()))
    logger.save()
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for tag in ("measured_loss", "chance_loss", "prior_optimal_loss", "logit_std"):
        assert f"recipe/init_loss_check/{tag}" in text


def test_ddp_same_verdict_on_both_ranks(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    code, ranks, output = run_ddp(
        tmp_path / "ok", "tests.models:MLPClassifier", "tests.models:cluster_loader", "InitLossCheck"
    )
    assert code == 0, output
    assert {r["result"]["status"] for r in ranks.values()} == {"passed"} and len(ranks) == 2

    code, ranks, output = run_ddp(
        tmp_path / "bad",
        "tests.test_init_loss:InitClassifier",
        "tests.models:cluster_loader",
        "InitLossCheck",
        model_kwargs={"scale": 100.0},
    )
    assert code != 0 and len(ranks) == 2, output
    assert {r["error"] for r in ranks.values()} == {"RecipeCheckError"}
    assert len({r["result"]["summary"] for r in ranks.values()}) == 1
    assert all(r["global_step"] == 0 for r in ranks.values())


# -- which loss the measured value is: readings, reductions, offsets ---------------------------------


def _readings(outputs, targets, examples=None):
    from lightning_recipe.diagnostics.loss_reading import loss_readings, loss_views

    n = examples if examples is not None else targets.shape[0]
    return loss_readings([loss_views(outputs, targets)], [n])


def _explains(outputs, targets, measured):
    from lightning_recipe.diagnostics.loss_reading import consistent_readings

    found = consistent_readings(_readings(outputs, targets), measured)
    return [(r.form, r.reduction) for r in found]


def test_cross_entropy_summed_over_examples_is_read_as_a_sum_scaled_by_the_count():
    logits, labels = torch.randn(32, 5), torch.arange(32) % 5
    mean = float(F.cross_entropy(logits, labels))
    assert _explains(logits, labels, mean)[0] == ("cross_entropy", "mean")
    assert _explains(logits, labels, float(F.cross_entropy(logits, labels, reduction="sum")))[0] == (
        "cross_entropy",
        "sum",
    )
    (summed,) = [r for r in _readings(logits, labels) if r.reduction == "sum"]
    assert summed.scale == 32 and summed.value == pytest.approx(32 * mean, rel=1e-5)


def test_bce_and_mse_sums_and_per_example_sums_are_told_from_the_mean():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(16, 6, generator=g), (torch.rand(16, 6, generator=g) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert _explains(logits, y, float(bce.mean()))[0] == ("bce", "mean")
    assert _explains(logits, y, float(bce.sum()))[0] == ("bce", "sum")
    assert _explains(logits, y, float(bce.sum(1).mean()))[0] == ("bce", "per_example")
    out, target = torch.randn(16, 6, generator=g), 3 + torch.randn(16, 6, generator=g)
    mse = (out - target) ** 2
    assert _explains(out, target, float(mse.mean()))[0] == ("mse", "mean")
    assert _explains(out, target, float(mse.sum()))[0] == ("mse", "sum")
    (summed,) = [r for r in _readings(out, target) if (r.form, r.reduction) == ("mse", "sum")]
    assert summed.scale == 16 * 6


def test_bce_on_probabilities_is_read_from_a_sigmoid_decoder_and_its_chance_is_ln_2_per_pixel():
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(8, 1, 6, 6, generator=g) ** 3  # intensities in [0, 1], mostly dark: not 0/1 labels
    recon = torch.sigmoid(0.3 * torch.randn(8, 36, generator=g))  # a sigmoid decoder's (N, D) output
    measured = float(F.binary_cross_entropy(recon, pixels.view(-1, 36), reduction="sum"))
    form, reduction = _explains(recon, pixels, measured)[0]
    assert (form, reduction) == ("bce_probabilities", "sum")
    reading = next(r for r in _readings(recon, pixels) if (r.form, r.reduction) == (form, reduction))
    assert reading.scale == 8 * 36 and reading.view.width == 36  # the columns of the outputs, not of the image
    refs = references(reading.view)
    assert refs.chance == pytest.approx(math.log(2))
    p = pixels.view(-1, 36).double().mean(0).clamp(1e-12, 1 - 1e-12)
    assert refs.prior_optimal == pytest.approx(float((-(p * p.log() + (1 - p) * (1 - p).log())).mean()), rel=1e-4)


def test_an_elbo_like_loss_matches_no_reading():
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(8, 36, generator=g)
    recon = torch.sigmoid(torch.randn(8, 36, generator=g))
    # mean reconstruction + a summed KL term that dominates: no standard loss of the outputs is this
    elbo = float(F.binary_cross_entropy(recon, pixels)) + 60.0  # nearest readings: MSE sum 40, L1 sum 89
    assert _explains(recon, pixels, elbo) == []
    assert _explains(recon, torch.arange(8) % 3, elbo) == []  # nor against class labels


def test_mse_is_told_from_l1_by_the_loss_it_explains_not_by_the_nearer_reference():
    g = torch.Generator().manual_seed(4)
    y = 0.45 + 0.25 * torch.randn(64, 1, 8, 8, generator=g)
    out = -0.08 + 0.2 * torch.randn(64, 1, 8, 8, generator=g)
    measured = float(F.mse_loss(out, y))
    assert _explains(out, y, measured)[0] == ("mse", "mean")
    assert _explains(out, y, float(F.l1_loss(out, y)))[0] == ("l1", "mean")


def test_same_shape_conv_outputs_are_read_per_channel():
    view = task_views(torch.zeros(4, 3, 5, 6), torch.randn(4, 3, 5, 6))[0]
    assert (view.width, view.rows) == (3, 4 * 5 * 6)
    y = torch.randn(4, 3, 5, 6) + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    refs = references(task_views(torch.zeros_like(y), y, regression_loss="mse")[0])
    assert refs.suggested_bias == pytest.approx(y.mean((0, 2, 3)).tolist(), rel=1e-5)


def _offset_view(stds: float):
    g = torch.Generator().manual_seed(5)
    y = 2.0 + 0.5 * torch.randn(512, 1, generator=g)
    y = (y - y.mean()) / y.std(unbiased=False) * 0.5 + 2.0  # mean 2, std 0.5 exactly
    out = 2.0 - stds * 0.5 + 0.01 * torch.randn(512, 1, generator=g)
    out = out - out.mean() + (2.0 - stds * 0.5)
    return _view(out, y, regression_loss="mse")


@pytest.mark.parametrize(("stds", "ok", "advice"), [(0.5, True, False), (3.0, True, True), (6.0, False, False)])
def test_target_offset_fails_only_from_five_target_stds_and_is_advice_below(stds, ok, advice):
    from lightning_recipe.diagnostics.init_loss_cause import OFFSET_STDS

    view = _offset_view(stds)
    refs = references(view)
    assert refs.extra["offset_stds"] == pytest.approx(stds, rel=1e-3)
    verdict = judge_init_loss(float(standard_loss(view)), "mse", refs)
    assert (verdict.ok, verdict.bias_advice) == (ok, advice)
    if not ok:
        assert verdict.reason == "target_offset" and verdict.limit == OFFSET_STDS


# -- classic programs and conventions through a real Trainer -----------------------------------------


PIXELS = 14 * 14


def blob_images(n: int = 128, seed: int = 0) -> TensorDataset:
    """MNIST-like ``(image, label)`` pairs: a bright blob on a dark 14x14 canvas, intensities in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij"))
    centres = 3 + 8 * torch.rand(n, 2, 1, 1, generator=g)
    images = torch.exp(-((grid - centres) ** 2).sum(1) / 6.0).unsqueeze(1)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=g))


class VAE(L.LightningModule):
    """The PyTorch example's VAE (examples/vae), shrunk: fc1 -> (fc21, fc22) -> z -> fc3 -> fc4 -> sigmoid, loss
    ``binary_cross_entropy(recon, x, reduction="sum") + KLD``, Adam 1e-3; the label in the batch is unused."""

    def __init__(self, kld_weight: float = 1.0, recon_reduction: str = "sum"):
        super().__init__()
        self.kld_weight, self.recon_reduction = kld_weight, recon_reduction
        self.fc1, self.fc21, self.fc22 = nn.Linear(PIXELS, 64), nn.Linear(64, 8), nn.Linear(64, 8)
        self.fc3, self.fc4 = nn.Linear(8, 64), nn.Linear(64, PIXELS)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, PIXELS)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar

    def training_step(self, batch, batch_idx):
        x, _ = batch
        recon, mu, logvar = self(x)
        bce = F.binary_cross_entropy(recon, x.view(-1, PIXELS), reduction=self.recon_reduction)
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + self.kld_weight * kld

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _image_targets(batch):
    return batch[0].view(-1, PIXELS)


def test_vae_with_unused_labels_is_read_against_its_inputs_and_never_fails():
    check, _ = _run(VAE(), loader(blob_images()))
    result = check.result
    assert result.status is not CheckStatus.FAILED, result.format()
    if result.status is CheckStatus.SKIPPED:
        assert "expected=" in result.summary
    else:
        d = result.details
        assert (d["loss_form"], d["reduction"], d["read_against"]) == ("bce_probabilities", "sum", "inputs")
        assert "read against the model's inputs" in result.summary


def test_vae_with_the_image_as_targets_passes_with_the_sum_over_pixels_recognised():
    check, _ = _run(VAE(), loader(blob_images()), targets=_image_targets)
    result = check.result
    d = result.details
    assert result.status is CheckStatus.PASSED, result.format()
    assert (d["loss_form"], d["reduction"], d["read_against"]) == ("bce_probabilities", "sum", "targets")
    assert d["loss_scale"] == 32 * PIXELS  # the references scale by the count of summed terms
    assert d["chance_loss"] == pytest.approx(32 * PIXELS * math.log(2))
    assert d["measured_loss"] == pytest.approx(d["chance_loss"], rel=0.05)  # a sigmoid decoder at init: ln 2 each
    assert f"= {d['measured_loss'] / d['loss_scale']:.4g} x {d['loss_scale']:.4g} terms" in result.summary


def test_elbo_that_no_reading_explains_is_skipped_naming_expected_and_targets():
    # mean reconstruction + summed KL (weighted): no standard loss of the outputs is this value
    check, _ = _run(VAE(kld_weight=40.0, recon_reduction="mean"), loader(blob_images()))
    result = check.result
    assert result.status is CheckStatus.SKIPPED, result.format()
    assert "not a standard loss" in result.summary
    assert "expected=" in result.summary and "targets=" in result.summary


def smooth_images(n: int, size: int, mean: float, std: float, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random images with the given per-image-set mean and std (a Y channel, a field of temperatures)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, size // 4, size // 4, generator=g)
    x = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return mean + std * x


def super_resolution_loader(mean: float = 0.45, std: float = 0.25) -> DataLoader:
    """(low-res, high-res) pairs: the high-res Y channel and its 2x average-pooled input."""
    high = smooth_images(128, 16, mean, std)
    return loader(TensorDataset(F.avg_pool2d(high, 2), high), shuffle=False)


class SuperResolution(L.LightningModule):
    """The PyTorch example's super-resolution net (examples/super_resolution), shrunk: three ReLU convs, a conv to
    r^2 channels and a pixel shuffle; orthogonal init; MSE; Adam."""

    def __init__(self, upscale: int = 2):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5, 1, 2), nn.Conv2d(16, 16, 3, 1, 1)
        self.conv3, self.conv4 = nn.Conv2d(16, 8, 3, 1, 1), nn.Conv2d(8, upscale**2, 3, 1, 1)
        self.shuffle = nn.PixelShuffle(upscale)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.orthogonal_(conv.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv4.weight)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.shuffle(self.conv4(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class FieldRegressor(L.LightningModule):
    """Image-to-image regression onto a 3-channel field: one bias per output channel."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_super_resolution_mse_passes_read_as_mse_with_the_offset_as_per_channel_advice():
    check, _ = _run(SuperResolution(), super_resolution_loader())
    result = check.result
    d = result.details
    assert result.status is CheckStatus.PASSED, result.format()
    assert (d["loss_kind"], d["reduction"], d["num_outputs"]) == ("mse", "mean", 1)
    assert 1.0 <= d["offset_stds"] < 5.0  # the outputs start ~2 target stds off: advice, not a failure
    assert d["suggested_final_bias"] == pytest.approx([0.45], abs=0.02)  # one bias: one output channel
    assert result.hint is not None and "0.45 (one per output channel) with" in result.hint
    assert "Not a failure" in result.hint


def test_regression_whose_target_mean_matters_fails_with_the_exact_bias_per_channel():
    high = smooth_images(96, 12, 0.0, 1.0, channels=3) * 2.0 + torch.tensor([40.0, 50.0, 60.0]).view(1, 3, 1, 1)
    low = smooth_images(96, 12, 0.0, 1.0, seed=1)
    result = _fails(FieldRegressor(), loader(TensorDataset(low, high), shuffle=False))
    d = result.details
    assert d["reason"] == "target_offset" and d["offset_stds"] > 5.0
    means = high.mean((0, 2, 3)).tolist()
    assert d["suggested_final_bias"] == pytest.approx(means, rel=1e-4)  # all 96 images: the batches read
    bias = "[" + ", ".join(f"{b:.4g}" for b in d["suggested_final_bias"]) + "]"
    assert f"Set the final bias to {bias} (one per output channel) with" in result.hint
    assert "final layer `net.2`" in result.hint


@pytest.mark.parametrize("kind", ["cross_entropy", "bce", "mse"])
@pytest.mark.parametrize("width", [3, 100, 101, 1000])
def test_bias_hint_reads_as_one_sentence_at_every_width(kind, width):
    from lightning_recipe.callbacks._init_loss_text import bias_advice, bias_values

    g = torch.Generator().manual_seed(0)
    if kind == "cross_entropy":
        targets = torch.multinomial(torch.linspace(1.0, 50.0, width), 4 * width, replacement=True, generator=g)
    else:
        targets = (torch.rand(4 * width, width, generator=g) < 0.1).float() + (5.0 if kind == "mse" else 0.0)
    (view,) = [v for v in task_views(torch.zeros(4 * width, width), targets) if v.loss_kind == kind]
    refs = references(view)
    phrase = bias_values(view, refs)
    hint = bias_advice(view, refs, refs.chance)
    assert f"bias to {phrase}" in hint and hint.count("log class priors") <= 1
    assert "priors the" not in hint and "to the log class priors the" not in hint
    if width > 100:
        assert "too many to list" in phrase and "[" not in phrase
    else:
        assert phrase.count(",") == width - 1 if kind == "mse" else "[" in phrase


def test_imbalanced_labels_over_more_than_100_classes_hint_how_to_compute_the_log_priors():
    g = torch.Generator().manual_seed(0)
    priors = torch.full((120,), 0.5 / 119)
    priors[0] = 0.5
    y = torch.multinomial(priors, 1280, replacement=True, generator=g)
    x = torch.randn(1280, 8, generator=g)
    check, _ = _run(InitClassifier(classes=120), loader(TensorDataset(x, y), batch_size=320, shuffle=False))
    result = check.result
    assert result.status is CheckStatus.PASSED, result.format()
    assert result.hint is not None and "prior" not in result.details  # 120 values are not listed
    assert (
        "Set the final layer's bias to the log class priors, log(n_c / n) from the count n_c of each of the 120 "
        "classes in your training set (too many to list" in result.hint
    )


def test_language_model_that_shifts_inside_its_loss_is_read_after_the_shift_and_shifted_twice_fails():
    from tests.test_task import ShiftInsideLM, TokenDicts

    data = DataLoader(TokenDicts(), batch_size=16, shuffle=False)
    check, _ = _run(ShiftInsideLM(), data)
    result = check.result
    assert result.status is CheckStatus.PASSED, result.format()
    assert result.details["alignment"]["target_shift"] == 1 and result.details["reduction"] == "mean"
    labels = torch.stack([TokenDicts()[i]["labels"] for i in range(len(TokenDicts()))])
    batches = min(len(TokenDicts()) // 16 + (len(TokenDicts()) % 16 > 0), 4)
    assert result.details["rows"] == int((labels[: 16 * batches, 1:] != -100).sum())
    with pytest.raises(RecipeCheckError, match="labels shifted twice") as caught:
        _run(ShiftInsideLM(), DataLoader(TokenDicts(shift_labels=True), batch_size=16))
    assert "input token t + 2" in caught.value.result.summary and "labels = input_ids" in caught.value.result.hint
