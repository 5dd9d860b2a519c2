"""An ordinary training script with RecipeSuite: the quick-start CNN on shapes it draws itself. It knows nothing
about sanity runs; one environment variable turns it into one.

    python examples/slurm/train.py                                     # trains
    LIGHTNING_RECIPE_SANITY_RUN=1 python examples/slurm/train.py       # checks only: report, exit 0
    LIGHTNING_RECIPE_SANITY_RUN=1 python examples/slurm/train.py --bug double-softmax; echo $?   # 1

On a cluster the same command runs under `srun` or `torchrun` (see sanity_then_train.sbatch and torchrun.sh
beside this file); rank zero writes the report to <logdir>/train/version_N/sanity_run.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the quick-start model, one folder up
from quickstart import BUGS, ShapesCNN, make_shapes

from lightning_recipe import RecipeSuite


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", choices=BUGS, default="none", help="inject a realistic bug")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--logdir", default="recipe_logs")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    train = DataLoader(make_shapes(512), batch_size=32, shuffle=True)
    val = DataLoader(make_shapes(128, seed=1), batch_size=64)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        max_steps=args.max_steps,
        callbacks=[RecipeSuite()],
        logger=TensorBoardLogger(args.logdir, name="train"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    model = ShapesCNN(args.bug)
    trainer.fit(model, train, val)
    # In a sanity run the process has ended inside `fit`: nothing below runs on an untrained model.
    trainer.validate(model, val, ckpt_path="best")


if __name__ == "__main__":
    main()
