"""lightning_recipe: Karpathy's recipe for training neural networks as PyTorch Lightning callbacks.

Checks run once before the first optimizer step of ``trainer.fit`` and give a verdict::

    trainer = L.Trainer(callbacks=[InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe()])
    trainer.fit(model, datamodule)   # raises RecipeCheckError with the fix, or trains as before
"""

from lightning_recipe.callbacks.batch_leakage_probe import BatchLeakageProbe
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.callbacks.overfit_one_batch import OverfitOneBatch
from lightning_recipe.report import Alert, CheckResult, CheckStatus, RecipeCheckError, RecipeWarning, Report

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "BatchLeakageProbe",
    "CheckResult",
    "CheckStatus",
    "InitLossCheck",
    "OverfitOneBatch",
    "RecipeCheckError",
    "RecipeWarning",
    "Report",
]
