"""Task reading in one place (diagnostics/task.py, labels.py, alignment.py): which target each output position is
trained towards, read from the gradient of the user's own loss, and every check reading next-token training the
same way whether the shift is in the batch or inside the model (the Hugging Face / litgpt ``labels = input_ids``
convention)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_recipe import BatchLeakageProbe, InitLossCheck, OverfitOneBatch, RecipeCheckError, RecipeWarning
from lightning_recipe.diagnostics.alignment import (
    Alignment,
    gradient_at_outputs,
    may_shift,
    read_alignment,
    trained_classes,
)
from lightning_recipe.diagnostics.labels import conflicting_labels, decode_predictions
from lightning_recipe.diagnostics.task import is_probabilities
from tests.models import trainer
from tests.zoo import CausalLM

# -- reading the alignment from a loss's gradient -----------------------------------------------------------


def _grad(loss_fn, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(logits), logits)
    return grad


def _sequences(n: int = 4, length: int = 10, vocab: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab


def _shift_inside(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Hugging Face causal-LM loss: logits at t against labels at t + 1, -100 ignored."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_trained_classes_are_the_targets_of_a_cross_entropy_gradient():
    logits = torch.randn(6, 5)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    grad = _grad(lambda o: F.cross_entropy(o, targets, label_smoothing=0.1), logits)
    assert trained_classes(grad, targets.shape).tolist() == targets.tolist()


def test_rows_without_gradient_read_minus_one():
    targets = torch.tensor([1, -100, 3])
    grad = _grad(lambda o: F.cross_entropy(o, targets), torch.randn(3, 4))
    assert trained_classes(grad, targets.shape).tolist() == [1, -1, 3]


def test_shift_inside_the_loss_is_next_token_training():
    tokens = _sequences()
    labels = tokens.clone()
    labels[0, 7:] = -100  # right padding
    a = read_alignment(_grad(lambda o: _shift_inside(o, labels), torch.randn(4, 10, 20)), labels, tokens)
    assert (a.target_shift, a.time_dim, a.input_shift, a.next_token, a.shifted_twice) == (1, 1, 1, True, False)


def test_shift_in_the_batch_is_next_token_training_with_no_target_shift():
    seq = _sequences(length=11)
    x, y = seq[:, :-1], seq[:, 1:]
    a = read_alignment(_grad(lambda o: F.cross_entropy(o.flatten(0, 1), y.flatten()), torch.randn(4, 10, 20)), y, x)
    assert (a.target_shift, a.input_shift, a.next_token) == (0, 1, True)


def test_labels_shifted_by_the_user_and_again_by_the_model_read_as_shifted_twice():
    tokens = _sequences()
    labels = torch.cat([tokens[:, 1:], torch.full((4, 1), -100)], 1)  # the user shifted them already
    a = read_alignment(_grad(lambda o: _shift_inside(o, labels), torch.randn(4, 10, 20)), labels, tokens)
    assert (a.target_shift, a.input_shift, a.shifted_twice) == (1, 2, True)


def test_time_major_flattened_language_model_reads_its_time_dim():
    seq = _sequences(n=5, length=9).T.contiguous()  # (T+1, N) time-major, as the word-level LM example
    x, y = seq[:-1], seq[1:].reshape(-1)
    a = read_alignment(_grad(lambda o: F.cross_entropy(o, y), torch.randn(40, 20)), y, x)
    assert (a.target_shift, a.input_shift, a.input_time_dim) == (0, 1, 0)


def test_masked_language_model_is_not_next_token_training():
    tokens = _sequences()
    inputs, labels = tokens.clone(), torch.full_like(tokens, -100)
    inputs[:, 3], labels[:, 3] = 19, tokens[:, 3]  # [MASK] at position 3, predicted there
    a = read_alignment(
        _grad(lambda o: F.cross_entropy(o.flatten(0, 1), labels.flatten()), torch.randn(4, 10, 20)), labels, inputs
    )
    assert (a.target_shift, a.input_shift, a.next_token) == (0, None, False)


def test_a_loss_that_is_not_cross_entropy_over_the_targets_is_not_read():
    tokens = _sequences()
    grad = _grad(lambda o: o.pow(2).mean(), torch.randn(4, 10, 20))  # pushes every logit towards 0
    assert read_alignment(grad, tokens, tokens) is None
    assert read_alignment(grad, tokens.float(), tokens) is None  # float targets: not class labels


def test_apply_cuts_outputs_targets_and_inputs_so_positions_face_each_other():
    tokens = _sequences()
    logits = torch.randn(4, 10, 20)
    out, tgt, inp = Alignment(target_shift=1, input_shift=1).apply(logits, tokens, tokens)
    assert out.shape == (4, 9, 20) and torch.equal(tgt, tokens[:, 1:]) and torch.equal(inp, tokens[:, :-1])
    flat, tgt, _ = Alignment(target_shift=1).apply(logits.reshape(40, 20), tokens)
    assert torch.equal(flat, logits[:, :-1].reshape(36, 20)) and torch.equal(tgt, tokens[:, 1:])
    same = Alignment().apply(logits, tokens, tokens)
    assert same[0] is logits and same[1] is tokens


def test_gradient_at_outputs_finds_the_head_the_loss_is_computed_from():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
    tokens = _sequences()
    grad = gradient_at_outputs(model, lambda: _shift_inside(model(tokens), tokens), (4, 10, 20))
    assert grad is not None and bool((grad[:, -1] == 0).all()) and bool((grad[:, :-1] != 0).any())
    assert model[1].weight.grad is None  # nothing written to .grad
    assert gradient_at_outputs(model, lambda: _shift_inside(model(tokens), tokens), (4, 10, 7)) is None


def test_only_targets_with_positions_are_read_for_a_shift():
    tokens = _sequences()
    assert may_shift(tokens, tokens)  # (N, T) per-position labels
    assert may_shift(tokens.T.reshape(-1), tokens.T)  # flattened time-major labels beside their tokens
    assert not may_shift(torch.tensor([0, 2, 1, 1]), torch.randn(4, 3))  # a classifier: one label per example
    assert not may_shift(tokens.float(), tokens)  # regression targets


def test_one_probabilities_test():
    assert is_probabilities(torch.softmax(torch.randn(3, 4), -1))
    assert not is_probabilities(torch.randn(3, 4))
    assert is_probabilities(torch.softmax(torch.randn(2, 4, 5), 1), dim=1)
    assert not is_probabilities(torch.ones(3, 1))  # one entry: nothing to sum over


def test_time_major_conflicts_are_read_per_position():
    # two sequences share their first token and then differ: position 0's label is undecidable for both
    x = torch.tensor([[1, 1], [2, 3], [4, 5]])  # (T, N) time-major
    y = torch.tensor([[2, 3], [4, 5], [6, 7]]).reshape(-1)
    conflicts = conflicting_labels(x, y, time_dim=0)
    assert conflicts.tolist() == [True, True, False, False, False, False]
    decoded = decode_predictions(torch.nn.functional.one_hot(y, 8).float(), y, x, time_dim=0)
    assert decoded.num_ambiguous == 2 and decoded.correct == decoded.total


# -- checks through a real Trainer: the Hugging Face convention, written without Hugging Face ---------------


class TokenDicts(Dataset):
    """Dict batches as a Hugging Face collator makes them: ``input_ids``, ``attention_mask``, ``labels`` =
    ``input_ids`` with right padding at -100. ``shift_labels`` makes the collator shift them itself (the bug
    when the model shifts too)."""

    def __init__(self, n: int = 64, length: int = 12, vocab: int = 16, shift_labels: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        start, stride = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length + 1)) % vocab
        self.lengths = torch.randint(length - 3, length + 1, (n,), generator=g)
        self.length, self.shift_labels = length, shift_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq, keep = self.ids[i], int(self.lengths[i])
        ids = seq[: self.length].clone()
        mask = (torch.arange(self.length) < keep).long()
        ids[keep:] = 0
        labels = (seq[1:] if self.shift_labels else seq[: self.length]).clone()
        labels[keep:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ShiftInsideLM(CausalLM):
    """``forward(input_ids, attention_mask, labels)`` returns ``{"logits", "loss"}`` and shifts inside its loss,
    as ``GPT2LMHeadModel`` does; ``training_step`` returns ``self(**batch)["loss"]``."""

    def forward(self, input_ids, attention_mask=None, labels=None) -> dict[str, Any]:  # type: ignore[override]
        logits = super().forward(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = _shift_inside(logits, labels)
        return out

    def training_step(self, batch, batch_idx):
        loss = self(**batch)["loss"]
        self.log("train/loss", loss)
        return loss


class BidirectionalShiftInsideLM(ShiftInsideLM):
    """The same language model without its causal mask: every position sees the token it must predict."""

    def mask(self, t: int) -> torch.Tensor | None:
        return None


def _fit(model, check, shift_labels: bool = False):
    loader = DataLoader(TokenDicts(shift_labels=shift_labels), batch_size=16, shuffle=True)
    trainer(max_steps=1, callbacks=[check]).fit(model, loader)
    return check.result


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_overfit_one_batch_reads_labels_as_the_model_shifts_them():
    result = _fit(ShiftInsideLM(), OverfitOneBatch())
    assert result.passed, result.format()
    assert result.details["alignment"]["target_shift"] == 1
    assert result.details["accuracy"] == 1.0


def test_init_loss_check_passes_a_healthy_shift_inside_lm():
    result = _fit(ShiftInsideLM(), InitLossCheck())
    assert result.passed, result.format()


def test_leakage_probe_checks_causality_when_the_model_shifts_inside_its_loss():
    result = _fit(ShiftInsideLM(), BatchLeakageProbe())
    assert result.passed and result.details["causal_checked"], result.format()
    assert "input token t + 1 (the shift is inside the model)" in result.details["causal_reason"]


def test_leakage_probe_catches_a_bidirectional_model_trained_as_a_language_model():
    check = BatchLeakageProbe()
    with pytest.raises(RecipeCheckError, match="outputs see the future"):
        _fit(BidirectionalShiftInsideLM(), check)
    assert check.result.details["causal_checked"]


def test_labels_shifted_twice_are_named():
    check = OverfitOneBatch()
    with pytest.raises(RecipeCheckError, match="labels shifted twice") as caught:
        _fit(ShiftInsideLM(), check, shift_labels=True)
    assert "input token t + 2" in caught.value.result.summary
    assert "labels = input_ids" in caught.value.result.hint


def test_dynamics_logger_reads_its_fixed_batch_as_the_model_shifts_it():
    from lightning_recipe import PredictionDynamicsLogger

    logger = PredictionDynamicsLogger(every_n_steps=1, num_examples=8)
    data = TokenDicts()
    loader = DataLoader(data, batch_size=8)
    trainer(max_steps=2, callbacks=[logger]).fit(ShiftInsideLM(), loader, loader)
    labels = torch.stack([data[i]["labels"] for i in range(8)])
    expected = labels[:, 1:][labels[:, 1:] != -100]
    assert logger._alignment is not None and logger._alignment.target_shift == 1
    assert torch.equal(logger._reading.targets, expected)


class NoForwardWrapper(L.LightningModule):
    """The way many Hugging Face users write a LightningModule: no ``forward``, ``self.model(**batch)`` in
    ``training_step``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch)["loss"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("inner", "passes"), [(ShiftInsideLM, True), (BidirectionalShiftInsideLM, False)], ids=["causal", "bidirectional"]
)
def test_a_module_without_forward_is_read_through_the_model_it_wraps(inner, passes):
    checks = [InitLossCheck(on_fail="warn"), OverfitOneBatch(on_fail="warn"), BatchLeakageProbe(on_fail="warn")]
    loader = DataLoader(TokenDicts(), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)  # the bidirectional model's failure is warned
        trainer(max_steps=1, callbacks=checks).fit(NoForwardWrapper(inner()), loader)
    statuses = [c.result.status.value for c in checks]
    assert statuses == ["passed", "passed", "passed" if passes else "failed"], [c.result.format() for c in checks]


def token_dicts_loader() -> DataLoader:
    return DataLoader(TokenDicts(), batch_size=16)


def shifted_twice_loader() -> DataLoader:
    return DataLoader(TokenDicts(shift_labels=True), batch_size=16)


@pytest.mark.parametrize(
    ("data", "fails"), [("token_dicts_loader", ()), ("shifted_twice_loader", ("InitLossCheck", "OverfitOneBatch"))]
)
def test_next_token_reading_under_ddp(tmp_path, data, fails):
    """Every rank reads the shift from its own batch and the verdicts agree."""
    from tests.ddp import run_ddp

    checks = ["InitLossCheck", "OverfitOneBatch", "BatchLeakageProbe"]
    code, ranks, output = run_ddp(
        tmp_path,
        model="tests.test_task:ShiftInsideLM",
        data=f"tests.test_task:{data}",
        check=checks,
        check_kwargs={"on_fail": "warn"},
    )
    assert code == 0 and set(ranks) == {0, 1}, output
    for rank in ranks.values():
        statuses = {r["name"]: r["status"] for r in rank["results"]}
        assert statuses == {c: "failed" if c in fails else "passed" for c in checks}, rank["results"]
        causal = next(r for r in rank["results"] if r["name"] == "BatchLeakageProbe")["details"]["causal_checked"]
        assert causal
