"""Real models: tiny random-init models from the libraries our users train with, each in a LightningModule written
the way that library's users write one, plus classic training programs ported from the official PyTorch examples
with their models, losses, optimizers and learning rates unchanged (only sizes made small).

Healthy ones must pass every check and raise no monitor alert; each bug names the components that must catch it
and the words its message must contain. Nothing is downloaded (no ``from_pretrained``, no hub, no WikiText2): the
data are made here, procedurally, small and fast. Libraries are imported lazily inside the factories, so this module
imports without them; the tests skip a case whose library is missing. Everything is module level so it pickles
(DDP subprocesses can import it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import LightningLSTM, LightningTransformer, SequenceSampler, SimpleLSTM, Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.zoo import CHECKS, MONITORS  # noqa: F401 - MONITORS: test_real_models and the benchmark import it here

# -- procedural data -------------------------------------------------------------------------------------------

PAD = 0  # the padding id of every token model here; real tokens are 1..vocab-1


def counting_sequences(n: int, vocab: int = 48, min_len: int = 8, max_len: int = 16, seed: int = 0) -> list[Tensor]:
    """Variable-length token sequences that count up by a per-sequence stride (1-3) over the ids ``1..vocab-1``:
    the first two tokens determine the rest, so a causal LM can learn every position after the second."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start = int(torch.randint(0, vocab - 1, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        out.append(1 + (start + stride * torch.arange(length)) % (vocab - 1))
    return out


def token_stream(n_tokens: int, vocab: int = 48, seed: int = 0) -> Tensor:
    """One long stream of counting runs (random start, stride 1-3, run length 4-9): word-level-LM-style data."""
    g = torch.Generator().manual_seed(seed)
    parts, total = [], 0
    while total < n_tokens:
        length = int(torch.randint(4, 10, (1,), generator=g))
        start = int(torch.randint(0, vocab - 1, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        parts.append(1 + (start + stride * torch.arange(length)) % (vocab - 1))
        total += length
    return torch.cat(parts)[:n_tokens]


class ListDataset(Dataset):
    """A list of records as a map-style dataset."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def pad_right(seqs: list[Tensor], value: int) -> Tensor:
    """Right padding to the longest sequence, as Hugging Face tokenizers pad for causal LMs in training."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def causal_lm_collate(seqs: list[Tensor]) -> dict[str, Tensor]:
    """The Hugging Face causal-LM collate (``DataCollatorForLanguageModeling(mlm=False)``): ``labels = input_ids``
    with padding at -100; the model shifts inside its loss."""
    input_ids = pad_right(seqs, PAD)
    attention_mask = (input_ids != PAD).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pre_shifted_collate(seqs: list[Tensor]) -> dict[str, Tensor]:
    """The double-shift bug: the collate already shifts (``labels`` = next tokens, as for a hand-written loss) and
    the batch then goes to a Hugging Face LM, which shifts again: position t is trained on token t + 2."""
    input_ids = pad_right([s[:-1] for s in seqs], PAD)
    attention_mask = (input_ids != PAD).long()
    labels = pad_right([s[1:] for s in seqs], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def topic_sequences(n: int, vocab: int = 48, classes: int = 3, seed: int = 0) -> list[tuple[Tensor, int]]:
    """Sequence classification: each class owns a band of token ids; a sequence draws ~60% of its tokens from its
    class's band and the rest anywhere. Lengths vary (padding matters)."""
    g = torch.Generator().manual_seed(seed)
    band = (vocab - 1) // classes
    out = []
    for i in range(n):
        label = i % classes
        length = int(torch.randint(6, 17, (1,), generator=g))
        own = 1 + label * band + torch.randint(0, band, (length,), generator=g)
        anywhere = torch.randint(1, vocab, (length,), generator=g)
        pick = torch.rand(length, generator=g) < 0.6
        out.append((torch.where(pick, own, anywhere), label))
    return out


def classification_collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    input_ids = pad_right([s for s, _ in items], PAD)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD).long(),
        "labels": torch.tensor([label for _, label in items]),
    }


def shifted_pairs(n: int, length: int = 16, vocab: int = 48, seed: int = 0) -> TensorDataset:
    """Fixed-length counting sequences as ``(x, y)`` with ``y`` = ``x`` shifted by one (the shift in the batch)."""
    seqs = torch.stack(counting_sequences(n, vocab, length + 1, length + 1, seed))
    return TensorDataset(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous())


def blob_images(n: int, size: int, seed: int = 0) -> Tensor:
    """Smooth images in [0, 1]: one to three Gaussian blobs of random place, width and brightness. ``(n, 1, s, s)``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = torch.zeros(n, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            width = 1.5 + float(torch.rand(1, generator=g)) * size / 4
            bright = 0.4 + 0.6 * float(torch.rand(1, generator=g))
            images[i] += bright * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return images.clamp(0, 1)[:, None]


def shape_images(n: int, size: int = 28, seed: int = 0) -> TensorDataset:
    """MNIST-like ``(image, label)`` pairs in [0, 1]: a filled square, a cross or a ring, at random places, with
    soft edges. The VAE ignores the labels, as the official example does."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % 3
        cy, cx = (6 + torch.rand(2, generator=g) * (size - 12)).tolist()
        r = 3 + float(torch.rand(1, generator=g)) * 3
        if label == 0:
            d = torch.maximum((yy - cy).abs(), (xx - cx).abs()) - r
        elif label == 1:
            d = torch.minimum(
                torch.maximum((yy - cy).abs() - 1.2, (xx - cx).abs() - r),
                torch.maximum((xx - cx).abs() - 1.2, (yy - cy).abs() - r),
            )
        else:
            d = (((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() - r).abs() - 1.0
        images.append(torch.sigmoid(-2.0 * d))
        labels.append(label)
    return TensorDataset(torch.stack(images)[:, None], torch.tensor(labels))


# -- shared LightningModule conventions ---------------------------------------------------------------------------


class HFCausalLM(L.LightningModule):
    """How Hugging Face users train a causal LM in Lightning: the batch dict goes straight into the model, which
    returns its own loss (``labels = input_ids``, shifted inside, -100 ignored). AdamW as in the HF Trainer."""

    lr = 1e-3

    def __init__(self) -> None:
        super().__init__()
        self.model = self.build()

    def build(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


VOCAB = 48


class GPT2LM(HFCausalLM):
    """Healthy: ``GPT2LMHeadModel``, tiny config."""

    def build(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=32,
            pad_token_id=PAD,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
        )
        return GPT2LMHeadModel(config)


class LlamaLM(HFCausalLM):
    """Healthy: ``LlamaForCausalLM``, tiny config (RMSNorm, rotary positions, SwiGLU, no biases)."""

    def build(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            pad_token_id=PAD,
        )
        return LlamaForCausalLM(config)


class BertBidirectionalLM(HFCausalLM):
    """Bug: ``BertLMHeadModel`` without ``is_decoder=True`` (transformers only logs a hint about it) trained with
    next-token labels: every position attends to the whole sequence, including the token it must predict."""

    def build(self) -> nn.Module:
        from transformers import BertConfig, BertLMHeadModel

        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            pad_token_id=PAD,
        )
        return BertLMHeadModel(config)


class BertClassifier(L.LightningModule):
    """Healthy: ``BertForSequenceClassification`` on dict batches with attention masks and ``labels``, the model's
    own cross-entropy, AdamW with warm-up-free constant LR as in many fine-tuning scripts."""

    def __init__(self, classes: int = 3, lr: float = 5e-4) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            pad_token_id=PAD,
            num_labels=classes,
        )
        self.model = BertForSequenceClassification(config)
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(**batch)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class GPT2ShiftedTwice(GPT2LM):
    """Bug: GPT-2 fed labels the collate already shifted (:func:`pre_shifted_collate`); the model shifts again."""


def hf_lm_data(seed: int = 0, n: int = 256) -> DataLoader:
    return DataLoader(
        ListDataset(counting_sequences(n, VOCAB, seed=seed)), batch_size=16, shuffle=True, collate_fn=causal_lm_collate
    )


def hf_lm_val() -> DataLoader:
    return DataLoader(ListDataset(counting_sequences(64, VOCAB, seed=1)), batch_size=16, collate_fn=causal_lm_collate)


def pre_shifted_data() -> DataLoader:
    return DataLoader(
        ListDataset(counting_sequences(256, VOCAB, seed=0)), batch_size=16, shuffle=True, collate_fn=pre_shifted_collate
    )


def pre_shifted_val() -> DataLoader:
    return DataLoader(ListDataset(counting_sequences(64, VOCAB, seed=1)), batch_size=16, collate_fn=pre_shifted_collate)


def topic_data() -> DataLoader:
    return DataLoader(
        ListDataset(topic_sequences(384, VOCAB, seed=0)), batch_size=16, shuffle=True, collate_fn=classification_collate
    )


def topic_val() -> DataLoader:
    return DataLoader(ListDataset(topic_sequences(96, VOCAB, seed=1)), batch_size=32, collate_fn=classification_collate)


# -- x-transformers -----------------------------------------------------------------------------------------------


class XTransformerLM(L.LightningModule):
    """x-transformers as its README trains it: ``TransformerWrapper(attn_layers=Decoder(...))``, logits
    ``(N, T, V)``, cross-entropy over ``logits.transpose(1, 2)`` as its ``AutoregressiveWrapper`` computes it,
    with the shift in the batch (``x`` -> ``y``). Adam 1e-3."""

    encoder = False  # the bug variant swaps in an Encoder

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        from x_transformers import Decoder, Encoder, TransformerWrapper

        layers = (Encoder if self.encoder else Decoder)(dim=64, depth=2, heads=2)
        self.model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=32, attn_layers=layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).transpose(1, 2), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).transpose(1, 2), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class XTransformerEncoderLM(XTransformerLM):
    """Bug: an ``Encoder`` (bidirectional attention) as the ``attn_layers`` of an autoregressive LM."""

    encoder = True


def shifted_data() -> DataLoader:
    return DataLoader(shifted_pairs(256, seed=0), batch_size=16, shuffle=True)


def shifted_val() -> DataLoader:
    return DataLoader(shifted_pairs(64, seed=1), batch_size=16)


# -- litgpt -------------------------------------------------------------------------------------------------------


def _litgpt_model() -> nn.Module:
    import litgpt

    config = litgpt.Config(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=VOCAB, padded_vocab_size=VOCAB)
    return litgpt.GPT(config)


class LitGPTFinetune(L.LightningModule):
    """litgpt's fine-tuning convention (``litgpt/finetune/full.py``): dict batches with ``input_ids`` and
    ``labels`` (= ``input_ids``, -100 where not trained), ``logits = model(input_ids)`` and
    ``chunked_cross_entropy(logits[..., :-1, :], labels[..., 1:])``: the shift is in the loss. AdamW."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = _litgpt_model()
        self.lr = lr

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        from litgpt.utils import chunked_cross_entropy

        logits = self(batch["input_ids"])
        return chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def litgpt_collate(seqs: list[Tensor]) -> dict[str, Tensor]:
    """litgpt's ``get_sft_collate_fn``: ``input_ids`` padded with 0, ``labels`` padded with -100."""
    return {"input_ids": pad_right(seqs, PAD), "labels": pad_right(seqs, -100)}


def litgpt_data() -> DataLoader:
    return DataLoader(
        ListDataset(counting_sequences(256, VOCAB, seed=0)), batch_size=16, shuffle=True, collate_fn=litgpt_collate
    )


def litgpt_val() -> DataLoader:
    return DataLoader(ListDataset(counting_sequences(64, VOCAB, seed=1)), batch_size=16, collate_fn=litgpt_collate)


class LitGPTPretrain(L.LightningModule):
    """litgpt's pre-training convention (``litgpt/pretrain.py``): ``(x, y)`` with the shift in the batch
    (``input_ids[:, :-1]`` -> ``input_ids[:, 1:]``), plain ``chunked_cross_entropy(logits, targets)``."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = _litgpt_model()
        self.lr = lr

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        from litgpt.utils import chunked_cross_entropy

        input_ids, targets = batch
        loss = chunked_cross_entropy(self(input_ids), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        from litgpt.utils import chunked_cross_entropy

        input_ids, targets = batch
        self.log("val_loss", chunked_cross_entropy(self(input_ids), targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


# -- torch.nn.TransformerEncoder, time-major -----------------------------------------------------------------------


class PositionalEncoding(nn.Module):
    """The sinusoidal encoding of PyTorch's word_language_model example, for ``(T, N, E)`` inputs."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 64) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.pe[: x.size(0), :])


class TimeMajorTransformerLM(L.LightningModule):
    """Healthy: ``nn.TransformerEncoder`` with ``batch_first=False`` as a causal LM (PyTorch's word_language_model
    ``TransformerModel``): ``(T, N)`` token batches, a square subsequent mask, outputs ``(T, N, V)``; the loss
    flattens them. Adam 1e-3."""

    def __init__(self, dim: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = PositionalEncoding(dim, dropout=0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 128, dropout=0.1)  # batch_first=False, the default
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.Linear(dim, VOCAB)
        self.dim, self.lr = dim, lr

    def forward(self, src: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(src.size(0), device=src.device)
        h = self.pos(self.embed(src) * math.sqrt(self.dim))
        return self.decoder(self.encoder(h, mask=mask, is_causal=True))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).view(-1, VOCAB), y.view(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).view(-1, VOCAB), y.view(-1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def time_major_pairs_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*items, strict=True)
    return torch.stack(xs, dim=1), torch.stack(ys, dim=1)


def time_major_data() -> DataLoader:
    return DataLoader(shifted_pairs(256, seed=0), batch_size=16, shuffle=True, collate_fn=time_major_pairs_collate)


def time_major_val() -> DataLoader:
    return DataLoader(shifted_pairs(64, seed=1), batch_size=16, collate_fn=time_major_pairs_collate)


# -- Lightning's own demos ------------------------------------------------------------------------------------------


class StreamBlocks(Dataset):
    """What ``lightning.pytorch.demos.WikiText2`` yields (``(inputs, target)`` blocks of ``block_size`` tokens, the
    target shifted by one), over a procedural token stream instead of the downloaded text."""

    def __init__(self, n_tokens: int = 20 * 35 * 12 + 1, block_size: int = 35, seed: int = 0) -> None:
        self.data = token_stream(n_tokens, VOCAB, seed)
        self.block_size = block_size
        self.vocab_size = VOCAB

    def __len__(self) -> int:
        return len(self.data) // self.block_size - 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block_size
        end = start + self.block_size
        return self.data[start:end], self.data[start + 1 : end + 1]


class DemoLSTM(LightningLSTM):
    """Healthy: ``lightning.pytorch.demos.LightningLSTM`` unchanged (it carries ``self.hidden`` across batches, has
    no ``forward``, SGD lr 20), with its ``SimpleLSTM`` made small (the demo's default is 4 x 512 units) and its
    ``train_dataloader`` reading :class:`StreamBlocks` through the demo's ``SequenceSampler`` (batch 20)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = SimpleLSTM(vocab_size=VOCAB, ninp=64, nhid=64, nlayers=2, dropout=0.2)

    def prepare_data(self) -> None:  # the demo downloads WikiText2 here
        pass

    def train_dataloader(self) -> DataLoader:
        dataset = StreamBlocks()
        return DataLoader(dataset, batch_sampler=SequenceSampler(dataset, batch_size=20))


class DemoTransformer(LightningTransformer):
    """``lightning.pytorch.demos.LightningTransformer`` unchanged but for a small ``Transformer`` (the demo's default
    is 200 wide with a 33,278-token vocabulary) and no download, as the Lightning README trains it:
    ``LightningTransformer(vocab_size=dataset.vocab_size)`` on WikiText2-style ``(inputs, target)`` blocks.

    A bug, in the demo itself: ``forward(inputs, target)`` feeds ``target`` to the ``nn.Transformer`` decoder under
    a causal mask that lets position t see ``target[t]``, the token it is scored on, and the encoder sees all of
    ``inputs`` unmasked (``inputs[t + 1] == target[t]``). Its positional encoding also adds one position's vector
    to every position (``pe[:, x.size(1)]``), which is not what we test here."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.2)

    def prepare_data(self) -> None:  # the demo downloads WikiText2 here
        pass


def demo_transformer_data() -> DataLoader:
    return DataLoader(StreamBlocks(n_tokens=16 * 35 * 8 + 1, block_size=35), batch_size=16, shuffle=True)


# -- classic programs from pytorch/examples --------------------------------------------------------------------------


class VAE(L.LightningModule):
    """pytorch/examples ``vae/main.py``: 784-400-20 encoder, 20-400-784 sigmoid decoder, the loss summed over pixels
    and examples (``BCE(reduction='sum') + KLD``), Adam 1e-3, batch 128 of ``(image, label)`` with the label unused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: Tensor) -> Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @staticmethod
    def loss_function(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        data, _ = batch
        recon_batch, mu, logvar = self(data)
        loss = self.loss_function(recon_batch, data, mu, logvar)
        self.log("train_loss", loss / len(data))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        data, _ = batch
        recon_batch, mu, logvar = self(data)
        self.log("val_loss", self.loss_function(recon_batch, data, mu, logvar) / len(data))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def vae_data() -> DataLoader:
    return DataLoader(shape_images(512, seed=0), batch_size=128, shuffle=True)


def vae_val() -> DataLoader:
    return DataLoader(shape_images(128, seed=1), batch_size=128)


class SuperResolution(L.LightningModule):
    """pytorch/examples ``super_resolution/model.py`` (ESPCN-style: 5x5 conv 64, 3x3 64, 3x3 32, 3x3 r^2, pixel
    shuffle, orthogonal init) with its ``main.py`` loss and optimizer: ``nn.MSELoss``, Adam at the README's 1e-3.
    Inputs are low-resolution luminance images in [0, 1], targets the high-resolution ones."""

    def __init__(self, upscale_factor: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 64, (5, 5), (1, 1), (2, 2))
        self.conv2 = nn.Conv2d(64, 64, (3, 3), (1, 1), (1, 1))
        self.conv3 = nn.Conv2d(64, 32, (3, 3), (1, 1), (1, 1))
        self.conv4 = nn.Conv2d(32, upscale_factor**2, (3, 3), (1, 1), (1, 1))
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)
        nn.init.orthogonal_(self.conv1.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv2.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv3.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv4.weight)
        self.criterion = nn.MSELoss()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.pixel_shuffle(self.conv4(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, target = batch
        loss = self.criterion(self(inputs), target)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, target = batch
        self.log("val_loss", self.criterion(self(inputs), target))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def super_resolution_pairs(n: int, size: int = 16, seed: int = 0) -> TensorDataset:
    high = blob_images(n, size, seed)
    return TensorDataset(F.avg_pool2d(high, 2), high)


def super_resolution_data() -> DataLoader:
    return DataLoader(super_resolution_pairs(256, seed=0), batch_size=16, shuffle=True)


def super_resolution_val() -> DataLoader:
    return DataLoader(super_resolution_pairs(64, seed=1), batch_size=16)


class RNNModel(nn.Module):
    """pytorch/examples ``word_language_model/model.py`` ``RNNModel`` (LSTM): time-major, log-probabilities
    flattened to ``(T * N, V)``."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h: Any) -> Any:
    """Wraps hidden states in new Tensors, to detach them from their history (the example's helper)."""
    if isinstance(h, Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


class WordLanguageModel(L.LightningModule):
    """pytorch/examples ``word_language_model/main.py`` ported to Lightning: ``batchify`` columns, ``get_batch``
    ``(35, 20)`` time-major inputs and flattened ``(700,)`` targets, ``NLLLoss`` on ``(700, V)`` log-probabilities,
    the hidden state carried across batches in ``self.hidden`` and detached (``repackage_hidden``), SGD lr 20 with
    gradient clipping 0.25 (``Trainer(gradient_clip_val=0.25)``). Sizes made small (``--emsize 64 --nhid 64``)."""

    def __init__(self, ninp: int = 64, nhid: int = 64, nlayers: int = 2, lr: float = 20.0) -> None:
        super().__init__()
        self.model = RNNModel(VOCAB, ninp, nhid, nlayers, dropout=0.2)
        self.criterion = nn.NLLLoss()
        self.hidden: tuple[Tensor, Tensor] | None = None
        self.lr = lr

    def forward(self, data: Tensor, hidden: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        if hidden is None:
            hidden = self.model.init_hidden(data.size(1))
        return self.model(data, hidden)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        data, targets = batch
        if self.hidden is None:
            self.hidden = self.model.init_hidden(data.size(1))
        self.hidden = repackage_hidden(self.hidden)
        output, self.hidden = self(data, self.hidden)
        loss = self.criterion(output, targets)
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_start(self) -> None:
        self.hidden = None  # main.py calls init_hidden at the start of every epoch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class BpttBatches(Dataset):
    """``batchify`` + ``get_batch`` of the example: the stream cut into ``bsz`` columns, item i the ``(bptt, bsz)``
    window at row ``i * bptt`` and its targets one row down, flattened."""

    def __init__(self, n_tokens: int = 20 * 35 * 10 + 20, bsz: int = 20, bptt: int = 35, seed: int = 0) -> None:
        data = token_stream(n_tokens, VOCAB, seed)
        nbatch = data.size(0) // bsz
        self.source = data[: nbatch * bsz].view(bsz, -1).t().contiguous()
        self.bptt = bptt

    def __len__(self) -> int:
        return (len(self.source) - 1) // self.bptt

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.bptt
        seq_len = min(self.bptt, len(self.source) - 1 - start)
        return self.source[start : start + seq_len], self.source[start + 1 : start + 1 + seq_len].reshape(-1)


def bptt_data() -> DataLoader:
    return DataLoader(BpttBatches(), batch_size=None, shuffle=False)


class GraphConv(nn.Module):
    """pytorch/examples ``gcn/main.py`` ``GraphConv``: ``adj @ (x @ W) + b`` with sparse ``adj`` (and ``x``)."""

    def __init__(self, input_dim: int, output_dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(input_dim, output_dim))
        nn.init.xavier_normal_(self.kernel)
        self.bias = nn.Parameter(torch.zeros(output_dim)) if use_bias else None

    def forward(self, input_tensor: Tensor, adj_mat: Tensor) -> Tensor:
        support = torch.sparse.mm(input_tensor, self.kernel) if input_tensor.is_sparse else input_tensor @ self.kernel
        output = torch.sparse.mm(adj_mat, support)
        return output + self.bias if self.bias is not None else output


class GCN(L.LightningModule):
    """pytorch/examples ``gcn/main.py``: two graph convolutions, ReLU, dropout 0.5, ``log_softmax``; full-batch
    node classification, ``nll_loss`` on the training nodes, Adam lr 0.01 with weight decay 5e-4. The whole graph is
    one batch ``(features, adj, labels, train_mask)``, features and adjacency sparse COO."""

    def __init__(self, input_dim: int = 64, hidden_dim: int = 16, classes: int = 4, dropout_p: float = 0.5) -> None:
        super().__init__()
        self.gc1 = GraphConv(input_dim, hidden_dim)
        self.gc2 = GraphConv(hidden_dim, classes)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, features: Tensor, adj: Tensor) -> Tensor:
        x = self.dropout(F.relu(self.gc1(features, adj)))
        return torch.log_softmax(self.gc2(x, adj), dim=1)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        features, adj, labels, train_mask = batch
        loss = F.nll_loss(self(features, adj)[train_mask], labels[train_mask])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=5e-4)


def block_model_graph(nodes: int = 200, features: int = 64, classes: int = 4, seed: int = 0) -> tuple[Tensor, ...]:
    """A stochastic block model (edges 8x likelier inside a class) with sparse bag-of-words-like features (each class
    favours its own block of feature columns), the symmetric-normalised adjacency with self-loops
    ``D^-1/2 (A + I) D^-1/2`` and row-normalised features, both sparse COO, and a training mask of 60% of nodes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(nodes) % classes
    same = labels[:, None] == labels[None, :]
    prob = torch.where(same, 0.08, 0.01)
    upper = torch.triu(torch.rand(nodes, nodes, generator=g) < prob, diagonal=1)
    a = (upper | upper.T).float() + torch.eye(nodes)
    d = a.sum(1).rsqrt()
    adj = (d[:, None] * a * d[None, :]).to_sparse_coo()
    block = features // classes
    own = torch.zeros(nodes, features, dtype=torch.bool)
    for c in range(classes):
        own[labels == c, c * block : (c + 1) * block] = True
    x = (torch.rand(nodes, features, generator=g) < torch.where(own, 0.2, 0.03)).float()
    x = x / x.sum(1, keepdim=True).clamp(min=1)
    train_mask = torch.rand(nodes, generator=g) < 0.6
    return x.to_sparse_coo(), adj, labels, train_mask


def graph_data() -> DataLoader:
    return DataLoader(ListDataset([block_model_graph()]), batch_size=None)


class PolynomialRegression(L.LightningModule):
    """pytorch/examples ``regression/main.py``: fit ``y = x W + b`` on polynomial features ``[x, x^2, x^3, x^4]``
    with one ``nn.Linear(4, 1)`` (5 parameters), ``smooth_l1_loss``, plain SGD at lr 0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        batch_x, batch_y = batch
        loss = F.smooth_l1_loss(self(batch_x), batch_y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def polynomial_pairs(n: int = 2048, seed: int = 0) -> TensorDataset:
    """The example's ``get_batch``: ``x ~ N(0, 1)``, features ``x^1..x^4``, a random target polynomial with
    coefficients ``~ N(0, 5^2)``."""
    g = torch.Generator().manual_seed(seed)
    w_target = torch.randn(4, 1, generator=g) * 5
    b_target = torch.randn(1, generator=g) * 5
    x = torch.randn(n, generator=g)[:, None]
    features = torch.cat([x**i for i in range(1, 5)], 1)
    return TensorDataset(features, features @ w_target + b_target)


def polynomial_data() -> DataLoader:
    return DataLoader(polynomial_pairs(), batch_size=32, shuffle=True)


class TimeSequencePrediction(L.LightningModule):
    """pytorch/examples ``time_sequence_prediction/train.py``: two ``LSTMCell(51)`` and a linear head unrolled over
    sine waves, each position predicting the next value, ``nn.MSELoss``, full-batch LBFGS at lr 0.8, the model in
    ``.double()`` (:func:`time_sequence_model`). The zero states take the input's dtype (the example writes
    ``dtype=torch.double``, the same thing there) so that tests/test_dtypes.py can run it in every dtype. Not in the
    catalogue below: 300 steps of full-batch LBFGS (up to 20 evaluations each) took 150 s on 2 cores; tests/
    test_dtypes.py runs the program for its first steps."""

    def __init__(self, hidden: int = 51) -> None:
        super().__init__()
        self.hidden = hidden
        self.lstm1 = nn.LSTMCell(1, hidden)
        self.lstm2 = nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, input: Tensor, future: int = 0) -> Tensor:
        outputs = []
        h_t = torch.zeros(input.size(0), self.hidden, dtype=input.dtype, device=input.device)
        c_t, h_t2, c_t2 = torch.zeros_like(h_t), torch.zeros_like(h_t), torch.zeros_like(h_t)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):  # if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        return torch.cat(outputs, dim=1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input, target = batch
        loss = F.mse_loss(self(input), target)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        input, target = batch
        self.log("val_loss", F.mse_loss(self(input), target))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.8)


def time_sequence_model() -> TimeSequencePrediction:
    return TimeSequencePrediction().double()


def sine_waves(n: int = 100, length: int = 1000, period: float = 20.0, seed: int = 0) -> TensorDataset:
    """The example's ``generate_sine_wave.py``: ``sin((t + shift) / T)`` with a random integer shift in
    ``[-4T, 4T)`` per wave, float64; pairs ``(wave[:-1], wave[1:])``."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(int(-4 * period), int(4 * period), (n, 1), generator=g)
    waves = torch.sin((torch.arange(length) + shift) / period).double()
    return TensorDataset(waves[:, :-1].contiguous(), waves[:, 1:].contiguous())


def sine_wave_data() -> DataLoader:
    """The example trains on waves 3.. in one batch and tests on the first 3: 13 and 3 here, 40 steps long."""
    waves = sine_waves(n=16, length=41)
    return DataLoader(TensorDataset(*(t[3:] for t in waves.tensors)), batch_size=13)


def sine_wave_val() -> DataLoader:
    waves = sine_waves(n=16, length=41)
    return DataLoader(TensorDataset(*(t[:3] for t in waves.tensors)), batch_size=3)


# -- the catalogue ------------------------------------------------------------------------------------------------

#: CHECKS and MONITORS, the registered components by class name, come from tests/zoo.py (the registry's order)


def _graph_inputs(batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    return batch[0], batch[1]


def _graph_targets(batch: tuple[Tensor, ...]) -> Tensor:
    return batch[2]


def _demo_lstm_forward(module: L.LightningModule, x: Tensor) -> Tensor:
    """What ``LightningLSTM.training_step`` computes, from a fresh hidden state: ``(N * T, V)`` log-probabilities."""
    return module.model(x, module.model.init_hidden(x.size(0)))[0]


def _inputs_and_targets(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch[0], batch[1]


def _second(batch: tuple[Tensor, ...]) -> Tensor:
    return batch[1]


@dataclass(frozen=True)
class RealCase:
    """One real model.

    ``catches`` is empty for a healthy model (every check passes, no monitor alerts). For a bug it names the
    components any one of which must catch it (fail, before the first optimizer step), and ``cause`` holds words
    of which at least one must appear in the failing result's summary or hint (case-insensitive).
    ``may_skip`` maps a check or monitor to words one of which its ``skipped`` summary (for a monitor: the one
    warning with which it switches itself off) must contain where skipping is a right answer (it cannot apply to
    this model and says why, or names the argument to pass), e.g. a module without ``forward``.
    ``reads`` maps a check to words one of which its passing summary must contain: how the task must be read (an
    MSE loss is not an L1 one, even where the L1 reference happens to lie nearer the measured loss).
    ``requires`` names the importable libraries the case needs (the tests ``pytest.importorskip`` them).
    """

    name: str
    model: Callable[[], L.LightningModule]
    data: Callable[[], DataLoader] | None  # None: the module brings its own train_dataloader
    val: Callable[[], DataLoader] | None = None
    requires: tuple[str, ...] = ()
    catches: tuple[str, ...] = ()
    cause: tuple[str, ...] = ()
    may_skip: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    check_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def healthy(self) -> bool:
        return not self.catches

    def __str__(self) -> str:
        return self.name

    def loaders(self, with_val: bool = True) -> dict[str, Any]:
        """The loaders for ``Trainer.fit``."""
        out: dict[str, Any] = {}
        if self.data is not None:
            out["train_dataloaders"] = self.data()
        if with_val and self.val is not None:
            out["val_dataloaders"] = self.val()
        return out


HF = ("transformers",)
GRAPH_WORDS = ("graph", "adjacency", "node", "neighbo")

HEALTHY = [
    RealCase(
        "hf_gpt2_causal_lm",
        GPT2LM,
        hf_lm_data,
        hf_lm_val,
        HF,
        note="labels = input_ids, right padding at -100; the model shifts inside its loss",
    ),
    RealCase("hf_llama_causal_lm", LlamaLM, hf_lm_data, hf_lm_val, HF),
    RealCase("hf_bert_sequence_classifier", BertClassifier, topic_data, topic_val, HF),
    RealCase("x_transformers_decoder_lm", XTransformerLM, shifted_data, shifted_val, ("x_transformers",)),
    RealCase(
        "litgpt_finetune_lm",
        LitGPTFinetune,
        litgpt_data,
        litgpt_val,
        ("litgpt",),
        note="labels = input_ids with -100 padding; the loss shifts (logits[..., :-1], labels[..., 1:])",
    ),
    RealCase("litgpt_pretrain_lm", LitGPTPretrain, shifted_data, shifted_val, ("litgpt",)),
    RealCase("torch_transformer_time_major_lm", TimeMajorTransformerLM, time_major_data, time_major_val),
    RealCase(
        "lightning_demo_lstm",
        DemoLSTM,
        None,
        None,
        may_skip={name: ("forward",) for name in (*CHECKS, "PredictionDynamicsLogger", "FirstLayerVisualizer")},
        note="LightningLSTM has no forward (training_step calls self.model) and carries self.hidden: a check "
        "or monitor that needs forward skips (switches itself off), naming forward=",
    ),
    RealCase(
        "lightning_demo_lstm_forward_adapter",
        DemoLSTM,
        None,
        None,
        check_kwargs={"forward": _demo_lstm_forward},
        note="the same demo with the forward= adapter its missing forward calls for",
    ),
    RealCase(
        "pytorch_examples_vae",
        VAE,
        vae_data,
        vae_val,
        may_skip={"InitLossCheck": ("expected=",), "OverfitOneBatch": ("targets=", "expected=")},
        note="(image, label) batches, label unused; summed BCE + KLD: not a standard task loss",
    ),
    RealCase(
        "pytorch_examples_super_resolution",
        SuperResolution,
        super_resolution_data,
        super_resolution_val,
        reads={"InitLossCheck": ("mse", "l2", "squared")},
        note="nn.MSELoss on [0, 1] images: InitLossCheck must read the loss as MSE",
    ),
    RealCase(
        "pytorch_examples_word_lm_time_major",
        WordLanguageModel,
        bptt_data,
        None,
        trainer_kwargs={"gradient_clip_val": 0.25},
        note="(35, 20) time-major batches, (700,) flattened targets, carried self.hidden",
    ),
    RealCase(
        "pytorch_examples_gcn_sparse",
        GCN,
        graph_data,
        None,
        may_skip={
            "BatchLeakageProbe": GRAPH_WORDS,
            "PredictionDynamicsLogger": (*GRAPH_WORDS, "sparse", "inputs=", "forward="),
            "FirstLayerVisualizer": (*GRAPH_WORDS, "sparse", "inputs=", "forward="),
        },
        check_kwargs={"inputs": _graph_inputs, "targets": _graph_targets},
        note="full-batch graph; the adapters say which tensors are inputs (features, adj) and the labels",
    ),
    RealCase("pytorch_examples_polynomial_regression", PolynomialRegression, polynomial_data, None),
]

BUGS = [
    RealCase(
        "lightning_demo_transformer_sees_its_targets",
        DemoTransformer,
        demo_transformer_data,
        None,
        catches=("BatchLeakageProbe",),
        cause=("future", "causal", "target"),
        check_kwargs={"inputs": _inputs_and_targets, "targets": _second},
        note="LightningTransformer's forward(inputs, target) feeds the target to its decoder under a causal "
        "mask that includes position t itself (and its encoder, unmasked, sees inputs[t + 1] = target[t]): "
        "position t is scored on a token it sees. On a stream where no causal model can go below ~0.76 nats "
        "per token (each run's first token and stride are unpredictable) it reaches 0.10 in 300 steps. "
        "Its forward needs both tensors, so the case passes inputs= / targets= adapters.",
    ),
    RealCase(
        "hf_bert_lm_without_is_decoder",
        BertBidirectionalLM,
        hf_lm_data,
        hf_lm_val,
        HF,
        catches=("BatchLeakageProbe",),
        cause=("future", "causal"),
        note="bidirectional attention trained with next-token labels: position t sees token t + 1",
    ),
    RealCase(
        "hf_gpt2_labels_shifted_twice",
        GPT2ShiftedTwice,
        pre_shifted_data,
        pre_shifted_val,
        HF,
        catches=CHECKS,
        cause=("shifted twice", "twice"),
        note="the collate shifts labels and the HF model shifts again: position t learns token t + 2",
    ),
    RealCase(
        "x_transformers_encoder_as_lm",
        XTransformerEncoderLM,
        shifted_data,
        shifted_val,
        ("x_transformers",),
        catches=("BatchLeakageProbe",),
        cause=("future", "causal"),
    ),
]

ALL = HEALTHY + BUGS
