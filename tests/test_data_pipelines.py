"""Real data pipelines: the package never takes the user's data. Streams that hand each record out once, samplers
that keep state across passes and torchdata's StatefulDataLoader give training the same records in the same order
with every component on as without, and a seeded run ends bit-identical. Where a second pass is not safe, the
components read the first batch training fetches, and say so."""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import lightning_recipe
from lightning_recipe import (
    CheckStatus,
    FirstLayerVisualizer,
    InitLossCheck,
    PredictionDynamicsLogger,
    RecipeSuite,
    RecipeWarning,
    registry,
    sanity_run,
)
from lightning_recipe.callbacks import first_layer_visualizer
from lightning_recipe.callbacks._data import fresh_pass_refusal, own_copy
from tests.ddp import run_ddp
from tests.models import MLPClassifier, cluster_data, trainer

torch.set_num_threads(1)


# -- pipelines -----------------------------------------------------------------------------------------------------


class SharedCursor:
    """A queue every pass reads from: each record is handed out once (a socket, a message queue, a sharded reader
    with a global offset). Records are numbered, so who got which is known."""

    def __init__(self, n: int = 512) -> None:
        data = cluster_data(n=n)
        self.records = [(x, y, i) for i, (x, y) in enumerate(zip(data.tensors[0], data.tensors[1], strict=True))]
        self.position = 0

    def take(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self.position >= len(self.records):
            return None
        self.position += 1
        return self.records[self.position - 1]


class QueueStream(IterableDataset):
    def __init__(self, cursor: SharedCursor) -> None:
        self.cursor = cursor

    def __iter__(self):
        while (record := self.cursor.take()) is not None:
            yield record


class PairStream(IterableDataset):
    """``(x, y)`` records from a queue of this process's own."""

    def __init__(self, cursor: SharedCursor) -> None:
        self.cursor = cursor

    def __iter__(self):
        while (record := self.cursor.take()) is not None:
            yield record[:2]


class CurriculumSampler(Sampler[int]):
    """Each pass is the next curriculum stage: stage k shows the examples in a rotation by 37 k. The stage lives in
    the sampler, so an extra pass moves every later one."""

    def __init__(self, n: int) -> None:
        self.n, self.stage = n, 0

    def __iter__(self):
        start, self.stage = 37 * self.stage, self.stage + 1
        return iter([(start + i) % self.n for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


class Numbered(Dataset):
    """Cluster examples with their index, so the order training saw can be read back."""

    def __init__(self, n: int = 256) -> None:
        self.data = cluster_data(n=n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x, y, i


class Recording(MLPClassifier):
    """Records the example ids of every batch training gets, at the module's own ``on_train_batch_start`` (which
    Lightning calls for training's batches only; the checks call ``training_step``)."""

    SEEN: list[list[int]] = []

    def on_train_batch_start(self, batch, batch_idx):
        Recording.SEEN.append(batch[2].tolist())

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)


def _stream_loader() -> DataLoader:
    return DataLoader(QueueStream(SharedCursor()), batch_size=32)


def _curriculum_loader() -> DataLoader:
    data = Numbered()
    return DataLoader(data, batch_size=32, sampler=CurriculumSampler(len(data)))


def _stateful_loader() -> DataLoader:
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")
    return torchdata.StatefulDataLoader(Numbered(), batch_size=32, shuffle=True)


PIPELINES = {
    "queue_stream": _stream_loader,
    "curriculum_sampler": _curriculum_loader,
    "stateful_dataloader": _stateful_loader,
}


def _run(make_loader, callbacks: list[L.Callback], steps: int = 6, epochs: int = 1):
    L.seed_everything(7, workers=True, verbose=False)
    model = Recording()
    Recording.SEEN = []
    t = trainer(max_steps=steps, max_epochs=epochs, callbacks=callbacks, deterministic=True)
    t.fit(model, make_loader())
    return [list(b) for b in Recording.SEEN], copy.deepcopy(model.state_dict()), t


def _components(on_fail: str = "raise") -> list[L.Callback]:
    # the batch carries example ids third: the checks and monitors read `x` and `y` from the first two
    kwargs = dict(inputs=lambda b: b[0], targets=lambda b: b[1])
    checks = [cls(on_fail=on_fail, **kwargs) for cls in registry.CHECKS.values()]
    monitors = [cls(every_n_steps=1, **kwargs) for cls in registry.MONITORS.values()]
    return checks + monitors


def _one(components: list[L.Callback], cls: type) -> Any:
    return next(c for c in components if isinstance(c, cls))


# -- which loaders a second pass is safe for --------------------------------------------------------------------


class Subclassed(DataLoader):
    pass


class CustomSampler(SequentialSampler):
    pass


def test_a_second_pass_is_taken_only_where_it_provably_changes_nothing():
    data = TensorDataset(torch.arange(8.0))
    assert fresh_pass_refusal(DataLoader(data, batch_size=2, shuffle=True)) is None
    assert fresh_pass_refusal(DataLoader(data, batch_size=2)) is None
    weighted = WeightedRandomSampler(torch.ones(8), 8)
    assert fresh_pass_refusal(DataLoader(data, batch_size=2, sampler=weighted)) is None
    batches = BatchSampler(RandomSampler(data), 2, drop_last=False)
    assert fresh_pass_refusal(DataLoader(data, batch_sampler=batches)) is None
    wrapped = DistributedSamplerWrapper(weighted, num_replicas=2, rank=0)
    assert fresh_pass_refusal(DataLoader(data, batch_size=2, sampler=wrapped)) is None

    assert "IterableDataset (QueueStream)" in fresh_pass_refusal(_stream_loader())
    assert "CurriculumSampler" in fresh_pass_refusal(_curriculum_loader())
    assert "CustomSampler" in fresh_pass_refusal(DataLoader(data, sampler=CustomSampler(data)))  # a subclass too
    custom_batches = BatchSampler(CurriculumSampler(8), 2, drop_last=False)
    assert "CurriculumSampler" in fresh_pass_refusal(DataLoader(data, batch_sampler=custom_batches))
    wrapped_custom = DistributedSamplerWrapper(CurriculumSampler(8), num_replicas=2, rank=0)
    assert "CurriculumSampler" in fresh_pass_refusal(DataLoader(data, batch_size=2, sampler=wrapped_custom))
    assert "Subclassed" in fresh_pass_refusal(Subclassed(data))
    assert "StatefulDataLoader" in fresh_pass_refusal(_stateful_loader())
    assert "not one DataLoader" in fresh_pass_refusal([DataLoader(data)])


def test_a_copy_of_the_batch_leaves_the_original_untouched_by_in_place_edits():
    batch = {"x": torch.ones(2, 3), "labels": torch.tensor([1, 2])}
    mine = own_copy(batch)
    mine.pop("labels")
    mine["x"].mul_(0)
    assert set(batch) == {"x", "labels"} and bool(batch["x"].eq(1).all())


# -- training sees what it sees without the package ---------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINES)
def test_training_gets_the_same_records_in_the_same_order_and_ends_bit_identical(name):
    make = PIPELINES[name]
    seen_plain, state_plain, _ = _run(make, [])
    components = _components()
    seen_checked, state_checked, t = _run(make, components)
    assert seen_checked == seen_plain
    for key, value in state_plain.items():
        assert torch.equal(value, state_checked[key]), key
    for check in components[: len(registry.CHECKS)]:
        assert check.result.status is CheckStatus.PASSED, check.result.format()
        assert "Read from the first batch training fetched" in check.result.summary
        assert check.result.details["read"]
    for monitor in components[len(registry.CHECKS) :]:
        assert monitor.enabled and monitor.alerts == [], (monitor.name, [a.message for a in monitor.alerts])
    dynamics = _one(components, PredictionDynamicsLogger)
    assert dynamics.batch is not None and dynamics.batch_source == "train"
    assert _one(components, FirstLayerVisualizer).layer_name == "net.0"


def test_on_a_stream_the_stream_is_read_only_by_training():
    cursor = SharedCursor()
    L.seed_everything(7, verbose=False)
    t = trainer(max_steps=4, callbacks=_components())
    t.fit(Recording(), DataLoader(QueueStream(cursor), batch_size=32))
    # training's 4 batches plus the one Lightning's fetcher reads ahead to know whether a batch is the last
    assert cursor.position == 5 * 32


class EditsItsBatch(MLPClassifier):
    """Hugging Face style ``labels = batch.pop("labels")``, and a unit conversion done in place on the inputs."""

    def training_step(self, batch, batch_idx):
        y = batch.pop("labels")
        x = batch["x"].mul_(0.5)
        return F.cross_entropy(self(x), y)


class Dicts(IterableDataset):
    def __iter__(self):
        data = cluster_data()
        for x, y in zip(data.tensors[0], data.tensors[1], strict=True):
            yield {"x": x, "labels": y}


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")  # halving x on every call fails fitting
def test_a_training_step_that_edits_its_batch_in_place_gets_the_batch_untouched():
    """The checks run the user's training_step on a copy of the first batch, each call on its own containers: the
    checks' calls find the labels every time, and training's own first step gets its batch as fetched."""
    states = []
    for on in (False, True):
        L.seed_everything(7, verbose=False)
        model = EditsItsBatch()
        checks = [cls(on_fail="warn") for cls in registry.CHECKS.values()] if on else []
        t = trainer(max_steps=2, callbacks=checks)
        t.fit(model, DataLoader(Dicts(), batch_size=32))
        assert t.global_step == 2
        assert all("user_error" not in c.result.details for c in checks), [c.result.format() for c in checks]
        states.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def test_the_suite_waits_for_the_first_batch_too():
    suite = RecipeSuite(inputs=lambda b: b[0], targets=lambda b: b[1])
    seen_plain, state_plain, _ = _run(_stream_loader, [])
    seen, state, _ = _run(_stream_loader, [suite])
    assert seen == seen_plain and all(torch.equal(v, state[k]) for k, v in state_plain.items())
    assert [c.result.status for c in suite.checks] == [CheckStatus.PASSED] * 3


def test_a_stream_that_ends_before_its_first_batch_skips_the_checks_saying_why():
    checks = [cls() for cls in registry.CHECKS.values()]
    t = trainer(max_steps=2, max_epochs=1, callbacks=checks)
    t.fit(MLPClassifier(), DataLoader(QueueStream(SharedCursor(n=0)), batch_size=32))
    for check in checks:
        assert check.result.status is CheckStatus.SKIPPED
        assert "training ended before it fetched a batch" in check.result.summary


def test_a_sanity_run_reads_a_fresh_pass_even_of_a_stream():
    """Nothing trains after a sanity run: it reads the stream itself, and the report is the whole verdict."""
    cursor = SharedCursor()
    report = sanity_run(
        MLPClassifier(),
        train_dataloaders=DataLoader(PairStream(cursor), batch_size=32),
        accelerator="cpu",
        checks=list(registry.CHECKS),
    )
    assert report.passed, report.to_markdown()
    assert cursor.position > 0
    assert all("first batch training fetched" not in r.summary for r in report.results)


def test_a_stateful_dataloader_resumes_where_it_was_with_the_checks_on():
    """StatefulDataLoader's own contract: its state_dict after the run is what it is without the package."""
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")
    states = []
    for callbacks in ([], _components()):
        L.seed_everything(7, verbose=False)
        loader = torchdata.StatefulDataLoader(Numbered(), batch_size=32, shuffle=True)
        trainer(max_steps=3, callbacks=callbacks).fit(Recording(), loader)
        states.append(loader.state_dict())
    assert _same(states[0], states[1]), states


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_an_iterable_of_two_passes_sees_both_passes_as_without_the_package():
    """Two epochs over a stateful sampler: the stage advances once per epoch, as it would without the package."""
    seen_plain, _, _ = _run(_curriculum_loader, [], steps=-1, epochs=2)
    seen_checked, _, _ = _run(_curriculum_loader, _components(), steps=-1, epochs=2)
    assert seen_checked == seen_plain
    assert len(seen_plain) == 16 and seen_plain[8][0] == 37  # the second epoch is the second stage


# -- distributed ---------------------------------------------------------------------------------------------------


def ddp_stream_loader() -> DataLoader:
    """Each rank reads its own queue (sharded by rank in real jobs)."""
    return DataLoader(PairStream(SharedCursor(n=256)), batch_size=32)


def test_under_ddp_the_checks_run_on_each_ranks_first_batch_and_agree(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path,
        "tests.models:MLPClassifier",
        "tests.test_data_pipelines:ddp_stream_loader",
        [cls.__name__ for cls in registry.CHECKS.values()],
        max_steps=3,
    )
    assert code == 0, output[-3000:]
    assert set(ranks) == {0, 1}
    for rank in ranks.values():
        assert [r["status"] for r in rank["results"]] == ["passed"] * 3, rank
        assert all("first batch training fetched" in r["summary"] for r in rank["results"])


def test_the_dynamics_logger_reads_its_validation_batch_beside_several_training_loaders():
    """A dict of training loaders (which the logger does not read: the validation loader is safe to read) used to
    switch the logger off with "please report this"."""

    class TwoLoaders(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    logger = lightning_recipe.PredictionDynamicsLogger(every_n_steps=1)
    train = {"a": DataLoader(cluster_data(), batch_size=32), "b": DataLoader(cluster_data(seed=1), batch_size=32)}
    t = trainer(max_steps=3, callbacks=[logger], num_sanity_val_steps=2)  # the validation loader exists at the start
    t.fit(TwoLoaders(), train, DataLoader(cluster_data(seed=2), batch_size=32))
    assert logger.enabled and logger.batch_source == "val" and len(logger.history) >= 3


# -- a run resumed mid-stream ------------------------------------------------------------------------------------


class EmbeddingRecording(Recording):
    """Reads token ids through an embedding first, as a language model does (there one too large for
    FirstLayerVisualizer to keep a copy of in checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Flatten(), torch.nn.Linear(32, 4))


class TokenCursor(SharedCursor):
    """The numbered records of :class:`SharedCursor` with their features as 4 token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.records = [(x[:4].abs().mul(4).long().clamp(max=31), y, i) for x, y, i in self.records]


def _stream_fit(
    tmp_path, model: L.LightningModule, callbacks: list[L.Callback], steps: int, cursor: SharedCursor, ckpt=None
) -> list[list[int]]:
    """The records training gets in a run over ``cursor``'s stream in batches of 8: a first run checkpointed every 6
    steps, or one resumed from ``ckpt``."""
    L.seed_everything(7, verbose=False)
    Recording.SEEN = []
    if ckpt is None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=6)]
    run = trainer(tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=ckpt is None)
    run.fit(model, DataLoader(QueueStream(cursor), batch_size=8), ckpt_path=ckpt)
    return [list(b) for b in Recording.SEEN]


def _going_on_from(cursor: SharedCursor, position: int) -> SharedCursor:
    """``cursor`` as a stream that resumes where the interrupted run left it (a queue, a reader with an offset)."""
    cursor.position = position
    return cursor


@pytest.mark.filterwarnings("ignore::lightning_recipe.report.RecipeWarning")  # fitting 4 tokens: OverfitOneBatch
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("case", ["package_added_at_the_resume", "first_layer_too_large_to_keep"])
def test_a_stream_resumed_mid_stream_gives_training_the_records_it_gets_without_the_package(
    tmp_path, monkeypatch, case
):
    """Resumed at step 6 with records 48 on next in the stream: training gets 48-55, 56-63, 64-71 with every component
    on. A component with no saved state to take up (added at the resume; FirstLayerVisualizer over a first layer too
    large to keep in checkpoints, a language model's embedding) reads the first batch training fetches, resumed or
    not: a fresh pass would take 56-63 off the stream."""
    too_large = case == "first_layer_too_large_to_keep"
    model, cursor = (EmbeddingRecording, TokenCursor) if too_large else (Recording, SharedCursor)
    if too_large:  # 256 weights: larger than the copy a checkpoint keeps (a 2**24-weight embedding, in small)
        monkeypatch.setattr(first_layer_visualizer, "MAX_SAVED_WEIGHTS", 255)
    before = _components("warn") if too_large else []
    _stream_fit(tmp_path, model(), before, 6, cursor())
    ckpt = tmp_path / "step=6.ckpt"
    if too_large:  # the premise: nothing of the first layer to take up
        saved = torch.load(ckpt, weights_only=True)["callbacks"][_one(before, FirstLayerVisualizer).state_key]
        assert saved["measurements"] == {}

    plain = _stream_fit(tmp_path, model(), [], 9, _going_on_from(cursor(), 48), ckpt)
    components = _components("warn")
    seen = _stream_fit(tmp_path, model(), components, 9, _going_on_from(cursor(), 48), ckpt)
    assert [batch[0] for batch in plain] == [48, 56, 64]
    assert seen == plain
    visualizer, dynamics = _one(components, FirstLayerVisualizer), _one(components, PredictionDynamicsLogger)
    assert visualizer.enabled and visualizer.layer_name == "net.0"  # found on a copy of the batch of records 48-55
    assert dynamics.enabled and dynamics.batch is not None
    assert all(c.result.status is CheckStatus.SKIPPED for c in components[: len(registry.CHECKS)])


# -- a batch the package cannot copy -----------------------------------------------------------------------------


class LockedBatch:
    """A batch of the user's own class that `copy.deepcopy` refuses: it holds a lock (as a handle to a shared cache
    or a file does)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.lock = x, y, threading.Lock()


class LockedStream(IterableDataset):
    def __iter__(self):
        x, y = cluster_data().tensors
        for start in range(0, len(y), 32):
            yield LockedBatch(x[start : start + 32].clone(), y[start : start + 32].clone())


class ScalesItsBatch(MLPClassifier):
    """Converts units in place on its batch, as a `training_step` may."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.x.mul_(2.0)), batch.y)


def _locked_run(callbacks: list[L.Callback]) -> dict[str, torch.Tensor]:
    L.seed_everything(7, verbose=False)
    model = ScalesItsBatch()
    trainer(max_steps=3, callbacks=callbacks, deterministic=True).fit(
        model, DataLoader(LockedStream(), batch_size=None)
    )
    return copy.deepcopy(model.state_dict())


_READS_BATCHES = [InitLossCheck, FirstLayerVisualizer, PredictionDynamicsLogger]


@pytest.mark.parametrize("cls", _READS_BATCHES, ids=[cls.__name__ for cls in _READS_BATCHES])
def test_a_batch_the_package_cannot_copy_is_never_given_to_the_users_code(cls):
    """Training's own batch is never handed to the user's code by a component: one that cannot be copied is not
    read, and the component says why (a check skips, a monitor switches itself off), not as a bug of ours."""
    kwargs: dict[str, Any] = dict(inputs=lambda b: b.x, targets=lambda b: b.y)
    component = cls(on_fail="warn", **kwargs) if cls is InitLossCheck else cls(every_n_steps=1, **kwargs)
    plain = _locked_run([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = _locked_run([component])
    assert all(torch.equal(value, checked[key]) for key, value in plain.items())
    ours = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert not any("Please report" in message for message in ours), ours
    why = "the batch training fetched cannot be copied: `copy.deepcopy` raised TypeError"
    if cls is InitLossCheck:
        assert component.result.status is CheckStatus.SKIPPED
        assert why in component.result.summary and "is a LockedBatch" in component.result.summary
    else:
        assert not component.enabled
        assert len(ours) == 1 and why in ours[0] and "switched itself off; training goes on" in ours[0]
