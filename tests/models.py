"""Small models and self-made data shared by the tests. Module level, so DDP subprocesses can import them."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def cluster_data(n: int = 256, in_dim: int = 8, classes: int = 4, seed: int = 0, spread: float = 3.0):
    """Gaussian clusters, one per class: easy to learn, labels balanced."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, in_dim, generator=g) * spread
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, in_dim, generator=g)
    return TensorDataset(x, y)


def loader(dataset, batch_size: int = 32, shuffle: bool = True, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)


class MLPClassifier(L.LightningModule):
    def __init__(self, in_dim: int = 8, hidden: int = 32, classes: int = 4, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer for tests."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def cluster_loader() -> DataLoader:
    """A module-level DataLoader factory for DDP scripts."""
    return loader(cluster_data())
