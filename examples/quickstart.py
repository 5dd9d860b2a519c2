"""Quick start: a small CNN on shapes it draws itself, with lightning_recipe's three pre-flight checks and
three training monitors.

    python examples/quickstart.py                    # healthy model: the checks pass, training runs quietly
    python examples/quickstart.py --bug huge-init    # a bug the checks catch: the run stops with the fix
    python examples/quickstart.py --bug lr-too-high  # a bug the monitors catch: training goes on, with alerts
    tensorboard --logdir recipe_logs                 # the evidence: recipe/* scalars, images, figures, text

Bugs to try: huge-init, double-softmax, batch-stats (checks); lr-too-high, lr-too-low, frozen-first-conv
(monitors).
"""

from __future__ import annotations

import argparse
import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import (
    BatchLeakageProbe,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    RecipeCheckError,
    UpdateRatioMonitor,
)

BUGS = ("none", "huge-init", "double-softmax", "batch-stats", "lr-too-high", "lr-too-low", "frozen-first-conv")
LEARNING_RATES = {"lr-too-high": 0.3, "lr-too-low": 1e-7}


def make_shapes(n: int, size: int = 16, seed: int = 0) -> TensorDataset:
    """Squares, crosses and rings at random places on a noisy 16x16 canvas, normalised."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % 3
        cy, cx = torch.randint(5, size - 5, (2,), generator=g).tolist()
        dy, dx = (yy - cy).abs(), (xx - cx).abs()
        if label == 0:
            img = (dy <= 3) & (dx <= 3)
        elif label == 1:
            img = ((dy <= 1) & (dx <= 4)) | ((dx <= 1) & (dy <= 4))
        else:
            r = (dy.float() ** 2 + dx.float() ** 2).sqrt()
            img = (r >= 2.5) & (r <= 4.0)
        images.append(img.float() + 0.1 * torch.randn(size, size, generator=g))
        labels.append(label)
    x = torch.stack(images)[:, None]
    return TensorDataset((x - x.mean()) / x.std(), torch.tensor(labels))


class ShapesCNN(L.LightningModule):
    def __init__(self, bug: str = "none", lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 3)
        if bug == "huge-init":
            nn.init.normal_(self.head.weight, std=5.0)
        if bug == "frozen-first-conv":
            self.features[0].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.bug == "batch-stats":
            x = (x - x.mean(0)) / (x.std(0) + 1e-5)  # "normalise" with statistics over the batch axis
        logits = self.head(self.features(x).flatten(1))
        return logits.softmax(-1) if self.hparams.bug == "double-softmax" else logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        lr = LEARNING_RATES.get(self.hparams.bug, self.hparams.lr)
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", choices=BUGS, default="none", help="inject a realistic bug")
    parser.add_argument("--epochs", type=int, default=15, help="16 steps each")
    parser.add_argument("--logdir", default="recipe_logs")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    train = DataLoader(make_shapes(512), batch_size=32, shuffle=True)
    val = DataLoader(make_shapes(128, seed=1), batch_size=64)
    checks = [InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()]
    monitors = [UpdateRatioMonitor(), PredictionDynamicsLogger(), FirstLayerVisualizer()]
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[*checks, *monitors],
        logger=TensorBoardLogger(args.logdir, name="quickstart"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=4,
    )
    stopped = None
    try:
        trainer.fit(ShapesCNN(args.bug), train, val)
    except RecipeCheckError as error:
        stopped = error

    print("\nlightning_recipe verdict")
    for check in checks:
        status, summary = (check.result.status.value, check.result.summary) if check.result else ("not run", "")
        print(f"  {check.name:18s} {status:8s} {summary}")
    if stopped is not None:
        print(f"\nTraining stopped before the first step:\n{stopped}")
    else:
        print(f"\nTrained {trainer.global_step} steps; val/acc = {trainer.callback_metrics['val/acc']:.2f}")
        alerts = [(monitor.name, alert) for monitor in monitors for alert in monitor.alerts]
        print(f"Monitor alerts: {len(alerts) or 'none'}")
        for name, alert in alerts:
            print(f"  {name} `{alert.kind}` at step {alert.step}: {alert.message}")
    print(f"TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")
    return 1 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
