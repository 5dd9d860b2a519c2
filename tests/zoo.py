"""The bug zoo: small models with realistic injected bugs that a named check must catch, and healthy
models with the traps of DESIGN.md (BatchNorm, batch-on-dim-1 RNNs, token models, imbalanced classes with a
good bias, regression with a mean bias, gradient accumulation, dict batches, ``self.log``) that every
check must pass. Data is made here, procedurally. Everything is module level so it pickles."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_recipe import registry
from tests.models import cluster_data

# -- data ----------------------------------------------------------------------------------------


def shapes_data(n: int = 192, size: int = 16, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    """1-channel images of three shapes (square, cross, ring) at random places, plus noise.
    ``scale=255`` gives raw pixel values, as an unnormalised pipeline would."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % 3
        cy, cx = (torch.randint(5, size - 5, (2,), generator=g)).tolist()
        if label == 0:
            img = ((yy - cy).abs() <= 3) & ((xx - cx).abs() <= 3)
        elif label == 1:
            bar = ((yy - cy).abs() <= 1) & ((xx - cx).abs() <= 4)
            img = bar | (((xx - cx).abs() <= 1) & ((yy - cy).abs() <= 4))
        else:
            r = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
            img = (r >= 2.5) & (r <= 4.0)
        img = img.float() + 0.1 * torch.randn(size, size, generator=g)
        images.append(img)
        labels.append(label)
    x = torch.stack(images)[:, None]
    x = (x - 0.25) / 0.45 if scale == 1.0 else x.clamp(0, 1) * scale
    return TensorDataset(x, torch.tensor(labels))


def token_data(n: int = 128, length: int = 12, vocab: int = 16, seed: int = 0) -> TensorDataset:
    """Next-token training: each sequence counts up by a fixed stride mod ``vocab``; the target is the input
    shifted by one position."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + stride * torch.arange(length + 1)) % vocab
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def tagging_data(n: int = 128, length: int = 10, vocab: int = 12, seed: int = 0) -> TensorDataset:
    """Per-position tags that depend on the next token too (a bidirectional task): tag = x_t > x_{t+1}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
    return TensorDataset(x, (x > nxt).long())


def sequence_data(n: int = 128, length: int = 8, features: int = 4, seed: int = 0) -> TensorDataset:
    """Sequences ``(N, T, F)`` whose class is which feature has the largest sum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    return TensorDataset(x, x.sum(1).argmax(1))


def regression_data(n: int = 256, in_dim: int = 6, mean: float = 50.0, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, 1, generator=g)
    return TensorDataset(x, x @ w + mean + 0.1 * torch.randn(n, 1, generator=g))


def imbalanced_data(n: int = 320, in_dim: int = 8, seed: int = 0) -> TensorDataset:
    """Four classes with priors 0.7, 0.1, 0.1, 0.1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * 7 + [1, 2, 3]).repeat(n // 10)
    centers = torch.randn(4, in_dim, generator=g) * 3
    return TensorDataset(centers[y] + torch.randn(n, in_dim, generator=g), y)


def multilabel_data(n: int = 256, in_dim: int = 8, labels: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, labels, generator=g)
    return TensorDataset(x, (x @ w > 0).float())


def segmentation_data(n: int = 64, size: int = 12, seed: int = 0) -> TensorDataset:
    """Pixels brighter than their neighbourhood's mean are class 1, a dark band is class 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = (x[:, 0] > 0.5).long()
    y[:, :, :2] = 2
    x[:, :, :, :2] -= 2.0
    return TensorDataset(x, y)


class DictDataset(Dataset):
    """Yields ``{"pixels": x, "answer": y, "id": i}``: keys our defaults do not know."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.base[i]
        return {"pixels": x, "answer": y, "id": i}


def time_major_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches sequences as ``(T, N, F)`` for ``batch_first=False`` RNNs."""
    xs, ys = zip(*items, strict=True)
    return torch.stack(xs, dim=1), torch.stack(ys)


def _loader(dataset: Dataset, batch_size: int = 32, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, **kwargs)


# -- a common base: self.log in training_step, Adam ------------------------------------------------


class ZooModule(L.LightningModule):
    lr = 3e-3

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.ndim == 3:  # (N, T, C) per-position classes
            return F.cross_entropy(out.flatten(0, 1), y.flatten())
        return F.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# -- healthy models -------------------------------------------------------------------------------


class MLP(ZooModule):
    def __init__(self, in_dim: int = 8, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class BatchNormCNN(ZooModule):
    """Conv + BatchNorm + dropout: BatchNorm mixes the batch in train mode by design."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TimeMajorLSTM(ZooModule):
    """``nn.LSTM(batch_first=False)`` fed ``(T, N, F)`` batches: the batch is on dim 1."""

    def __init__(self, features: int = 4, hidden: int = 24, classes: int = 4) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


class CausalLM(ZooModule):
    """A small decoder-only transformer on tokens, next-token targets, with a correct causal mask."""

    mask_diagonal = 1  # positions > t are masked

    def __init__(self, vocab: int = 16, dim: int = 32, length: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def mask(self, t: int) -> torch.Tensor | None:
        return torch.triu(torch.full((t, t), float("-inf")), diagonal=self.mask_diagonal)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        return self.head(self.blocks(h, mask=self.mask(t)))


class BiTagger(ZooModule):
    """A bidirectional LSTM tagger: each tag depends on the next token, and that is right."""

    def __init__(self, vocab: int = 12, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class ImbalancedWithPriorBias(MLP):
    """Imbalanced classes with the final bias set to the log class priors ("init well")."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([0.7, 0.1, 0.1, 0.1]).log())


class RegressionWithMeanBias(ZooModule):
    """Targets around 50, final bias initialised to the target mean."""

    def __init__(self, in_dim: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, 1))
        with torch.no_grad():
            self.net[-1].bias.fill_(50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y)


class MultilabelMLP(ZooModule):
    def __init__(self, in_dim: int = 8, labels: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, y)


class Segmenter(ZooModule):
    """Per-pixel classes: outputs ``(N, C, H, W)``, targets ``(N, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DictBatchMLP(MLP):
    """Batches are dicts with unusual keys; the checks get ``inputs=`` / ``targets=`` adapters."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self(batch["pixels"]), batch["answer"])
        self.log("train_loss", loss)
        return {"loss": loss}


# -- bugs -----------------------------------------------------------------------------------------


class HugeFinalInit(MLP):
    """Final layer initialised with std 3 instead of ~1/sqrt(fan_in): confident wrong logits at init."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.normal_(self.head.weight, std=3.0)


class LargeFinalBias(MLP):
    """A final bias of 8 on one class: the model is sure of class 0 before seeing data."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.head.bias[0] = 8.0


class RawPixelsMLP(ZooModule):
    """Images fed as 0..255 pixel values with no normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UnshiftedTiedLM(ZooModule):
    """Targets are the inputs themselves (forgot to shift), and tied embeddings can copy the input: the loss
    at init is far below what any honest model could reach."""

    def __init__(self, vocab: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) @ self.embed.weight.T

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, _ = batch
        return self.loss(self(tokens), tokens)  # the bug: the target is the input, not the next token


class DoubleSoftmax(MLP):
    """Softmax in forward, then cross_entropy, which applies log-softmax again: the loss has a floor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).softmax(dim=-1)


class DoubleSigmoid(MultilabelMLP):
    """Sigmoid in forward, then BCE-with-logits, which applies the sigmoid again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sigmoid()


class ClampedLoss(MLP):
    """The loss is clamped from below 'for stability': it can never go under 1.0."""

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y).clamp(min=1.0)


class WeightsFrozenByName(MLP):
    """Meant to freeze a backbone, froze every parameter named '*weight': only biases can learn."""

    def __init__(self) -> None:
        super().__init__()
        for name, p in self.named_parameters():
            if "weight" in name:
                p.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class ZeroInit(MLP):
    """Every layer initialised to zero: no gradient ever reaches the hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            nn.init.zeros_(p)


class DetachedTrunk(ZooModule):
    """The features are detached before a narrow head: only the 2-unit head can learn."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.head = nn.Linear(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).detach())


class ViewInsteadOfPermute(ZooModule):
    """Wants ``(T, N, F)`` for the LSTM and reshapes ``(N, T, F)`` with ``view``: examples get mixed."""

    def __init__(self, features: int = 4, hidden: int = 24, classes: int = 4) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, f = x.shape
        out, _ = self.rnn(x.view(t, n, f))  # the bug: should be x.permute(1, 0, 2)
        return self.head(out[-1])


class BatchStatsNormalisation(MLP):
    """Normalises features with statistics over the batch axis inside ``forward`` (also in eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(0)) / (x.std(0) + 1e-5)
        return super().forward(x)


class SoftmaxOverBatch(MLP):
    """``log_softmax(dim=0)`` in forward: normalises over examples instead of classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(super().forward(x), dim=0)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(out, y)


class AttentionOverBatch(ZooModule):
    """``nn.MultiheadAttention`` defaults to ``batch_first=False`` and is fed ``(N, T, E)``: it attends across
    the batch."""

    def __init__(self, features: int = 4, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(features, dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


class UnmaskedLM(CausalLM):
    """Next-token training with no causal mask: position t sees the future."""

    def mask(self, t: int) -> torch.Tensor | None:
        return None


class OffByOneMaskLM(CausalLM):
    """A causal mask with the wrong diagonal: position t also sees t + 1, the token it must predict."""

    mask_diagonal = 2


# -- the catalogue --------------------------------------------------------------------------------

#: the registered checks and monitors by class name, in the registry's order (lightning_recipe/registry.py)
CHECKS = tuple(cls.__name__ for cls in registry.CHECKS.values())


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], L.LightningModule]
    data: Callable[[], DataLoader]
    catches: str | None = None  # the check that must fail; None: every check must pass
    hint_contains: str = ""  # a word the failing check's hint must contain (case-insensitive)
    check_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def clusters() -> DataLoader:
    return _loader(cluster_data())


def shapes() -> DataLoader:
    return _loader(shapes_data())


def raw_shapes() -> DataLoader:
    return _loader(shapes_data(scale=255.0))


def tokens() -> DataLoader:
    return _loader(token_data(), batch_size=16)


def tags() -> DataLoader:
    return _loader(tagging_data(), batch_size=16)


def sequences() -> DataLoader:
    return _loader(sequence_data())


def time_major_sequences() -> DataLoader:
    return _loader(sequence_data(), collate_fn=time_major_collate)


def regression() -> DataLoader:
    return _loader(regression_data())


def imbalanced() -> DataLoader:
    return _loader(imbalanced_data())


def multilabel() -> DataLoader:
    return _loader(multilabel_data())


def segmentation() -> DataLoader:
    return _loader(segmentation_data(), batch_size=8)


def dict_batches() -> DataLoader:
    return _loader(DictDataset(cluster_data()))


def _pixels(batch: dict[str, Any]) -> torch.Tensor:
    return batch["pixels"]


def _answer(batch: dict[str, Any]) -> torch.Tensor:
    return batch["answer"]


HEALTHY = [
    Case("mlp_clusters", MLP, clusters),
    Case("batchnorm_dropout_cnn", BatchNormCNN, shapes),
    Case("lstm_batch_on_dim1", TimeMajorLSTM, time_major_sequences),
    Case("causal_transformer_lm", CausalLM, tokens),
    Case("bidirectional_tagger", BiTagger, tags),
    Case("imbalanced_with_prior_bias", ImbalancedWithPriorBias, imbalanced),
    Case("regression_with_mean_bias", RegressionWithMeanBias, regression),
    Case("multilabel_bce", MultilabelMLP, multilabel),
    Case("segmentation", Segmenter, segmentation),
    Case("gradient_accumulation", MLP, clusters, trainer_kwargs={"accumulate_grad_batches": 4}),
    Case(
        "dict_batches_with_adapters", DictBatchMLP, dict_batches, check_kwargs={"inputs": _pixels, "targets": _answer}
    ),
]

BUGS = [
    Case("huge_final_layer_init", HugeFinalInit, clusters, "InitLossCheck", "final layer"),
    Case("large_final_bias", LargeFinalBias, clusters, "InitLossCheck", "bias"),
    Case("unnormalised_raw_pixels", RawPixelsMLP, raw_shapes, "InitLossCheck", "normali"),
    Case("unshifted_targets_label_leak", UnshiftedTiedLM, tokens, "InitLossCheck", "leak"),
    Case("double_softmax", DoubleSoftmax, clusters, "OverfitOneBatch", "softmax"),
    Case("double_sigmoid", DoubleSigmoid, multilabel, "OverfitOneBatch", "sigmoid"),
    Case("clamped_loss", ClampedLoss, clusters, "OverfitOneBatch", "floor"),
    Case("weights_frozen_by_name", WeightsFrozenByName, clusters, "OverfitOneBatch", "frozen"),
    Case("zero_init", ZeroInit, clusters, "OverfitOneBatch", "gradient"),
    Case("detached_trunk", DetachedTrunk, clusters, "OverfitOneBatch", "gradient"),
    Case("view_instead_of_permute", ViewInsteadOfPermute, sequences, "BatchLeakageProbe", "permute"),
    Case("batch_statistics_in_forward", BatchStatsNormalisation, clusters, "BatchLeakageProbe", ""),
    Case("softmax_over_batch", SoftmaxOverBatch, clusters, "BatchLeakageProbe", ""),
    Case("attention_over_batch", AttentionOverBatch, sequences, "BatchLeakageProbe", "batch_first"),
    Case("missing_causal_mask", UnmaskedLM, tokens, "BatchLeakageProbe", "mask"),
    Case("off_by_one_causal_mask", OffByOneMaskLM, tokens, "BatchLeakageProbe", "mask"),
]


# -- monitors: bugs that only show while training ---------------------------------------------------------


class LearningRate(MLP):
    """The MLP with a given Adam learning rate (the healthy default is 3e-3)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr


def lr_100x_too_high() -> LearningRate:
    return LearningRate(0.3)


def lr_1e7() -> LearningRate:
    return LearningRate(1e-7)


class LayerMissingFromOptimizer(MLP):
    """`configure_optimizers` lists the head only: the hidden layers train nowhere."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)


class FrozenFirstConv(BatchNormCNN):
    """The first conv frozen by mistake (meant: freeze a pretrained backbone that is not there)."""

    def __init__(self) -> None:
        super().__init__()
        self.features[0].requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class PerStepDecay(MLP):
    """An LR schedule meant per epoch that runs every step: the learning rate is gone within 100 steps."""

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass(frozen=True)
class MonitorCase:
    """A bug a monitor must alert on, with the alert kind, within ``within`` optimizer steps."""

    name: str
    model: Callable[[], L.LightningModule]
    data: Callable[[], DataLoader]
    monitor: str
    alert: str
    within: int = 200

    def __str__(self) -> str:
        return f"{self.name}-{self.monitor}"


MONITORS = tuple(cls.__name__ for cls in registry.MONITORS.values())

MONITOR_BUGS = [
    MonitorCase("lr_100x_too_high", lr_100x_too_high, clusters, "UpdateRatioMonitor", "ratio_too_high"),
    MonitorCase("lr_1e-7", lr_1e7, clusters, "UpdateRatioMonitor", "ratio_too_low"),
    MonitorCase("lr_1e-7", lr_1e7, clusters, "PredictionDynamicsLogger", "frozen"),
    MonitorCase(
        "layer_missing_from_optimizer", LayerMissingFromOptimizer, clusters, "UpdateRatioMonitor", "not_in_optimizer"
    ),
    MonitorCase("frozen_first_conv", FrozenFirstConv, shapes, "FirstLayerVisualizer", "not_changing"),
    MonitorCase("lr_schedule_steps_every_batch", PerStepDecay, clusters, "UpdateRatioMonitor", "ratio_too_low"),
]
