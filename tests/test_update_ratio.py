"""UpdateRatioMonitor and its diagnostic: exact ratios on known tensors, the window verdicts, real Trainer runs
(gradient accumulation, manual optimization with two optimizers, schedulers), TensorBoard read back, each alert,
no side effects, DDP, and the sharded-norm reduction under FSDP2 on CPU."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_recipe import UpdateRatioMonitor
from lightning_recipe.callbacks._base import format_names
from lightning_recipe.diagnostics import update_ratio as ur
from tests.ddp import run_ddp, run_script
from tests.models import MLPClassifier, cluster_data, cluster_loader, loader, trainer
from tests.real_models import PolynomialRegression, polynomial_pairs
from tests.tensorboard import read_events
from tests.zoo import BatchNormCNN, LayerMissingFromOptimizer, LearningRate, PerStepDecay, clusters, shapes

ALERTS = "ignore::lightning_recipe.report.RecipeWarning"


# -- the diagnostic on tensors with known answers ------------------------------------------------------------


def test_known_update_gives_the_exact_ratio():
    w = torch.full((3, 4), 2.0)  # ||W|| = sqrt(12 * 4)
    before = ur.copy_weights([w])
    w[0, 0] += 0.3
    w[1, 2] -= 0.4  # ||ΔW|| = 0.5
    measured = ur.measure([w], before)
    assert measured.update_norms.item() == pytest.approx(0.5, rel=1e-6)
    assert measured.weight_norms.item() == pytest.approx(math.sqrt(48), rel=1e-6)
    assert measured.ratios.item() == pytest.approx(0.5 / math.sqrt(48), rel=1e-6)


def test_foreach_ratios_equal_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g) for shape in [(5, 3), (7,), (2, 3, 4, 4), (1,)]]
    reference_before = [p.clone() for p in params]
    before = ur.copy_weights(params)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.01)
    measured = ur.measure(params, before)
    brute = [float((p - b).norm() / b.norm()) for p, b in zip(params, reference_before, strict=True)]
    torch.testing.assert_close(measured.ratios, torch.tensor(brute), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_are_measured_in_fp32(dtype):
    p = torch.linspace(1, 2, 4096).to(dtype)
    before = ur.copy_weights([p])
    assert before[0].dtype == torch.float32
    exact_before = p.double()
    p.add_(torch.full_like(p, 2**-6))
    measured = ur.measure([p], before)
    reference = float((p.double() - exact_before).norm() / exact_before.norm())
    # fp16 norms of 4096 elements near 1.5 would overflow/round; fp32 keeps 6 digits
    assert measured.ratios.item() == pytest.approx(reference, rel=1e-5)
    assert torch.isfinite(measured.weight_norms).all()


def test_fp64_parameters_are_measured_in_fp64_next_to_fp32_ones():
    """An fp64 model (pytorch/examples' time-sequence LSTM trains in ``.double()``): its update of 1e-10 of the
    weight vanishes in fp32 (whose steps near 1.5 are 1.2e-7) and must be measured, and its gradient norm taken
    without narrowing (``vector_norm(dtype=float32)`` refuses an fp64 tensor)."""
    p64 = torch.linspace(1, 2, 4096, dtype=torch.float64, requires_grad=True)
    p32 = torch.linspace(1, 2, 64, requires_grad=True)
    (p64.sum() + p32.sum()).backward()
    before = ur.copy_weights([p64, p32])
    assert [b.dtype for b in before] == [torch.float64, torch.float32]
    norm64, norm32 = float(p64.detach().norm()), float(p32.detach().norm())
    with torch.no_grad():
        p64.add_(1e-10)
        p32.add_(2**-10)
    measured = ur.measure([p64, p32], before)
    assert measured.ratios[0].item() == pytest.approx(1e-10 * 64 / norm64, rel=1e-6)
    assert measured.ratios[1].item() == pytest.approx(2**-10 * 8 / norm32, rel=1e-5)
    gradients = ur.gradient_squared_norms([p64, p32]).sqrt()
    torch.testing.assert_close(gradients, torch.tensor([64.0, 8.0], dtype=torch.float64))


def test_non_finite_weights_or_updates_are_flagged():
    params = [torch.ones(2, 2), torch.ones(3), torch.ones(2, 2)]
    before = ur.copy_weights(params)
    params[0][0, 0] = float("nan")
    params[2][1, 1] = float("inf")
    assert ur.measure(params, before).non_finite.tolist() == [True, False, True]


def test_median_uses_weight_matrices_and_skips_tiny_norms():
    ratios = torch.tensor([1e-3, 5.0, 2e-3, 3e-3, 1e2])
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-9])
    # the 1-D bias (5.0) is left out while matrices exist; the matrix with a tiny norm too
    assert ur.median_ratio(ratios, norms, [True, False, True, True, True]) == pytest.approx(2e-3)
    # no matrix: all parameters with a usable norm
    assert ur.median_ratio(ratios[:2], norms[:2], [False, False]) == pytest.approx(1e-3)
    assert ur.median_ratio(torch.tensor([1.0]), torch.tensor([0.0]), [True]) is None


def test_a_single_spike_does_not_alert_a_sustained_high_median_does():
    healthy, spike = 3e-3, 0.5
    assert not ur.sustained([healthy, healthy, spike, healthy, healthy], 0.1, above=True, window=5)
    assert not ur.sustained([spike, spike, healthy, healthy, healthy], 0.1, above=True, window=5)
    assert ur.sustained([spike, healthy, spike, healthy, spike], 0.1, above=True, window=5)
    assert not ur.sustained([spike] * 4, 0.1, above=True, window=5)  # not a full window yet
    assert ur.sustained([1e-7] * 3 + [3e-3] * 2, 1e-5, above=False, window=5)
    assert not ur.sustained([1e-7] * 2 + [3e-3] * 2, 1e-5, above=False, window=4)  # half is not most


def test_one_zero_update_is_no_evidence_of_a_parameter_that_never_moves():
    assert not ur.never_moved(1, window=5)
    assert ur.never_moved(5, window=5)


def test_names_are_listed_a_few_then_counted():
    assert format_names(["a", "b"]) == "a, b"
    assert format_names(tuple(f"p{i}" for i in range(8))) == "p0, p1, p2, p3, p4 and 3 more"
    assert format_names([f"p{i}" for i in range(8)], limit=3) == "p0, p1, p2 and 5 more"


# -- construction --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` to be an integer >= 1, but got 0"),
        ({"window": 0}, r"`window` to be an integer >= 1, but got 0"),
        ({"max_ratio": -1.0}, r"`max_ratio` to be a finite positive number, but got -1.0"),
        ({"min_ratio": "low"}, r"`min_ratio` to be a finite positive number, but got 'low'"),
        ({"min_ratio": 0.5, "max_ratio": 0.1}, r"`min_ratio` to be below `max_ratio`"),
    ],
)
def test_bad_arguments_are_refused_with_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateRatioMonitor(**kwargs)


# -- through a real Trainer ----------------------------------------------------------------------------------


class BruteForceAroundStep(Callback):
    """Reference: copies the weights before each real optimizer step (Lightning's hook) and compares after the
    batch with the ratio the monitor measured on that step."""

    def __init__(self, monitor: UpdateRatioMonitor) -> None:
        self.monitor = monitor
        self.before: dict[str, torch.Tensor] | None = None
        self.compared = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is None:
            return
        for name, p in pl_module.named_parameters():
            ref = float((p.detach() - self.before[name]).norm() / self.before[name].norm())
            assert self.monitor.last_ratios[name] == pytest.approx(ref, rel=1e-5), name
        self.before = None
        self.compared += 1


def test_gradient_accumulation_measures_each_real_optimizer_step_once():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=1)
    reference = BruteForceAroundStep(monitor)
    t = trainer(max_steps=6, accumulate_grad_batches=4, callbacks=[monitor, reference])
    t.fit(MLPClassifier(), loader(cluster_data(), batch_size=8))
    assert t.global_step == 6
    assert monitor.measured_steps == [(0, s) for s in range(6)]  # 24 batches, 6 steps
    assert reference.compared == 6


def test_every_n_steps_counts_optimizer_steps_after_the_first_window():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=4, window=2)
    trainer(max_steps=13, accumulate_grad_batches=2, callbacks=[monitor]).fit(MLPClassifier(), cluster_loader())
    assert [s for _, s in monitor.measured_steps] == [0, 1, 4, 8, 12]


class TinyGAN(L.LightningModule):
    """Manual optimization with two optimizers; checks the monitor against brute force after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.monitor: UpdateRatioMonitor | None = None
        self.checked: list[str] = []

    def _step(self, opt, module: nn.Module, loss: torch.Tensor, which: str) -> None:
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        prefix = "generator." if module is self.generator else "discriminator."
        for n, p in module.named_parameters():
            ref = float((p.detach() - before[n]).norm() / before[n].norm())
            assert self.monitor.last_ratios[prefix + n] == pytest.approx(ref, rel=1e-5)
        self.checked.append(which)

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 4))
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        self._step(opt_d, self.discriminator, d_loss, "d")
        g_loss = F.softplus(-self.discriminator(self.generator(torch.randn(real.shape[0], 4)))).mean()
        self._step(opt_g, self.generator, g_loss, "g")

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.SGD(self.discriminator.parameters(), lr=1e-2),
        )


def test_manual_optimization_with_two_optimizers_is_measured_per_optimizer():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=1)
    model = TinyGAN()
    model.monitor = monitor
    t = trainer(max_steps=8, callbacks=[monitor])
    t.fit(model, loader(cluster_data(in_dim=8), batch_size=16))
    assert model.checked == ["d", "g"] * 4
    # optimizer 1 (discriminator) steps first; global_step advances once per optimizer step
    assert monitor.measured_steps == [(1, 0), (0, 1), (1, 2), (0, 3), (1, 4), (0, 5), (1, 6), (0, 7)]
    assert monitor.alerts == []


def test_every_n_steps_counts_each_optimizers_own_steps():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=2, window=1)
    model = TinyGAN()
    model.monitor = monitor
    model._step = lambda opt, module, loss, which: (opt.zero_grad(), model.manual_backward(loss), opt.step())
    trainer(max_steps=8, callbacks=[monitor]).fit(model, loader(cluster_data(in_dim=8), batch_size=16))
    # each optimizer steps 4 times and is measured on its own steps 0 and 2 (not starved by the interleaving)
    assert sorted(monitor.measured_steps) == [(0, 1), (0, 5), (1, 0), (1, 4)]


def _read_tensorboard(log_dir: Path):

    acc = read_events(str(log_dir))
    return acc


def test_tensorboard_gets_per_parameter_ratios_a_histogram_and_the_median(tmp_path):
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=3, window=2)
    logger = TensorBoardLogger(str(tmp_path), name="", version=0)
    t = trainer(max_steps=7, callbacks=[monitor], logger=logger)
    t.fit(MLPClassifier(), cluster_loader())
    logger.experiment.flush()
    acc = _read_tensorboard(tmp_path / "version_0")
    tags = acc.Tags()
    base = "recipe/update_ratio_monitor/"
    names = [n for n, _ in MLPClassifier().named_parameters()]
    assert {base + f"log10_ratio/{n}" for n in names} | {base + "median_log10_ratio"} <= set(tags["scalars"])
    assert base + "log10_ratios" in tags["histograms"]
    for n in names:
        events = acc.Scalars(base + f"log10_ratio/{n}")
        assert [e.step for e in events] == [0, 1, 3, 6]
        assert events[-1].value == pytest.approx(math.log10(monitor.last_ratios[n]), abs=1e-5)
    median = acc.Scalars(base + "median_log10_ratio")[-1].value
    matrices = sorted(monitor.last_ratios[n] for n in names if n.endswith("weight"))
    assert median == pytest.approx(math.log10(matrices[0]), abs=1e-5)  # lower middle of two
    histogram = acc.Histograms(base + "log10_ratios")
    assert [h.step for h in histogram] == [0, 1, 3, 6]
    assert histogram[-1].histogram_value.num == len(names)


# -- each alert on a model built to trigger it ---------------------------------------------------------------


@pytest.mark.filterwarnings(ALERTS)
def test_learning_rate_100x_too_high_is_alerted_with_the_lr_and_the_factor():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    trainer(max_steps=10, callbacks=[monitor]).fit(LearningRate(0.3), clusters())
    alert = next(a for a in monitor.alerts if a.kind == "ratio_too_high")
    assert alert.step <= 5
    assert "3.0e-01" in alert.message and "divide the learning rate by ~" in alert.message
    assert "net.0.weight" in alert.message or "head.weight" in alert.message or "net.2.weight" in alert.message


@pytest.mark.filterwarnings(ALERTS)
def test_learning_rate_far_too_low_is_alerted_with_the_lr():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    with pytest.warns(UserWarning, match="ratio_too_low"):
        trainer(max_steps=10, callbacks=[monitor]).fit(LearningRate(1e-7), clusters())
    alert = next(a for a in monitor.alerts if a.kind == "ratio_too_low")
    assert "1.0e-07" in alert.message and "multiply the learning rate by ~" in alert.message


@pytest.mark.filterwarnings(ALERTS)
def test_a_schedule_stepping_every_batch_is_named_as_the_cause():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    trainer(max_steps=220, callbacks=[monitor]).fit(PerStepDecay(), clusters())
    alert = next(a for a in monitor.alerts if a.kind == "ratio_too_low")
    assert "fell from 3.0e-03" in alert.message and "every batch instead of every epoch" in alert.message
    assert "changed by a scheduler from 3.0e-03" in alert.message


@pytest.mark.filterwarnings(ALERTS)
def test_a_layer_missing_from_the_optimizer_is_alerted_at_the_start_by_name():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    trainer(max_steps=2, callbacks=[monitor]).fit(LayerMissingFromOptimizer(), clusters())
    (alert,) = [a for a in monitor.alerts if a.kind == "not_in_optimizer"]
    assert alert.step == 0
    assert "net.0.weight, net.0.bias, net.2.weight, net.2.bias" in alert.message


class UnusedBranch(MLPClassifier):
    """A layer that is in the optimizer but not in the loss; a second one in a param group with lr 0."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(8, 8)
        self.frozen_by_lr = nn.Linear(4, 4)

    def forward(self, x):
        return self.frozen_by_lr(self.net(x))

    def configure_optimizers(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("frozen_by_lr")]
        return torch.optim.Adam([{"params": rest}, {"params": self.frozen_by_lr.parameters(), "lr": 0.0}], lr=1e-2)


@pytest.mark.filterwarnings(ALERTS)
def test_a_parameter_that_never_moves_is_alerted_by_name_with_its_lr():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=1, window=3)
    trainer(max_steps=4, callbacks=[monitor]).fit(UnusedBranch(), cluster_loader())
    (alert,) = [a for a in monitor.alerts if a.kind == "not_moving"]
    assert alert.step == 2
    for name in ("unused.weight", "unused.bias", "frozen_by_lr.weight", "frozen_by_lr.bias"):
        assert name in alert.message
    assert "net.0.weight" not in alert.message
    assert "0.0, 1.0e-02" in alert.message and "no gradient reaches them" in alert.message


class Diverges(MLPClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


@pytest.mark.filterwarnings(ALERTS)
def test_non_finite_weights_are_alerted_by_name():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=1)
    trainer(max_steps=4, callbacks=[monitor]).fit(Diverges(), cluster_loader())
    (alert,) = [a for a in monitor.alerts if a.kind == "non_finite"]
    assert alert.step == 2
    assert "net.0.weight" in alert.message and "1.0e-02" in alert.message
    assert monitor.enabled


# -- never in the way ----------------------------------------------------------------------------------------


def _seeded_run(with_monitor: bool):
    L.seed_everything(3, workers=True, verbose=False)
    model = BatchNormCNN()
    callbacks = [UpdateRatioMonitor(every_n_steps=1)] if with_monitor else []
    t = trainer(max_steps=12, deterministic=True, callbacks=callbacks)
    t.fit(model, shapes())
    return model.state_dict(), t.optimizers[0].state_dict(), torch.get_rng_state()


def test_the_monitor_leaves_training_bit_identical():
    weights, opt, rng = _seeded_run(True)
    weights_ref, opt_ref, rng_ref = _seeded_run(False)
    assert weights.keys() == weights_ref.keys()
    for k in weights:
        assert torch.equal(weights[k], weights_ref[k]), k
    for i, state in opt_ref["state"].items():
        for k, v in state.items():
            assert torch.equal(opt["state"][i][k], v), (i, k)
    assert torch.equal(rng, rng_ref)


def test_an_internal_error_switches_the_monitor_off_with_one_warning_and_training_goes_on(monkeypatch):
    monitor = UpdateRatioMonitor(every_n_steps=1)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ur, "squared_norms", boom)
    t = trainer(max_steps=5, callbacks=[monitor])
    with pytest.warns(UserWarning, match="switched itself off.*boom"):
        t.fit(MLPClassifier(), cluster_loader())
    assert t.global_step == 5
    assert not monitor.enabled
    assert t.optimizers[0]._optimizer_step_pre_hooks == {}  # hooks released
    assert t.optimizers[0]._optimizer_step_post_hooks == {}


def test_hooks_are_removed_when_fit_ends():
    monitor = UpdateRatioMonitor()
    t = trainer(max_steps=2, callbacks=[monitor])
    t.fit(MLPClassifier(), cluster_loader())
    assert t.optimizers[0]._optimizer_step_pre_hooks == {}
    assert t.optimizers[0]._optimizer_step_post_hooks == {}


# -- distributed ---------------------------------------------------------------------------------------------


def test_ddp_both_ranks_agree_and_only_rank_zero_writes(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path,
        model="tests.zoo:LearningRate",
        model_kwargs={"lr": 1e-7},
        data="tests.models:cluster_loader",
        check="UpdateRatioMonitor",
        check_kwargs={"every_n_steps": 2},
        max_steps=8,
        tensorboard=True,
    )
    assert code == 0, output
    assert set(ranks) == {0, 1}
    assert all(r["error"] is None for r in ranks.values()), output
    assert ranks[0]["enabled"] == ranks[1]["enabled"] == [True]
    assert ranks[0]["alerts"] == ranks[1]["alerts"]
    assert ["ratio_too_low", 4] in ranks[0]["alerts"][0]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys
    import torch
    import torch.distributed as dist
    from torch import nn

    def main(rank, world, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from lightning_recipe.diagnostics import update_ratio as ur

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 7))  # 3 and 7 rows: uneven shards
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        params = list(model.parameters())
        full_before = [p.full_tensor().detach().clone() for p in params]
        before = ur.copy_weights(params)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
        measured = ur.measure(params, before)  # reduces the squared norms across the two shards
        full_after = [p.full_tensor().detach() for p in params]
        reference = [float((a - b).norm() / b.norm()) for a, b in zip(full_after, full_before)]
        seen = dict(
            types=[type(p).__name__ for p in params], local=[list(p.to_local().shape) for p in params],
            ratios=measured.ratios.tolist(), reference=reference,
        )
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective (a SIGABRT under load)
        dist.destroy_process_group()

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(main, args=(2, port, sys.argv[1]), nprocs=2)
    """
)


def test_sharded_norms_are_reduced_across_ranks_to_the_full_tensor_ratio(tmp_path):
    _, seen = run_script(tmp_path, FSDP_SCRIPT, timeout=180)
    assert seen[0]["types"] == ["DTensor"] * 4
    assert seen[0]["local"] != seen[1]["local"]  # each rank holds a different shard
    for rank in seen:
        assert rank["ratios"] == pytest.approx(rank["reference"], rel=1e-5)
    assert seen[0]["ratios"] == seen[1]["ratios"]  # every rank takes the same decisions


class ShardedLowLR(MLPClassifier):
    """FSDP2 through Lightning's ModelParallelStrategy: the parameters the monitor sees are DTensor shards."""

    def __init__(self) -> None:
        super().__init__(lr=1e-7)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


MODEL_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_recipe import UpdateRatioMonitor
    from tests.models import cluster_loader
    from tests.test_update_ratio import ShardedLowLR

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor(every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    )
    trainer.fit(ShardedLowLR(), cluster_loader())
    seen = dict(enabled=monitor.enabled, alerts=[[a.kind, a.step] for a in monitor.alerts],
                ratios=monitor.last_ratios, types=[type(p).__name__ for p in trainer.lightning_module.parameters()])
    (Path(sys.argv[1]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    """
)


def test_fsdp2_through_lightning_gives_every_rank_the_same_ratios_and_alerts(tmp_path):
    _, seen = run_script(tmp_path, MODEL_PARALLEL_SCRIPT)
    assert seen[0]["types"] == ["DTensor"] * 4
    assert seen[0]["enabled"] and seen[1]["enabled"]
    assert seen[0]["ratios"] == seen[1]["ratios"]
    assert seen[0]["alerts"] == seen[1]["alerts"] == [["ratio_too_low", 4]]


# -- healthy runs that used to raise false alarms (issue 10) ---------------------------------------------------


def test_a_step_without_gradients_is_recognised_from_the_gradient_norms():
    assert ur.no_gradient([0.0, 0.0], [False, False]) and ur.no_gradient([0.0, 0.0], [True, True])
    assert not ur.no_gradient([0.0, 1e-12], [True, True])
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))]
    params[1].grad = torch.full((2, 2), 2.0)
    assert ur.gradient_squared_norms(params).tolist() == [0.0, 16.0]


def test_a_bias_cancelled_by_a_normalisation_is_told_from_a_starved_one():
    names = ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    updates = [0.1, 0.0, 0.1, 0.0]
    grads = [1.0, 1e-9, 1.0, 0.0]
    assert ur.cancelled_biases(names, updates, grads, [True, True, True, True]) == {"fc.bias": "fc.weight"}
    assert ur.cancelled_biases(names, updates, grads, [True, False, True, False]) == {}  # no gradient: starved
    assert ur.cancelled_biases(names, [0.0, 0.0, 0.1, 0.0], grads, [True] * 4) == {}  # its weight does not move


def test_the_first_steps_alert_only_when_the_loss_diverges():
    assert ur.loss_diverged([1.5, 12.3, 18.3, 2.1])  # Adam at 0.3 on the MLP
    assert not ur.loss_diverged([16.2, 16.3, 45.6, 11.3, 5.6])  # SGD at 0.1 on a polynomial: noisy, converging
    assert ur.loss_diverged([1.0, math.inf]) and not ur.loss_diverged([1.0]) and not ur.loss_diverged([0.0, 5.0])


class SkipsEveryOtherBatch(MLPClassifier):
    """`training_step` returns None on odd batches: Lightning's documented way to skip a batch."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_skipped_batches_are_not_measured_and_raise_no_alert():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    t = trainer(max_steps=300, callbacks=[monitor])
    t.fit(SkipsEveryOtherBatch(), cluster_loader())
    assert monitor.alerts == [], [a.message for a in monitor.alerts]
    assert monitor.skipped_steps, "the skipped steps were measured"
    measured = {s for _, s in monitor.measured_steps}
    skipped = {s for _, s in monitor.skipped_steps}
    assert not measured & skipped
    # every regular measuring step that landed on a skipped batch was made up for at the next step
    for s in skipped:
        if s % 50 == 0:
            assert s + 1 in measured, (s, sorted(measured))


class BiasBeforeBatchNorm(MLPClassifier):
    """Linear (with bias) -> BatchNorm1d -> ReLU -> Linear, plain SGD: the first bias gets ~0 gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_bias_before_batchnorm_under_sgd_is_a_note_not_an_alert():
    L.seed_everything(0, verbose=False)
    monitor = UpdateRatioMonitor()
    trainer(max_steps=300, callbacks=[monitor]).fit(BiasBeforeBatchNorm(), cluster_loader())
    assert monitor.alerts == [], [a.message for a in monitor.alerts]
    assert len(monitor.notes) == 1 and "net.0.bias" in monitor.notes[0] and "normalisation" in monitor.notes[0]


def polynomial_loader(seed: int) -> torch.utils.data.DataLoader:
    """pytorch/examples' regression data (``tests.real_models.polynomial_pairs``), 3,200 points."""
    return loader(polynomial_pairs(3200, seed), batch_size=32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_first_steps_of_a_tiny_model_that_converges_raise_no_alert(seed):
    L.seed_everything(seed, verbose=False)
    monitor = UpdateRatioMonitor()
    model = PolynomialRegression()
    trainer(max_steps=300, callbacks=[monitor]).fit(model, polynomial_loader(seed))
    assert monitor.alerts == [], [a.message for a in monitor.alerts]
