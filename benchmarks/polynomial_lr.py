"""Is PredictionDynamicsLogger's `thrashing` alert on pytorch/examples' polynomial regression (SGD at lr 0.1) a false
alarm? The alert says the learning rate is too high. This measures what a lower one does: the smooth-L1 loss on all
3,200 points after 300 and 1,000 steps at lr 0.1 (the example's), 0.03 and 0.01, per seed, without any callback.

At lr 0.1 the quadratic part of smooth L1 has curvature ~E[x^8] = 105 along the x^4 weight, so lr x curvature ~10,
far above the stability limit of 2: the loss bounces at a level the learning rate sets instead of converging.

    python benchmarks/polynomial_lr.py --seeds 0 3 8

Results: ``benchmarks/results/false_alarms.md`` (the note under the polynomial regression row).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from tests.models import trainer
from tests.real_models import PolynomialRegression, polynomial_pairs
from tests.test_update_ratio import polynomial_loader


class AtRate(PolynomialRegression):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def final_loss(seed: int, lr: float, steps: int) -> float:
    L.seed_everything(seed, verbose=False)
    model = AtRate(lr)
    trainer(max_steps=steps, max_epochs=-1).fit(model, polynomial_loader(seed))
    data = polynomial_pairs(3200, seed)
    with torch.no_grad():
        return float(F.smooth_l1_loss(model(data.tensors[0]), data.tensors[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 3, 8])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rates, lengths = (0.1, 0.03, 0.01), (300, 1000)
    print("| seed | " + " | ".join(f"lr {lr:g}, {n} steps" for lr in rates for n in lengths) + " |")
    print("|---|" + "---|" * (len(rates) * len(lengths)))
    for seed in args.seeds:
        cells = [f"{final_loss(seed, lr, n):.3g}" for lr in rates for n in lengths]
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
