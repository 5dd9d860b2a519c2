"""Tiny healthy transformer models trained long enough to learn, written the way their users write them, for the
monitors' false-alarm measurements (``benchmarks/false_alarms.py``) and tests.

- :class:`BertClassifier`: ``transformers.BertForSequenceClassification`` (hidden 64, 2 layers, 2 heads, vocab
  100) on dict batches ``{"input_ids", "attention_mask", "labels"}`` with right padding; AdamW.
- :class:`EncoderLM`: ``nn.TransformerEncoder`` with a causal mask as a next-token language model, ``(x, y)``
  batches with ``y`` = ``x`` shifted by one (the shift in the batch); AdamW. :class:`GPT2LM`: the same with a
  tiny Hugging Face ``GPT2LMHeadModel``.

Both tasks are learnable: a healthy run reaches high validation accuracy in a few hundred steps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB = 100
LENGTH = 16
PAD = 0
CLS = 1
MARKERS = (2, 3)  # a sequence holds exactly one of them: its class


class MarkerSequences(Dataset):
    """Sequences of random tokens (4..99) of length 8-16, right-padded, starting with CLS, holding a few marker
    tokens 2 and 3 at random positions; the class is which marker occurs more often (counts differ by 1 or 2).
    Returned as Hugging Face-style dicts."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(8, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.labels = torch.randint(0, 2, (n,), generator=g)
        for i in range(n):
            fewer = int(torch.randint(0, 3, (), generator=g))
            more = fewer + int(torch.randint(1, 3, (), generator=g))
            places = 1 + torch.randperm(int(lengths[i]) - 1, generator=g)[: fewer + more]
            winner, loser = MARKERS[int(self.labels[i])], MARKERS[1 - int(self.labels[i])]
            self.ids[i, places[:more]] = winner
            self.ids[i, places[more:]] = loser
        self.ids[:, 0] = CLS
        self.ids[self.mask == 0] = PAD

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def marker_loaders(seed: int = 0, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of :class:`MarkerSequences`: 512 and 128 examples."""
    train = DataLoader(MarkerSequences(512, seed), batch_size=batch_size, shuffle=True)
    return train, DataLoader(MarkerSequences(128, seed + 1000), batch_size=64)


class BertClassifier(L.LightningModule):
    """A tiny random-init ``BertForSequenceClassification``, its loss from the model (``labels=``)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=LENGTH,
            num_labels=2,
            pad_token_id=PAD,
        )
        self.model = BertForSequenceClassification(config)
        self.lr = lr
        self.val_correct = 0
        self.val_total = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.val_correct += int((logits.argmax(-1) == batch["labels"]).sum())
        self.val_total += len(batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def lm_data(n: int, seed: int, vocab: int = 32, length: int = 16) -> torch.Tensor:
    """Token sequences from a fixed random first-order Markov chain with peaked transitions (learnable):
    ``(n, length + 1)``; a batch is ``(x, y) = (s[:, :-1], s[:, 1:])``."""
    g = torch.Generator().manual_seed(1234)  # the chain is the same for every split
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probabilities = logits.softmax(-1)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(probabilities[tokens[:, t]], 1, generator=g)[:, 0]
    return tokens


class _Shifted(Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


def lm_loaders(seed: int = 0, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of next-token batches from :func:`lm_data`: 512 and 128 sequences."""
    train = DataLoader(_Shifted(lm_data(512, seed)), batch_size=batch_size, shuffle=True)
    return train, DataLoader(_Shifted(lm_data(128, seed + 1000)), batch_size=64)


class EncoderLM(L.LightningModule):
    """``nn.TransformerEncoder`` (2 layers, d 64, 2 heads, batch_first) with a causal mask, as a next-token LM."""

    def __init__(self, vocab: int = 32, dim: int = 64, length: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.position[:t], mask=mask, is_causal=True)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class GPT2LM(EncoderLM):
    """A tiny random-init Hugging Face ``GPT2LMHeadModel`` (2 layers, d 64, 2 heads) trained on the same
    next-token batches (the shift in the batch; the model's own ``labels=`` shift is another helper's part)."""

    def __init__(self, vocab: int = 32, length: int = 16, lr: float = 1e-3) -> None:
        L.LightningModule.__init__(self)
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=64, n_layer=2, n_head=2)
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits
