"""FirstLayerVisualizer: the diagnostics against known answers, then tiny real Trainer runs read back from
TensorBoard, the alerts, no side effects, and DDP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_recipe import FirstLayerVisualizer, RecipeWarning
from lightning_recipe.diagnostics import first_layer as fl
from tests.ddp import run_ddp, run_script
from tests.models import trainer
from tests.tensorboard import read_events
from tests.zoo import MLP, BatchNormCNN, FrozenFirstConv, ZooModule, clusters, shapes

TAG = "recipe/first_layer_visualizer/"

# -- models (module level: DDP imports them) --------------------------------------------------------


class HeadFirstCNN(ZooModule):
    """Registers the head first and looks up a positional table from `torch.arange` before the first conv:
    registration order and "first module to run" both name the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.pos = nn.Embedding(4, 8)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.pos(torch.arange(4, device=x.device)).mean(0)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)) + bias)


class FlatImageMLP(ZooModule):
    """A Linear over flattened 1x16x16 images: its rows are images too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FirstConvMissingFromOptimizer(BatchNormCNN):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        first = set(map(id, self.features[0].parameters()))
        return torch.optim.Adam([p for p in self.parameters() if id(p) not in first], lr=self.lr)


# -- diagnostics ----------------------------------------------------------------------------------


def _brute_force_noise_score(filters: torch.Tensor) -> float:
    slices = filters.double().reshape(-1, *filters.shape[-2:])
    diffs, variances = [], []
    for s in slices:
        h, w = s.shape
        for i in range(h):
            for j in range(w):
                if i + 1 < h:
                    diffs.append(float((s[i + 1, j] - s[i, j]) ** 2))
                if j + 1 < w:
                    diffs.append(float((s[i, j + 1] - s[i, j]) ** 2))
        values = s.flatten().tolist()
        mean = sum(values) / len(values)
        variances.append(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return (sum(diffs) / len(diffs)) / (2 * sum(variances) / len(variances))


def test_noise_score_matches_brute_force():
    filters = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(1))
    assert fl.noise_score(filters) == pytest.approx(_brute_force_noise_score(filters), rel=1e-9)


@pytest.mark.parametrize("draw", ["normal", "uniform"])
def test_noise_score_is_about_one_for_iid_noise(draw):
    g = torch.Generator().manual_seed(0)
    filters = torch.randn(64, 3, 5, 5, generator=g) if draw == "normal" else torch.rand(64, 3, 5, 5, generator=g)
    assert 0.9 < fl.noise_score(filters) < 1.1


def test_noise_score_is_low_for_smooth_and_edge_filters():
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    assert fl.noise_score(sobel[None]) == pytest.approx(4 / 9)  # 16/12 over 2 * 12/8
    yy, xx = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    gaussian = torch.exp(-((yy - 3) ** 2 + (xx - 3) ** 2) / 4)
    assert fl.noise_score(gaussian[None]) < 0.3
    ramp = (xx + 0.5 * yy)[None, None]
    assert fl.noise_score(ramp) < 0.1
    assert math.isnan(fl.noise_score(torch.ones(2, 3, 3)))


def test_first_layer_is_found_by_execution_order_not_registration_order():
    model = HeadFirstCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    assert list(fl.weighted_modules(model)) == ["fc", "pos", "conv1", "conv2"]
    with torch.no_grad():
        trace = fl.trace_first_layer(model, lambda: model(x), [x])
    assert trace.first == "conv1"
    assert trace.ran == ("pos", "conv1")  # the pass stops after the first layer; `pos` read no input
    assert trace.input_shapes["conv1"] == (2, 1, 8, 8)


def test_first_layer_of_token_and_recurrent_models():
    from tests.zoo import BiTagger, TimeMajorLSTM

    tokens = torch.randint(0, 12, (2, 10))
    sequences = torch.randn(8, 2, 4)
    with torch.no_grad():
        tagger, lstm = BiTagger(), TimeMajorLSTM()
        assert fl.trace_first_layer(tagger, lambda: tagger(tokens), [tokens]).first == "embed"
        assert fl.trace_first_layer(lstm, lambda: lstm(sequences), [sequences]).first == "rnn"


def test_unknown_layer_name_lists_the_modules_with_weights():
    with pytest.raises(ValueError, match=r"but got 'conv0'; modules with weights are: fc, pos, conv1, conv2\."):
        fl.resolve_layer(HeadFirstCNN(), "conv0")


def test_linear_over_images_rows_are_the_images_they_match():
    layer = nn.Linear(3 * 4 * 5, 2)
    view = fl.describe_layer(layer, (7, 60), (7, 3, 4, 5))
    assert view.image_like and view.shape == (3, 4, 5)
    filters = view.filters(layer.weight)
    assert filters.shape == (2, 3, 4, 5)
    image = torch.randn(1, 3, 4, 5)
    # the response of row k to an image is the overlap of the image with filter k
    expected = layer(nn.Flatten()(image)) - layer.bias
    assert torch.allclose((filters * image).sum((1, 2, 3)), expected[0].detach(), atol=1e-6)


@pytest.mark.parametrize(
    ("module", "layer_input", "model_input"),
    [
        (nn.Linear(8, 4), (2, 8), (2, 8)),
        (nn.Embedding(10, 4), (2, 5), (2, 5)),
        (nn.LSTM(4, 6), (8, 2, 4), (8, 2, 4)),
        (nn.Conv2d(3, 4, 1), (2, 3, 8, 8), (2, 3, 8, 8)),
    ],
    ids=["linear_vectors", "embedding", "lstm", "conv1x1"],
)
def test_layers_that_are_not_image_like(module, layer_input, model_input):
    view = fl.describe_layer(module, layer_input, model_input)
    assert not view.image_like and view.reason


def test_filter_images_one_per_filter_or_one_per_channel():
    rgb = fl.filter_images(torch.randn(5, 3, 3, 3))
    assert rgb.shape == (5, 3, 26, 26)  # 3 px scaled by 8 to 24, plus a 1-px frame
    assert rgb.min() >= 0 and rgb.max() <= 1
    gray = fl.filter_images(torch.randn(10, 8, 3, 3), max_images=64)
    assert gray.shape == (64, 1, 26, 26)
    inner = fl.filter_images(torch.tensor([[[[0.0, 2.0], [4.0, 4.0]]]]), min_pixels=2)[0, 0, 1:-1, 1:-1]
    assert inner.tolist() == [[0.0, 0.5], [1.0, 1.0]]  # min-max per filter


def test_moved_from_init_and_verdicts():
    w0 = [torch.ones(2, 2), torch.zeros(1, 3)]
    w = [torch.ones(2, 2) * 1.5, torch.zeros(1, 3)]
    assert fl.moved_from_init(w, w0) == pytest.approx(0.5)
    assert fl.moved_from_init(w0, w0) == 0.0
    assert fl.norm(w0) == pytest.approx(2.0)
    assert fl.moved_from_init(w, w0, initial_norm=fl.norm(w0)) == fl.moved_from_init(w, w0)
    assert fl.moved_from_init([torch.ones(3)], [torch.zeros(3)]) == math.inf
    assert fl.moved_from_init([torch.zeros(3)], [torch.zeros(3)]) == 0.0
    w0 = torch.linspace(1, 2, 256, dtype=torch.float64)  # fp64: a movement of 1e-10 is not lost in fp32 rounding
    assert fl.moved_from_init([w0 + 1e-10], [w0]) == pytest.approx(1e-10 * 16 / float(w0.norm()), rel=1e-6)
    t = fl.Thresholds()
    assert fl.filter_alerts(99, 0.0, 1.0, t) == []
    assert fl.filter_alerts(100, 0.0, 1.0, t) == ["not_changing"]
    assert fl.filter_alerts(1999, 0.01, 1.0, t) == []  # looks alone mislead early
    assert fl.filter_alerts(2000, 0.01, 1.0, t) == ["noisy"]
    assert fl.filter_alerts(2000, 0.5, 1.0, t) == []  # it moved: not stuck at init
    assert fl.filter_alerts(2000, 0.01, None, t) == []  # not image-like: never noisy


# -- through a real Trainer ---------------------------------------------------------------------------


def _events(t: L.Trainer) -> Any:
    t.logger.experiment.flush()
    acc = read_events(t.logger.log_dir)
    return acc


def _tb_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return trainer(logger=TensorBoardLogger(str(tmp_path), name="tb"), log_every_n_steps=1, **kwargs)


def test_filters_logged_at_start_interval_and_end_with_scalars(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer(every_n_steps=10, measure_every_n_steps=5)
    t = _tb_trainer(tmp_path, max_steps=25, callbacks=[monitor])
    t.fit(HeadFirstCNN(), shapes())
    assert monitor.layer_name == "conv1" and monitor.enabled and monitor.alerts == []
    acc = _events(t)
    images = acc.Images(TAG + "filters")
    assert [e.step for e in images] == [0, 10, 20, 25]
    assert all((e.width, e.height) == (8 * 26, 26) for e in images)  # 8 filters of 1x3x3, one row of tiles
    noise = acc.Scalars(TAG + "noise_score")
    moved = acc.Scalars(TAG + "moved_from_init")
    assert [e.step for e in moved] == [0, 5, 10, 15, 20, 25] == [e.step for e in noise]
    assert moved[0].value == 0.0 and moved[-1].value > 0.05
    assert 0.6 < noise[0].value < 1.4  # random init: noise-like
    assert monitor.baseline_score == pytest.approx(noise[0].value)


def test_linear_over_images_is_rendered_row_by_row(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer(every_n_steps=100, max_images=16)
    t = _tb_trainer(tmp_path, max_steps=3, callbacks=[monitor])
    t.fit(FlatImageMLP(), shapes())
    assert monitor.layer_name == "net.1" and monitor.view.shape == (1, 16, 16)
    images = _events(t).Images(TAG + "filters")
    assert [e.step for e in images] == [0, 3]
    assert (images[0].width, images[0].height) == (8 * 34, 2 * 34)  # 16 tiles of 16 px x2, framed, 8 per row


def test_first_layer_that_is_not_image_like_is_watched_for_movement(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer(measure_every_n_steps=50)
    t = _tb_trainer(tmp_path, max_steps=100, callbacks=[monitor])
    t.fit(MLP(), clusters())
    acc = _events(t)
    assert TAG + "filters" not in acc.Tags()["images"]
    assert TAG + "noise_score" not in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars(TAG + "moved_from_init")] == [0, 50, 100]
    text = acc.Tensors(TAG + "layer/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "`net.0`" in text and "not image-like" in text and "no images" in text


def test_unknown_layer_is_refused_at_setup_with_the_list():
    with pytest.raises(
        ValueError,
        match=r"^Expected `layer` to name a module of the model, but got 'conv0'; "
        r"modules with weights are: fc, pos, conv1, conv2\.$",
    ):
        trainer(callbacks=[FirstLayerVisualizer(layer="conv0")]).fit(HeadFirstCNN(), shapes())


def test_named_layer_is_watched():
    monitor = FirstLayerVisualizer(layer="conv2")
    trainer(max_steps=2, callbacks=[monitor]).fit(HeadFirstCNN(), shapes())
    assert monitor.layer_name == "conv2" and monitor.view.shape == (8, 3, 3)


@pytest.mark.parametrize(
    ("layer", "match"),
    [("", "`layer` to be the name"), (3, "`layer` to be the name")],
)
def test_bad_layer_argument_is_refused_at_construction(layer, match):
    with pytest.raises(ValueError, match=match):
        FirstLayerVisualizer(layer=layer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` to be an integer >= 1, but got 0"),
        ({"measure_every_n_steps": 1.5}, r"`measure_every_n_steps` to be an integer >= 1"),
        ({"max_images": 0}, r"`max_images` to be an integer >= 1"),
        ({"noisy_above": -1}, r"`noisy_above` to be a finite positive number"),
    ],
)
def test_bad_arguments_are_refused_with_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FirstLayerVisualizer(**kwargs)


def test_frozen_first_conv_is_not_changing():
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer()
    with pytest.warns(RecipeWarning, match="alert `not_changing` at step 100"):
        trainer(max_steps=110, callbacks=[monitor]).fit(FrozenFirstConv(), shapes())
    (alert,) = monitor.alerts
    assert alert.kind == "not_changing" and alert.step == 100
    assert "`features.0`" in alert.message and "requires_grad=False" in alert.message
    assert "layer=" in alert.message  # how to silence it when the freeze is on purpose
    assert alert.details["moved_from_init"] == 0.0


def test_first_conv_missing_from_optimizer_is_not_changing():
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer(not_changing_after_steps=20)
    with pytest.warns(RecipeWarning, match="in no optimizer"):
        trainer(max_steps=20, callbacks=[monitor]).fit(FirstConvMissingFromOptimizer(), shapes())
    assert [a.kind for a in monitor.alerts] == ["not_changing"]


def test_healthy_cnn_raises_no_alert():
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer()
    trainer(max_steps=120, callbacks=[monitor]).fit(BatchNormCNN(), shapes())
    assert monitor.enabled and monitor.alerts == []


def test_noisy_after_the_late_threshold_when_the_layer_barely_moved():
    L.seed_everything(0, verbose=False)

    class Slow(BatchNormCNN):
        lr = 1e-6

    monitor = FirstLayerVisualizer(late_after_steps=30, not_changing_after_steps=10)
    with pytest.warns(RecipeWarning, match="alert `noisy` at step"):
        trainer(max_steps=40, callbacks=[monitor]).fit(Slow(), shapes())
    assert [a.kind for a in monitor.alerts] == ["noisy"]
    assert "noise score" in monitor.alerts[0].message and "learning rate" in monitor.alerts[0].message


def _final_weights(with_monitor: bool) -> dict[str, torch.Tensor]:
    L.seed_everything(3, verbose=False)
    model = BatchNormCNN()
    callbacks = [FirstLayerVisualizer(every_n_steps=4, measure_every_n_steps=2)] if with_monitor else []
    trainer(max_steps=12, deterministic=True, callbacks=callbacks).fit(model, shapes())
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_run_ends_bit_identical_with_and_without_the_visualizer():
    without, with_ = _final_weights(False), _final_weights(True)
    assert without.keys() == with_.keys()
    for key in without:
        assert torch.equal(without[key], with_[key]), key


def test_internal_error_switches_off_with_one_warning(monkeypatch):
    monitor = FirstLayerVisualizer(measure_every_n_steps=1)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("lightning_recipe.callbacks.first_layer_visualizer.moved_from_init", broken)
    t = trainer(max_steps=5, callbacks=[monitor])
    with pytest.warns(RecipeWarning, match="switched itself off"):
        t.fit(BatchNormCNN(), shapes())
    assert not monitor.enabled and t.global_step == 5


def test_ddp_logs_from_rank_zero_only(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path,
        model="tests.test_first_layer:HeadFirstCNN",
        data="tests.zoo:shapes",
        check="FirstLayerVisualizer",
        check_kwargs={"every_n_steps": 2, "measure_every_n_steps": 2},
        max_steps=4,
        tensorboard=True,
    )
    assert code == 0, output[-3000:]
    assert sorted(ranks) == [0, 1]
    for seen in ranks.values():
        assert seen["error"] is None and seen["global_step"] == 4
        assert seen["enabled"] == [True] and seen["alerts"] == [[]]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = read_events(str(events[0].parent))
    assert [e.step for e in acc.Images(TAG + "filters")] == [0, 2, 4]


class ShardedMLP(MLP):
    """FSDP2 through Lightning's ModelParallelStrategy: every Linear's weight is a DTensor shard."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.net, self.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


SHARDED_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import lightning.pytorch as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_recipe import FirstLayerVisualizer
from tests.test_first_layer import ShardedMLP
from tests.zoo import clusters

torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
monitor = FirstLayerVisualizer(measure_every_n_steps=2)
trainer = L.Trainer(
    accelerator="cpu", devices=2, max_steps=6, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
)
trainer.fit(ShardedMLP(), clusters())
weight = trainer.lightning_module.net[0].weight
seen = dict(enabled=monitor.enabled, layer=monitor.layer_name, moved=monitor.last_moved,
            weight_type=type(weight).__name__, local_rows=weight.to_local().shape[0],
            initial_shape=list(monitor._initial[0].shape), alerts=[a.kind for a in monitor.alerts])
(Path(sys.argv[1]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
"""


def test_sharded_first_layer_is_gathered_so_every_rank_measures_the_whole_layer(tmp_path):
    _, seen = run_script(tmp_path, SHARDED_SCRIPT)
    for rank in seen:
        assert rank["enabled"] and rank["alerts"] == [] and rank["layer"] == "net.0"
        assert rank["weight_type"] == "DTensor" and rank["local_rows"] == 16  # the rank holds half the rows
        assert rank["initial_shape"] == [32, 8]  # ... and the visualizer the whole layer
        assert rank["moved"] > 0
    assert seen[0]["moved"] == seen[1]["moved"]


# -- a first layer frozen on purpose (pretrained) is not the bug; a frozen random one is (issue 10) -----------


def _smooth_filters(filters: int, channels: int, size: int) -> torch.Tensor:
    """Gaussian blobs and oriented ramps, like pretrained first-layer filters (noise score well below 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(x, x, indexing="ij")
    out = []
    for _ in range(filters * channels):
        angle, width = float(torch.rand((), generator=g)) * math.pi, 0.3 + float(torch.rand((), generator=g))
        ramp = math.cos(angle) * xx + math.sin(angle) * yy
        out.append(torch.exp(-(xx**2 + yy**2) / width) * ramp)
    return torch.stack(out).reshape(filters, channels, size, size) * 0.3


class PretrainedFrozenConv(BatchNormCNN):
    """The first conv loaded with smooth (pretrained-looking) filters and frozen on purpose."""

    def __init__(self) -> None:
        super().__init__()
        conv = self.features[0]
        with torch.no_grad():
            conv.weight.copy_(_smooth_filters(*conv.weight.shape[:3]))
        conv.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class FrozenEmbeddingsMLP(MLP):
    """A first Linear over plain vectors, frozen; ``pretrained`` gives it low-rank structure."""

    def __init__(self, pretrained: bool) -> None:
        super().__init__()
        first = self.net[0]
        if pretrained:
            g = torch.Generator().manual_seed(0)
            rows, cols = first.weight.shape
            low_rank = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
            with torch.no_grad():
                first.weight.copy_(0.3 * low_rank + 0.02 * torch.randn(first.weight.shape, generator=g))
        first.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_random_init_is_told_from_structure_by_noise_score_and_spectrum():
    for layer in (nn.Conv2d(3, 16, 5), nn.Linear(16, 32), nn.Linear(256, 64), nn.Embedding(100, 64)):
        assert 0.7 < fl.spectral_excess(layer.weight) < fl.STRUCTURED_SPECTRUM, layer
        assert fl.looks_random(layer.weight, None, 0.8)
    smooth = _smooth_filters(16, 3, 5)
    assert not fl.looks_random(smooth, fl.noise_score(smooth), 0.8)
    low_rank = torch.randn(32, 2) @ torch.randn(2, 16)
    assert fl.spectral_excess(low_rank) > fl.STRUCTURED_SPECTRUM and not fl.looks_random(low_rank, None, 0.8)
    assert fl.looks_random(torch.ones(4, 4), None, 0.8)  # constant: no structure to speak of


@pytest.mark.parametrize("model", [PretrainedFrozenConv, lambda: FrozenEmbeddingsMLP(True)], ids=["conv", "linear"])
def test_a_pretrained_first_layer_frozen_on_purpose_raises_no_alert(model):
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer()
    data = shapes() if model is PretrainedFrozenConv else clusters()
    trainer(max_steps=220, callbacks=[monitor]).fit(model(), data)
    assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]
    assert monitor.note is not None and "frozen on purpose" in monitor.note


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")
def test_a_first_layer_frozen_at_its_random_init_is_still_alerted():
    L.seed_everything(0, verbose=False)
    monitor = FirstLayerVisualizer()
    trainer(max_steps=120, callbacks=[monitor]).fit(FrozenEmbeddingsMLP(False), clusters())
    (alert,) = monitor.alerts
    assert alert.kind == "not_changing" and "requires_grad=False" in alert.message and monitor.note is None
