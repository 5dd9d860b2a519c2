"""lightning_recipe: Karpathy's recipe for training neural networks as PyTorch Lightning callbacks.

Checks run once before the first optimizer step of ``trainer.fit`` and give a verdict; monitors watch
the run, log their evidence to TensorBoard and alert when it leaves the healthy band::

    trainer = L.Trainer(callbacks=[InitLossCheck(), OverfitOneBatch(), BatchLeakageProbe(),
                                   UpdateRatioMonitor(), PredictionDynamicsLogger(), FirstLayerVisualizer()])
    trainer.fit(model, datamodule)   # raises RecipeCheckError with the fix, or trains as before

``RecipeSuite()`` bundles them all; ``LIGHTNING_RECIPE_SANITY_RUN=1 python train.py`` then runs only the checks,
writes a report and exits 0 or 1; ``sanity_run(model, datamodule)`` returns that report in a notebook.
"""

from lightning_recipe.callbacks.batch_leakage_probe import BatchLeakageProbe
from lightning_recipe.callbacks.first_layer_visualizer import FirstLayerVisualizer
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.callbacks.overfit_one_batch import OverfitOneBatch
from lightning_recipe.callbacks.prediction_dynamics_logger import PredictionDynamicsLogger
from lightning_recipe.callbacks.update_ratio_monitor import UpdateRatioMonitor
from lightning_recipe.report import Alert, CheckResult, CheckStatus, RecipeCheckError, RecipeWarning, Report
from lightning_recipe.sanity import SanityRunExit
from lightning_recipe.suite import RecipeSuite, sanity_run

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "BatchLeakageProbe",
    "CheckResult",
    "CheckStatus",
    "FirstLayerVisualizer",
    "InitLossCheck",
    "OverfitOneBatch",
    "PredictionDynamicsLogger",
    "RecipeCheckError",
    "RecipeSuite",
    "RecipeWarning",
    "Report",
    "SanityRunExit",
    "UpdateRatioMonitor",
    "sanity_run",
]
