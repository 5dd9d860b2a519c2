"""Monitor state across a checkpoint resume: a run interrupted at step k and resumed with
``fit(ckpt_path=...)`` alerts as the uninterrupted run does (same alerts, same steps) and continues its
records; two monitors of one class keep separate state.

Each case trains once uninterrupted, with a ``ModelCheckpoint`` that saves at step k on the way, then resumes
fresh callbacks and a fresh model from that checkpoint. Loaders are unshuffled and the models have no dropout,
so the resumed run sees the same batches and computes the same weights (checked: the final weights match).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_recipe import FirstLayerVisualizer, PredictionDynamicsLogger, UpdateRatioMonitor
from tests import zoo
from tests.models import cluster_data, loader, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]


def clusters() -> DataLoader:
    return loader(cluster_data(), batch_size=128, shuffle=False)  # two batches an epoch: resumed at even steps


def shapes() -> DataLoader:
    return loader(zoo.shapes_data(), batch_size=96, shuffle=False)


class CNN(zoo.BatchNormCNN):
    """The zoo's CNN without dropout: no random numbers drawn in training, so a resumed run is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.head[1].p = 0.0


def uninterrupted_and_resumed(
    tmp_path: Path,
    model: Callable[[], L.LightningModule],
    data: Callable[[], DataLoader],
    monitors: Callable[[], list[Callback]],
    steps: int,
    resume_at: int,
    **trainer_kwargs: Any,
) -> tuple[list[Callback], list[Callback]]:
    """The monitors of a run of ``steps`` steps, and those of the same run resumed from its checkpoint at
    ``resume_at``. Asserts the resumed run trained to the same weights (the test's premise)."""
    L.seed_everything(0, verbose=False)
    whole = monitors()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=resume_at, save_top_k=-1)
    full_model = model()
    trainer(tmp_path, max_steps=steps, callbacks=[*whole, saver], enable_checkpointing=True, **trainer_kwargs).fit(
        full_model, data()
    )

    L.seed_everything(1, verbose=False)  # another initialisation: every weight must come from the checkpoint
    resumed = monitors()
    resumed_model = model()
    path = tmp_path / f"step={resume_at}.ckpt"
    again = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=resume_at, save_top_k=-1)
    trainer(tmp_path, max_steps=steps, callbacks=[*resumed, again], enable_checkpointing=True, **trainer_kwargs).fit(
        resumed_model, data(), ckpt_path=path
    )
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name].cpu(), value.cpu(), rtol=0, atol=0, msg=name)
    return whole, resumed


def alerts(monitor: Any) -> list[tuple[str, int, str]]:
    return [(a.kind, a.step, a.message) for a in monitor.alerts]


# -- UpdateRatioMonitor ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "steps", "resume_at", "kind"),
    [
        (zoo.lr_100x_too_high, 12, 2, "ratio_too_high"),  # in the first `window` steps, judged apart
        (zoo.lr_1e7, 12, 2, "ratio_too_low"),
        (zoo.PerStepDecay, 100, 64, "ratio_too_low"),  # the regular window of every 5th step, across the resume
    ],
    ids=["lr_100x_too_high", "lr_1e-7", "lr_schedule_steps_every_batch"],
)
def test_update_ratio_monitor_resumed_before_its_alert_alerts_at_the_same_step(
    tmp_path: Path, model: Callable[[], L.LightningModule], steps: int, resume_at: int, kind: str
):
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, model, clusters, lambda: [UpdateRatioMonitor(every_n_steps=5)], steps, resume_at
    )
    (a,), (b,) = whole, resumed
    assert kind in {alert.kind for alert in a.alerts}
    assert all(alert.step > resume_at for alert in a.alerts if alert.kind == kind)  # raised after the resume
    assert alerts(b) == alerts(a)
    assert b.measured_steps == a.measured_steps
    assert b.skipped_steps == a.skipped_steps
    assert b.last_ratios == a.last_ratios
    assert [w.medians for w in b._watches] == [w.medians for w in a._watches]
    assert [w.steps for w in b._watches] == [w.steps for w in a._watches]


def test_update_ratio_monitor_keeps_its_zero_update_streaks_across_a_resume(tmp_path: Path):
    # the hidden layers are in no optimizer: their zero streak never starts (not in an optimizer at all), but the
    # head of a model whose lr is 0 for one group is: a streak of `window` measured zero updates spans the resume
    class ZeroLrGroup(zoo.MLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(
                [{"params": self.net.parameters()}, {"params": self.head.parameters(), "lr": 0.0}], lr=self.lr
            )

    whole, resumed = uninterrupted_and_resumed(
        tmp_path, ZeroLrGroup, clusters, lambda: [UpdateRatioMonitor(every_n_steps=2, window=6)], 24, 4
    )
    (a,), (b,) = whole, resumed
    steps = [alert.step for alert in a.alerts if alert.kind == "not_moving"]
    assert steps == [5]  # the sixth zero update in a row: five of them before the resume
    assert alerts(b) == alerts(a)
    assert b._watches[0].zero_streak == a._watches[0].zero_streak


# -- PredictionDynamicsLogger ---------------------------------------------------------------------------


def test_prediction_dynamics_logger_resumed_before_frozen_alerts_at_the_same_step(tmp_path: Path):
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, zoo.lr_1e7, clusters, lambda: [PredictionDynamicsLogger(every_n_steps=5)], 40, 16
    )
    (a,), (b,) = whole, resumed
    assert [alert.kind for alert in a.alerts] == ["frozen"] and a.alerts[0].step > 16
    assert alerts(b) == alerts(a)
    assert repr(b.history) == repr(
        a.history
    )  # (repr: nan == nan) no evaluation repeated at the resumed step, none lost before it
    assert b._trajectory_steps == a._trajectory_steps
    assert b.batch_source == a.batch_source


def test_prediction_dynamics_logger_keeps_its_fixed_batch_from_a_shuffled_loader(tmp_path: Path):
    # the fixed batch is the first training batch of a shuffled loader: a resumed run reads another one, so the
    # checkpoint carries the batch
    def shuffled() -> DataLoader:
        return DataLoader(cluster_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    L.seed_everything(0, verbose=False)
    first = PredictionDynamicsLogger(every_n_steps=5)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=10, save_top_k=-1)
    trainer(tmp_path, max_steps=10, callbacks=[first, saver], enable_checkpointing=True).fit(zoo.MLP(), shuffled())
    second = PredictionDynamicsLogger(every_n_steps=5)
    other = DataLoader(cluster_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer(tmp_path, max_steps=15, callbacks=[second]).fit(zoo.MLP(), other, ckpt_path=tmp_path / "step=10.ckpt")
    x0, y0 = first.batch
    x1, y1 = second.batch
    assert torch.equal(x1, x0) and torch.equal(y1, y0)
    assert [e.step for e in second.history] == [0, 5, 10, 15]


# -- FirstLayerVisualizer -------------------------------------------------------------------------------


def first_layer() -> list[Callback]:
    return [FirstLayerVisualizer(every_n_steps=10, measure_every_n_steps=5, not_changing_after_steps=20)]


def test_first_layer_visualizer_resumed_before_not_changing_alerts_at_the_same_step(tmp_path: Path):
    class FrozenFirstConv(CNN):
        def __init__(self) -> None:
            super().__init__()
            self.features[0].requires_grad_(False)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    whole, resumed = uninterrupted_and_resumed(tmp_path, FrozenFirstConv, shapes, first_layer, 30, 12)
    (a,), (b,) = whole, resumed
    assert [alert.kind for alert in a.alerts] == ["not_changing"] and a.alerts[0].step == 20
    assert alerts(b) == alerts(a)


def test_first_layer_visualizer_measures_movement_from_the_start_of_training_after_a_resume(tmp_path: Path):
    whole, resumed = uninterrupted_and_resumed(tmp_path, CNN, shapes, first_layer, 30, 12)
    (a,), (b,) = whole, resumed
    assert a.last_moved is not None and a.last_moved > 1e-3
    assert b.last_moved == a.last_moved  # from the weights at step 0, not those at the resume
    assert b.baseline_score == a.baseline_score
    assert b.layer_name == a.layer_name == "features.0"
    assert alerts(b) == alerts(a) == []


# -- all three ------------------------------------------------------------------------------------------


def test_healthy_run_resumed_stays_quiet_and_continues_every_record(tmp_path: Path):
    def monitors() -> list[Callback]:
        return [
            UpdateRatioMonitor(every_n_steps=5),
            PredictionDynamicsLogger(every_n_steps=5, warmup_steps=10),
            FirstLayerVisualizer(every_n_steps=10, measure_every_n_steps=5, not_changing_after_steps=20),
        ]

    whole, resumed = uninterrupted_and_resumed(tmp_path, CNN, shapes, monitors, 60, 24)
    for a, b in zip(whole, resumed, strict=True):
        assert a.alerts == b.alerts == [], (a.name, alerts(a), alerts(b))
        assert b.enabled
    assert resumed[0].measured_steps == whole[0].measured_steps
    assert repr(resumed[1].history) == repr(whole[1].history)
    assert resumed[2].last_moved == whole[2].last_moved


def test_two_monitors_of_one_class_keep_separate_state_through_a_resume(tmp_path: Path):
    def monitors() -> list[Callback]:
        return [UpdateRatioMonitor(every_n_steps=2), UpdateRatioMonitor(every_n_steps=3)]

    whole, resumed = uninterrupted_and_resumed(tmp_path, zoo.MLP, clusters, monitors, 30, 16)
    assert whole[0].state_key != whole[1].state_key
    assert whole[0].state_key == "UpdateRatioMonitor" + repr(
        {"every_n_steps": 2, "window": 5, "max_ratio": 0.1, "min_ratio": 1e-5, "min_weight_norm": 1e-6}
    )
    checkpoint = torch.load(tmp_path / "step=16.ckpt", weights_only=True)  # plain data only
    assert {m.state_key for m in whole} <= set(checkpoint["callbacks"])
    for a, b in zip(whole, resumed, strict=True):
        assert b.measured_steps == a.measured_steps
    assert whole[0].measured_steps != whole[1].measured_steps  # two schedules: separate states for real


def test_state_is_plain_data(tmp_path: Path):
    whole, _ = uninterrupted_and_resumed(
        tmp_path,
        CNN,
        shapes,
        lambda: [UpdateRatioMonitor(every_n_steps=5), PredictionDynamicsLogger(every_n_steps=5), *first_layer()],
        12,
        10,
    )
    checkpoint = torch.load(tmp_path / "step=10.ckpt", weights_only=True)
    for monitor in whole:
        state = checkpoint["callbacks"][monitor.state_key]
        assert state["measurements"], monitor.name
        for tensor in _tensors(state):
            assert tensor.device.type == "cpu"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def test_state_round_trips_without_a_trainer():
    monitor = UpdateRatioMonitor()
    monitor.measured_steps = [(0, 3)]
    monitor._alerted = {("ratio_too_low", "optimizer0")}
    state = monitor.state_dict()
    again = UpdateRatioMonitor()
    again.load_state_dict(state)
    assert again.measured_steps == [(0, 3)]
    assert again._alerted == monitor._alerted


def test_monitors_inside_a_suite_resume_as_they_do_alone(tmp_path: Path):
    from lightning_recipe import RecipeSuite

    def suite() -> list[Callback]:
        return [
            RecipeSuite(
                update_ratio_monitor={"every_n_steps": 5},
                prediction_dynamics_logger={"every_n_steps": 5},
                first_layer_visualizer={"measure_every_n_steps": 5, "not_changing_after_steps": 20},
            )
        ]

    whole, resumed = uninterrupted_and_resumed(tmp_path, zoo.lr_1e7, clusters, suite, 40, 16)
    (a,), (b,) = whole, resumed
    assert any(alert.kind == "frozen" and alert.step > 16 for m in a.monitors for alert in m.alerts)
    for ma, mb in zip(a.monitors, b.monitors, strict=True):
        assert alerts(mb) == alerts(ma), ma.name
    assert b.monitors[0].measured_steps == a.monitors[0].measured_steps
    assert repr(b.monitors[1].history) == repr(a.monitors[1].history)
    assert b.monitors[2].last_moved == a.monitors[2].last_moved


def _three() -> list[Callback]:
    return [
        UpdateRatioMonitor(every_n_steps=5),
        PredictionDynamicsLogger(every_n_steps=5),
        FirstLayerVisualizer(every_n_steps=10, measure_every_n_steps=5, not_changing_after_steps=20),
    ]


def _same_records(whole: list[Any], resumed: list[Any]) -> None:
    for a, b in zip(whole, resumed, strict=True):
        assert alerts(b) == alerts(a), a.name
    assert whole[0].alerts and whole[1].alerts  # ratio_too_low, frozen: raised after the resume
    assert resumed[0].measured_steps == whole[0].measured_steps
    assert repr(resumed[1].history) == repr(whole[1].history)
    assert resumed[2].last_moved == whole[2].last_moved


def test_readings_in_flight_at_the_checkpoint_are_taken_into_it(tmp_path: Path, defer_reads):
    # the checkpoint at step 16 is written while that step's readings still wait for the device: the state
    # waits for them, or the resumed run would lack them
    defer_reads(True)  # readings wait for the next hook, as on a GPU
    whole, resumed = uninterrupted_and_resumed(tmp_path, zoo.lr_1e7, clusters, _three, 40, 16)
    _same_records(whole, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_monitors_resume_on_a_gpu(tmp_path: Path):
    whole, resumed = uninterrupted_and_resumed(tmp_path, zoo.lr_1e7, clusters, _three, 40, 16, accelerator="gpu")
    _same_records(whole, resumed)
