"""One walk over nested batches and outputs (`diagnostics.walk.map_tensors` / `tensors_of`): every container kind
a user's batch comes in, the same order for listing and rebuilding, and a dataclass batch through all six
components in a real `fit`."""

from __future__ import annotations

import copy
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lightning_recipe
from lightning_recipe import CheckStatus
from lightning_recipe.callbacks._fixed_batch import _concat, _rows
from lightning_recipe.diagnostics.batch import default_inputs, default_targets
from lightning_recipe.diagnostics.sparse import slice_batch
from lightning_recipe.diagnostics.walk import first_tensor, map_tensors, tensors_of
from tests.models import MLPClassifier, cluster_data, trainer

Pair = namedtuple("Pair", ["x", "y"])


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    name: str = "clusters"


def _nested():
    a, b, c, d, e = (torch.full((4, 2), float(i)) for i in range(5))
    return {"pair": Pair(a, b), "items": [c, (d, "text")], "frozen": Batch(e, torch.arange(4)), "n": 3}


def test_every_container_is_walked_in_one_order_and_rebuilt_as_its_own_type():
    batch = _nested()
    found = tensors_of(batch)
    assert [float(t.float().flatten()[0]) for t in found] == [0, 1, 2, 3, 4, 0]
    doubled = map_tensors(batch, lambda t: t * 2)
    assert isinstance(doubled["pair"], Pair) and isinstance(doubled["frozen"], Batch)
    assert isinstance(doubled["items"], list) and isinstance(doubled["items"][1], tuple)
    assert doubled["items"][1][1] == "text" and doubled["n"] == 3 and doubled["frozen"].name == "clusters"
    assert all(torch.equal(t * 2, u) for t, u in zip(found, tensors_of(doubled), strict=True))
    assert first_tensor(batch) is found[0]
    ordered = map_tensors(OrderedDict(b=torch.ones(1), a=torch.zeros(1)), lambda t: t)
    assert isinstance(ordered, OrderedDict) and list(ordered) == ["b", "a"]


def test_hugging_face_containers_are_walked():
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert isinstance(map_tensors(encoding, lambda t: t + 1), transformers.BatchEncoding)
    output = transformers.modeling_outputs.CausalLMOutput(loss=torch.tensor(1.0), logits=torch.zeros(2, 3, 5))
    moved = map_tensors(output, lambda t: t + 1)
    assert type(moved) is type(output) and float(moved.loss) == 2.0 and float(moved["logits"].sum()) == 30.0
    assert [t.shape for t in tensors_of(output)] == [torch.Size([]), torch.Size([2, 3, 5])]


def test_the_cutters_and_the_joiner_take_dataclass_batches():
    batch = Batch(torch.arange(8.0).view(4, 2), torch.arange(4))
    cut = slice_batch(batch, slice(0, 2), 4)
    assert isinstance(cut, Batch) and cut.x.shape == (2, 2) and cut.y.tolist() == [0, 1]
    taken = slice_batch(batch, slice(0, 3), 4, (0, 1))
    assert isinstance(taken, Batch) and taken.y.tolist() == [0, 1, 2]
    joined = _concat([batch, batch])
    assert isinstance(joined, Batch) and joined.y.tolist() == [0, 1, 2, 3] * 2 and joined.name == "clusters"
    assert _rows(batch, 4) and not _rows(batch, 3)
    time_major = {"x": torch.zeros(7, 4, 3), "y": torch.zeros(7, 4)}  # (T, N, F): cut on dim 1
    assert slice_batch(time_major, slice(0, 2), 4, (0, 1))["x"].shape == (7, 2, 3)


def test_a_dataclass_batch_is_read_by_its_field_names():
    batch = Batch(torch.ones(4, 2), torch.arange(4))
    assert default_inputs(batch) is batch.x and default_targets(batch) is batch.y


# -- a dataclass batch through every component -----------------------------------------------------------------


@dataclass
class Examples:
    features: torch.Tensor
    label: torch.Tensor


def collate(items):
    xs, ys = zip(*items, strict=True)
    return Examples(torch.stack(xs), torch.stack(ys))


class DataclassModel(MLPClassifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.features), batch.label)


def _loader():
    return DataLoader(cluster_data(), batch_size=32, shuffle=True, collate_fn=collate)


def _fit(callbacks):
    L.seed_everything(3, verbose=False)
    model = DataclassModel()
    trainer(max_steps=5, callbacks=callbacks, deterministic=True).fit(model, _loader())
    return copy.deepcopy(model.state_dict())


def test_a_dataclass_batch_goes_through_all_six_components_without_an_adapter():
    checks = [getattr(lightning_recipe, n)() for n in ("InitLossCheck", "OverfitOneBatch", "BatchLeakageProbe")]
    monitors = [
        getattr(lightning_recipe, n)(every_n_steps=1)
        for n in ("UpdateRatioMonitor", "FirstLayerVisualizer", "PredictionDynamicsLogger")
    ]
    plain = _fit([])
    checked = _fit(checks + monitors)
    for check in checks:
        assert check.result.status is CheckStatus.PASSED, check.result.format()
    for monitor in monitors:
        assert monitor.enabled and monitor.alerts == [], monitor.name
    assert monitors[1].layer_name == "net.0" and monitors[2].batch is not None
    assert all(torch.equal(v, checked[k]) for k, v in plain.items())
