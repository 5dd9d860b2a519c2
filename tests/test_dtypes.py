"""Every registered check and monitor on parameters that are not float32: Lightning's ``64-true``, ``16-true`` and
``bf16-true`` precisions, and a model the user converted itself (``.double()``, ``.half()``, ``.bfloat16()``, data to
match) under the default precision. Two small healthy models, each through one real ``Trainer.fit`` per dtype: an
LSTM regressor built like pytorch/examples' time-sequence prediction (the program that trains in ``.double()``), and
a small CNN classifier. Every check passes (none reports an internal error) and every monitor measures and logs its
first steps without switching itself off or raising an alert."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import CheckStatus, RecipeWarning, UpdateRatioMonitor
from lightning_recipe.registry import CHECKS, MONITORS
from tests.models import trainer
from tests.real_models import TimeSequencePrediction, sine_wave_data, sine_wave_val, sine_waves, time_sequence_model
from tests.tensorboard import read_events

#: (Trainer precision, the dtype the user converted the model and its data to itself): the model trains in
#: float64, float16 or bfloat16 either way
DTYPES = {
    "64-true": ("64-true", None),
    "16-true": ("16-true", None),
    "bf16-true": ("bf16-true", None),
    "user-double": ("32-true", torch.float64),
    "user-half": ("32-true", torch.float16),
    "user-bfloat16": ("32-true", torch.bfloat16),
}
EXPECTED = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


class SineRegressor(TimeSequencePrediction):
    """The time-sequence LSTM with a first-order optimizer, so that a few steps cost a few milliseconds. Pure
    float16 Adam needs an ``eps`` that float16 can hold (the default 1e-8 rounds to 0, and a gradient whose square
    underflows then divides by zero): what people who train in float16 set."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        half = self.linear.weight.dtype == torch.float16
        return torch.optim.Adam(self.parameters(), lr=1e-2, eps=1e-4 if half else 1e-8)


class ShapeClassifier(L.LightningModule):
    """A conv layer and a linear head on 8x8 images of three classes, plain SGD at a small rate: OverfitOneBatch
    has to fit it with its own Adam (one more attempt with this SGD would not fit within its steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=2e-3)


def shape_images(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return TensorDataset(x, y)


MODELS = {
    "time_sequence_lstm": (SineRegressor, lambda: sine_waves(n=32, length=25)),
    "cnn_classifier": (ShapeClassifier, shape_images),
}


def _cast(data: TensorDataset, dtype: torch.dtype | None) -> TensorDataset:
    if dtype is None:
        return data
    return TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in data.tensors))


class _SeenDtype(L.Callback):
    """What the model trained in: the parameters' and the inputs' dtype at each training batch."""

    def __init__(self) -> None:
        self.seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.seen.add((next(pl_module.parameters()).dtype, batch[0].dtype))


@pytest.mark.parametrize("setting", list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_check_and_monitor_runs_on_the_models_dtype(model_name: str, setting: str, tmp_path):
    precision, user_dtype = DTYPES[setting]
    make_model, make_data = MODELS[model_name]
    L.seed_everything(0, verbose=False)
    model = make_model()
    data = _cast(make_data(), user_dtype)
    if user_dtype is not None:
        model = model.to(user_dtype)
    checks = [cls() for cls in CHECKS.values()]
    monitors = [cls(every_n_steps=1) for cls in MONITORS.values()]
    seen = _SeenDtype()
    t = trainer(
        max_steps=3,
        precision=precision,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[*checks, *monitors, seen],
    )
    with warnings.catch_warnings(record=True) as caught:  # switch-offs and alerts are asserted on below
        warnings.simplefilter("always", RecipeWarning)
        t.fit(model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=16))
    said = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]

    dtype = user_dtype or EXPECTED[precision]
    assert seen.seen == {(dtype, dtype)}, "the model did not train in the dtype under test"
    assert t.global_step == 3
    assert not [m for m in said if "please report" in m.lower()], said
    for check in checks:
        assert check.result is not None, f"{type(check).__name__} did not run"
        assert check.result.status is CheckStatus.PASSED, check.result.format()
    t.logger.experiment.flush()
    logged = read_events(tmp_path).Tags()["scalars"]
    for monitor in monitors:
        assert monitor.enabled, f"{monitor.name} switched itself off: {said}"
        assert monitor.alerts == [], f"{monitor.name}: {[(a.kind, a.step, a.message) for a in monitor.alerts]}"
        mine = [tag for tag in logged if tag.startswith(f"recipe/{monitor.component}/")]
        assert mine, f"{monitor.name} logged no measurement: {logged}"


def test_the_time_sequence_example_in_double_with_lbfgs_is_measured_from_its_first_step():
    """The program of the issue as pytorch/examples has it: the LSTM in ``.double()``, full-batch LBFGS. The update
    ratio monitor switched itself off at its first measured step (``vector_norm(dtype=float32)`` of an fp64
    gradient); now every monitor measures each step, in float64."""
    monitors = [cls(every_n_steps=1) for cls in MONITORS.values()]
    L.seed_everything(0, verbose=False)
    t = trainer(max_steps=2, callbacks=monitors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeWarning)
        t.fit(time_sequence_model(), sine_wave_data(), sine_wave_val())
    said = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert not [m for m in said if "please report" in m.lower()], said
    assert all(monitor.enabled for monitor in monitors), said
    ratios = next(m for m in monitors if isinstance(m, UpdateRatioMonitor))
    assert [step for _, step in ratios.measured_steps] == [0, 1]
    assert all(math.isfinite(r) and r > 0 for r in ratios.last_ratios.values()), ratios.last_ratios
