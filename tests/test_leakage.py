"""BatchLeakageProbe: the diagnostic on modules with known answers (checked against a brute-force
per-example Jacobian), then the callback through a real Trainer, then under DDP."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import BatchLeakageProbe, CheckStatus, RecipeCheckError, RecipeWarning
from lightning_recipe.diagnostics.leakage import LeakageNotApplicable, ProbeSettings, probe_batch_leakage
from tests.ddp import run_ddp
from tests.models import trainer
from tests.tensorboard import read_events

# -- models with known answers (module level: DDP subprocesses import them) --------------------------


class PerExampleMLP(nn.Module):
    def __init__(self, in_dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViewScramble(nn.Module):
    """Moves the batch axis of ``(N, T, F)`` with ``view`` instead of ``permute`` before a time-major LSTM."""

    def __init__(self, features: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, f = x.shape
        out, _ = self.rnn(x.view(t, n, f))
        return self.head(out[-1])


class BatchMean(PerExampleMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - x.mean(0))


class SoftmaxDim0(PerExampleMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(super().forward(x), dim=0)


class OneLeak(PerExampleMLP):
    """Only the output of example 13 reads the input of example 6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        extra = torch.zeros_like(out)
        extra[13] = x[6].sum()
        return out + extra


class ScaledBatchMean(PerExampleMLP):
    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.strength * x.mean(0))


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TimeMajorLSTM(nn.Module):
    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


class TinyLM(nn.Module):
    """Token LM: embedding + transformer encoder with a causal mask; ``diagonal`` None: no mask."""

    def __init__(
        self, vocab: int = 11, dim: int = 16, layers: int = 1, diagonal: int | None = 1, flatten: bool = False
    ) -> None:
        super().__init__()
        self.diagonal = diagonal
        self.flatten = flatten
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = None
        if self.diagonal is not None:
            mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=self.diagonal)
        out = self.head(self.blocks(self.embed(tokens), mask=mask))
        return out.flatten(0, 1) if self.flatten else out


class BiTagger(nn.Module):
    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class ImageAndFeatures(nn.Module):
    """Two inputs; ``leak_features`` mixes the second one over the batch."""

    def __init__(self, leak_features: bool = False) -> None:
        super().__init__()
        self.leak_features = leak_features
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4 + 3, 2)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.leak_features:
            features = features / features.norm(dim=0, keepdim=True)
        return self.fc(torch.cat([self.conv(image).flatten(1), features], 1))


def _call(module: nn.Module, x):
    if isinstance(x, dict):
        return module(**x)
    return module(x)


def _probe(module: nn.Module, x, **kwargs):
    return probe_batch_leakage(module, x, _call, **kwargs)


def _brute_force_pairs(module: nn.Module, x: torch.Tensor) -> set[tuple[int, int]]:
    """Reference: one backward pass per output example, in eval mode."""
    module.eval()
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    pairs = set()
    for i in range(x.shape[0]):
        (g,) = torch.autograd.grad(out[i].sum(), x, retain_graph=True)
        for j in range(x.shape[0]):
            if j != i and g[j].abs().max() > 0:
                pairs.add((i, j))
    return pairs


def _tokens(n: int = 8, t: int = 9, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


# -- the diagnostic -----------------------------------------------------------------------------------


def test_per_example_mlp_has_no_leak_in_2_log2_b_passes():
    torch.manual_seed(0)
    report = _probe(PerExampleMLP(), torch.randn(16, 6))
    assert not report.batch_leak and report.leaking_pairs == []
    assert report.num_examples == 16
    assert report.backward_passes == {"batch": 2 * 4}
    assert report.total_backward_passes <= 2 * math.ceil(math.log2(16))


def test_a_single_leak_from_example_13_to_6_is_found_among_all_pairs():
    torch.manual_seed(0)
    report = _probe(OneLeak(), torch.randn(16, 6))
    assert report.leaking_pairs == [(13, 6)]
    assert report.pairs_exact
    assert report.backward_passes["batch"] == 8
    # targeted passes only for the suspect rows left by the grouped passes (here: examples with bit 2 set)
    assert report.backward_passes["exact pairs"] <= 8
    assert report.dependency[13, 6] == 1 and report.dependency.sum() == 1


def test_view_instead_of_permute_names_the_same_pairs_as_brute_force():
    torch.manual_seed(0)
    model, x = ViewScramble(), torch.randn(8, 5, 3)
    report = _probe(model, x)
    expected = _brute_force_pairs(model, x)
    assert expected and set(report.leaking_pairs) == expected
    assert report.first_mixing_module == ("rnn", "LSTM(batch_first=False)")


@pytest.mark.parametrize("model", [BatchMean(), SoftmaxDim0()], ids=["mean_over_batch", "softmax_dim0"])
def test_operations_over_the_batch_axis_leak_between_every_pair(model):
    torch.manual_seed(0)
    report = _probe(model, torch.randn(10, 6))
    assert len(report.leaking_pairs) == 10 * 9
    assert set(report.leaking_pairs) == _brute_force_pairs(model, torch.randn(10, 6))


def test_softmax_over_batch_is_located_after_the_last_layer():
    torch.manual_seed(0)
    report = _probe(SoftmaxDim0(), torch.randn(10, 6))
    assert report.first_mixing_module is None
    assert report.last_clean_module == ("net.2", "Linear")


def test_tolerance_ignores_float_noise_sized_dependencies_but_not_real_ones():
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    assert not _probe(ScaledBatchMean(1e-9), x).batch_leak
    assert len(_probe(ScaledBatchMean(1e-3), x).leaking_pairs) == 12 * 11


def test_batchnorm_in_train_mode_is_probed_in_eval_mode_and_modes_are_restored():
    torch.manual_seed(0)
    model = BNNet().train()
    report = _probe(model, torch.randn(16, 6))
    assert not report.batch_leak
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_time_major_lstm_batch_on_dim1_is_found_without_a_false_leak():
    torch.manual_seed(0)
    x = torch.randn(7, 12, 3)  # (T, N, F)
    report = _probe(TimeMajorLSTM(), x, targets=torch.zeros(12, dtype=torch.long))
    assert not report.batch_leak and report.input_batch_dim == 1


def test_time_major_lstm_with_t_equal_n_is_resolved_by_the_gradient_structure():
    torch.manual_seed(0)
    x = torch.randn(8, 8, 3)  # T == N: dim 0 and dim 1 both fit the targets
    report = _probe(TimeMajorLSTM(), x, targets=torch.zeros(8, dtype=torch.long))
    assert not report.batch_leak and report.input_batch_dim == 1


def test_causal_token_transformer_passes_and_is_probed_at_the_embedding():
    torch.manual_seed(0)
    x, y = _tokens()
    report = _probe(TinyLM(layers=2), x, targets=y)
    assert not report.batch_leak
    assert report.causal_checked and "shifted" in report.causal_reason
    assert not report.causal_leak and report.cuts_checked == list(range(8))
    assert report.probed == ["embedding `embed` output"]


def test_missing_causal_mask_reports_the_future_positions():
    torch.manual_seed(0)
    x, y = _tokens()
    report = _probe(TinyLM(diagonal=None), x, targets=y)
    assert not report.batch_leak and report.causal_leak
    assert (0, list(range(1, 9))) in report.causal_violations


def test_off_by_one_mask_lets_t_see_exactly_t_plus_1():
    torch.manual_seed(0)
    x, y = _tokens()
    report = _probe(TinyLM(diagonal=2), x, targets=y)
    assert report.causal_leak
    assert report.causal_violations and all(late == [t + 1] for t, late in report.causal_violations)


def test_flattened_lm_logits_are_mapped_back_to_examples_and_positions():
    torch.manual_seed(0)
    x, y = _tokens()
    report = _probe(TinyLM(flatten=True), x, targets=y)
    assert report.output_layout.startswith("flattened") and not report.batch_leak
    assert report.causal_checked and not report.causal_leak
    bad = _probe(TinyLM(flatten=True, diagonal=None), x, targets=y)
    assert bad.causal_leak


def test_bidirectional_tagger_is_not_held_to_causality_unless_asked():
    torch.manual_seed(0)
    x, _ = _tokens()
    tags = (x > 5).long()
    report = _probe(BiTagger(), x, targets=tags)
    assert not report.batch_leak and not report.causal_checked
    asked = _probe(BiTagger(), x, targets=tags, causal=True)
    assert asked.causal_checked and asked.causal_leak


def test_multi_input_models_probe_every_float_input():
    torch.manual_seed(0)
    x = {"image": torch.randn(6, 1, 6, 6), "features": torch.randn(6, 3)}
    healthy = _probe(ImageAndFeatures(), x)
    assert not healthy.batch_leak and len(healthy.probed) == 2
    assert len(_probe(ImageAndFeatures(leak_features=True), x).leaking_pairs) == 6 * 5


def test_not_applicable_cases_say_why():
    with pytest.raises(LeakageNotApplicable, match="at least 2"):
        _probe(PerExampleMLP(), torch.randn(1, 6))
    with pytest.raises(LeakageNotApplicable, match="nowhere to read a gradient"):
        probe_batch_leakage(OneHotTokens(), torch.randint(0, 10, (8, 5)), lambda m, x: m(x))
    with pytest.raises(LeakageNotApplicable, match="output_batch_dim"):
        probe_batch_leakage(PerExampleMLP(), torch.randn(8, 6), lambda m, x: m(x).sum(0))


def test_larger_batches_are_probed_on_a_bounded_number_of_examples():
    torch.manual_seed(0)
    report = _probe(PerExampleMLP(), torch.randn(64, 6), num_examples=16)
    assert report.num_examples == 16 and report.total_backward_passes == 8
    report = _probe(PerExampleMLP(), torch.randn(64, 6), settings=ProbeSettings(num_examples=4, tolerance=1e-3))
    assert report.num_examples == 4 and report.tolerance == 1e-3
    report = _probe(PerExampleMLP(), torch.randn(64, 6), settings=ProbeSettings(num_examples=4), num_examples=8)
    assert report.num_examples == 8, "a keyword replaces the field of `settings`"


# -- the callback through a real Trainer ----------------------------------------------------------------


class LitSequences(L.LightningModule):
    """``(N, T, F)`` sequences into a time-major LSTM; ``bug=True`` moves the batch axis with ``view``."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.rnn = nn.LSTM(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, f = x.shape
        x = x.view(t, n, f) if self.bug else x.permute(1, 0, 2)
        return self.head(self.rnn(x)[0][-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LitBuggySequences(LitSequences):
    def __init__(self) -> None:
        super().__init__(bug=True)


def sequence_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 3, generator=g)
    return DataLoader(TensorDataset(x, (x.sum((1, 2)) > 0).long()), batch_size=16, shuffle=True)


def test_healthy_model_passes_through_fit_and_says_eval_mode():
    probe = BatchLeakageProbe()
    t = trainer(callbacks=[probe], max_steps=2)
    t.fit(LitSequences(), sequence_loader())
    assert probe.result.status is CheckStatus.PASSED
    assert "eval mode" in probe.result.summary
    assert probe.result.details["eval_mode"] is True
    assert probe.result.details["total_backward_passes"] == 8
    assert t.global_step == 2


def test_the_callbacks_settings_reach_the_probe():
    probe = BatchLeakageProbe(num_examples=4, tolerance=1e-3)
    trainer(callbacks=[probe], max_steps=1).fit(LitSequences(), sequence_loader())
    assert probe.result.details["num_examples"] == 4 and probe.result.details["tolerance"] == 1e-3


def test_view_bug_stops_fit_with_the_permute_fix():
    probe = BatchLeakageProbe()
    t = trainer(callbacks=[probe], max_steps=2)
    with pytest.raises(RecipeCheckError, match="permute") as info:
        t.fit(LitBuggySequences(), sequence_loader())
    assert t.global_step == 0
    result = info.value.result
    assert result.status is CheckStatus.FAILED
    assert result.details["first_mixing_module"] == {"name": "rnn", "type": "LSTM(batch_first=False)"}
    assert result.details["leaking_pairs"]


def test_on_fail_warn_lets_training_go_on():
    probe = BatchLeakageProbe(on_fail="warn")
    t = trainer(callbacks=[probe], max_steps=2)
    with pytest.warns(RecipeWarning, match="examples mix through the batch"):
        t.fit(LitBuggySequences(), sequence_loader())
    assert probe.result.status is CheckStatus.FAILED
    assert t.global_step == 2


def test_logs_scalars_and_the_dependency_matrix_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    t = trainer(callbacks=[BatchLeakageProbe(on_fail="warn")], max_steps=1, logger=logger)
    with pytest.warns(RecipeWarning):
        t.fit(LitBuggySequences(), sequence_loader())
    logger.experiment.flush()
    events = read_events(str(tmp_path))
    tags = events.Tags()
    assert "recipe/batch_leakage_probe/dependency_matrix" in tags["images"]
    pairs = events.Scalars("recipe/batch_leakage_probe/leaking_pairs")
    assert pairs[0].value > 0
    assert "recipe/batch_leakage_probe/backward_passes" in tags["scalars"]


def test_single_example_batches_are_skipped_with_the_reason():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, generator=g)
    probe = BatchLeakageProbe()
    trainer(callbacks=[probe], max_steps=1).fit(
        LitSequences(), DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=1)
    )
    assert probe.result.status is CheckStatus.SKIPPED
    assert "at least 2" in probe.result.summary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"causal": "yes"}, r"`causal` to be one of \[None, True, False\], but got 'yes'"),
        ({"num_examples": 1}, r"`num_examples` to be an integer >= 2"),
        ({"batch_dim": -1}, r"`batch_dim` to be an integer >= 0"),
        ({"tolerance": 2.0}, r"`tolerance` to be a number in the \(0, 1\) range"),
        ({"on_fail": "ignore"}, r"`on_fail` to be one of \['raise', 'warn'\]"),
        ({"batch_dim": 1, "time_dim": 1}, r"`time_dim` and `batch_dim` to differ"),
    ],
)
def test_bad_arguments_are_refused_at_construction_with_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchLeakageProbe(**kwargs)


# -- DDP -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buggy", [False, True], ids=["healthy", "view_bug"])
def test_ddp_ranks_agree(tmp_path, buggy):
    model = "tests.test_leakage:LitBuggySequences" if buggy else "tests.test_leakage:LitSequences"
    code, ranks, output = run_ddp(
        tmp_path, model=model, data="tests.test_leakage:sequence_loader", check="BatchLeakageProbe"
    )
    assert set(ranks) == {0, 1}, output
    statuses = {r["result"]["status"] for r in ranks.values()}
    if buggy:
        assert code != 0
        assert {r["error"] for r in ranks.values()} == {"RecipeCheckError"}
        assert statuses == {"failed"}
        assert ranks[0]["result"]["summary"] == ranks[1]["result"]["summary"]
    else:
        assert code == 0, output
        assert statuses == {"passed"}
        assert all(r["error"] is None for r in ranks.values())


class ZeroHead(PerExampleMLP):
    """A zero-initialised final layer: no gradient reaches the input from the output at init."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak
        nn.init.zeros_(self.net[2].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - x.mean(0) if self.leak else x)


def test_zero_initialised_final_layer_is_probed_at_the_last_layer_that_passes_gradient():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    healthy = _probe(ZeroHead(), x)
    assert not healthy.batch_leak and "`net.1`" in healthy.output_layout and healthy.probed_layer == "net.1"
    assert len(_probe(ZeroHead(leak=True), x).leaking_pairs) == 8 * 7
    assert _probe(PerExampleMLP(), x).probed_layer is None


class LitZeroHead(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = ZeroHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_says_which_layer_it_probed_and_skips_a_causality_it_cannot_check():
    x, y = torch.randn(32, 6), torch.arange(32) % 3
    probe = BatchLeakageProbe()
    trainer(callbacks=[probe], max_steps=1).fit(LitZeroHead(), DataLoader(TensorDataset(x, y), batch_size=8))
    assert probe.result.passed and "Probed at the output of layer `model.net.1`" in probe.result.summary
    probe = BatchLeakageProbe(causal=True)
    trainer(callbacks=[probe], max_steps=1).fit(LitZeroHead(), DataLoader(TensorDataset(x, y), batch_size=8))
    assert probe.result.status.value == "skipped" and "`time_dim=`" in probe.result.summary


class LitTinyLM(L.LightningModule):
    def __init__(self, diagonal: int | None = 1) -> None:
        super().__init__()
        self.lm = TinyLM(layers=2, diagonal=diagonal)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("diagonal", "fix"), [(None, "sees the whole future"), (2, "diagonal=1, not 2")], ids=["no_mask", "off_by_one"]
)
def test_causal_violations_fail_with_positions_and_the_mask_fix(diagonal, fix):
    x, y = _tokens(n=32)
    probe = BatchLeakageProbe()
    with pytest.raises(RecipeCheckError, match="outputs see the future") as info:
        trainer(callbacks=[probe], max_steps=1).fit(LitTinyLM(diagonal), DataLoader(TensorDataset(x, y), batch_size=8))
    result = info.value.result
    assert fix in result.hint
    assert result.details["causal_violations"][0]["output_position"] == 0
    assert "output at t=0 depends on input position(s) 1" in result.summary


def test_healthy_token_lm_passes_the_causal_check_through_fit():
    x, y = _tokens(n=32)
    probe = BatchLeakageProbe()
    trainer(callbacks=[probe], max_steps=1).fit(LitTinyLM(), DataLoader(TensorDataset(x, y), batch_size=8))
    assert probe.result.status is CheckStatus.PASSED
    assert probe.result.details["causal_checked"] is True


class Uint8Images(nn.Module):
    """Takes raw uint8 images and converts them itself, as GPU-side preprocessing does."""

    def __init__(self, batch_stats: bool = False):
        super().__init__()
        self.batch_stats = batch_stats
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        x = x.float() / 255
        if self.batch_stats:
            x = x - x.mean(0)
        return self.net(x)


class OneHotTokens(nn.Module):
    """Integer tokens turned into one-hot vectors: nothing can carry a gradient to the input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(10, 3)

    def forward(self, x):
        return self.net(F.one_hot(x, 10).float()).mean(1)


@pytest.mark.parametrize(("batch_stats", "leak"), [(False, False), (True, True)])
def test_uint8_inputs_are_probed_as_float_when_the_model_casts_them(batch_stats, leak):
    images = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8)
    report = probe_batch_leakage(Uint8Images(batch_stats), images, lambda m, x: m(x))
    assert report.batch_leak is leak
    assert any("probed as float" in p for p in report.probed)


def test_integer_inputs_the_model_needs_as_integers_are_skipped_with_the_reason():
    with pytest.raises(LeakageNotApplicable, match="no `nn.Embedding` reads its integer input"):
        probe_batch_leakage(OneHotTokens(), torch.randint(0, 10, (8, 5)), lambda m, x: m(x))
