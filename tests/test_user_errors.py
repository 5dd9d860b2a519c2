"""The user's exception is the user's: an error raised by the user's `training_step`, `forward` or data during a
check fails a sanity run (exit 1, with the exception, its message and where it was raised), comes out of a normal
`fit` as the same object with no warning of ours before it, and is told apart from a bug of the package (which
stays a `skipped` result with "please report this")."""

from __future__ import annotations

import copy
import json
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F

from lightning_recipe import InitLossCheck, OverfitOneBatch, RecipeSuite, sanity_run
from lightning_recipe.cli import main
from lightning_recipe.report import RecipeWarning
from tests.ddp import run_ddp
from tests.models import MLPClassifier, cluster_data, loader, trainer

torch.set_num_threads(1)


#: what the models below raised, last one last (kept outside the module: the checks restore its attributes)
RAISED: list[BaseException] = []


class CrashingStep(MLPClassifier):
    """`training_step` gives a float target to `cross_entropy` on every call; the last error is kept."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        try:
            return F.cross_entropy(self(x), y.float())  # the bug: class indices given as floats of the wrong shape
        except Exception as error:
            RAISED.append(error)
            raise


class CrashingForward(MLPClassifier):
    """`forward` views its input wrongly on every call."""

    def forward(self, x):
        try:
            return self.net(x.view(-1, 5))
        except Exception as error:
            RAISED.append(error)
            raise


def data():
    return loader(cluster_data(n=128))


@pytest.mark.parametrize("model_cls", [CrashingStep, CrashingForward])
def test_a_sanity_run_of_a_crashing_model_fails_with_the_users_exception(model_cls):
    report = sanity_run(model_cls(), train_dataloaders=data(), accelerator="cpu", num_sanity_val_steps=0)
    assert not report.passed
    statuses = {r.name: r.status.value for r in report.results}
    # every check that runs the crashing code fails; the leakage probe runs only `forward`, and a classifier's
    # `training_step` is not called to read a next-token shift it cannot have
    crashing = {"InitLossCheck", "OverfitOneBatch"} | ({"BatchLeakageProbe"} if model_cls is CrashingForward else set())
    assert {name for name, status in statuses.items() if status == "failed"} == crashing, statuses
    result = report.results[0]
    error = result.details["user_error"]
    assert error["type"] == "RuntimeError"
    assert error["location"].startswith(__file__) and error["function"] in ("training_step", "forward")
    assert "RuntimeError" in result.summary and __file__ in result.summary
    assert "please report" not in report.to_markdown().lower()


@pytest.mark.parametrize("model_cls", [CrashingStep, CrashingForward])
@pytest.mark.parametrize("make", [lambda: [InitLossCheck()], lambda: [OverfitOneBatch()], lambda: [RecipeSuite()]])
def test_in_a_normal_run_the_users_exception_object_comes_out_of_fit_and_no_warning_of_ours(model_cls, make):
    model = model_cls()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as info:
            trainer(callbacks=make()).fit(model, data())
    assert info.value is RAISED[-1]
    assert not [w for w in caught if issubclass(w.category, RecipeWarning)], [str(w.message) for w in caught]


def test_a_bug_planted_in_the_package_is_skipped_with_please_report_and_training_goes_on(monkeypatch):
    import lightning_recipe.callbacks.init_loss_check as module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(module, "loss_readings", broken)
    check = InitLossCheck()
    t = trainer(callbacks=[check])
    with pytest.warns(RecipeWarning, match="Please report this: ZeroDivisionError: planted"):
        t.fit(MLPClassifier(), data())
    assert check.result.status.value == "skipped" and "user_error" not in check.result.details
    assert t.global_step == 3


def test_a_bug_planted_in_the_package_does_not_fail_a_sanity_run(monkeypatch):
    import lightning_recipe.callbacks.init_loss_check as module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(module, "loss_readings", broken)
    with pytest.warns(RecipeWarning, match="Please report this: ZeroDivisionError: planted"):
        report = sanity_run(MLPClassifier(), train_dataloaders=data(), accelerator="cpu", checks=["init_loss_check"])
    [result] = report.results
    assert result.status.value == "skipped" and "user_error" not in result.details
    assert not report.checked  # nothing checked (exit status 3), and nothing failed


class RefusesNonFinite(MLPClassifier):
    """A `training_step` that validates its logits, as BCE validates its input range."""

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        if not logits.isfinite().all():
            raise ValueError("non-finite logits")
        return F.cross_entropy(logits, batch[1])


def test_whose_error_is_asked_on_the_weights_the_check_began_with(monkeypatch):
    """A check that drove the weights to NaN (as a too-large learning rate does) and then failed: the user's step
    on the user's own weights runs fine, so the error is ours, and training goes on from the untouched weights."""
    import lightning_recipe.callbacks.init_loss_check as module

    def broken(ctx):
        with torch.no_grad():
            for p in ctx.module.parameters():
                p.fill_(float("nan"))
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(module.InitLossCheck, "run", lambda self, ctx: broken(ctx))
    check = InitLossCheck()
    t = trainer(callbacks=[check])
    with pytest.warns(RecipeWarning, match="Please report this: ZeroDivisionError: planted"):
        t.fit(RefusesNonFinite(), data())
    assert check.result.status.value == "skipped" and "user_error" not in check.result.details
    assert t.global_step == 3


def test_a_guess_of_ours_that_the_model_refuses_is_skipped_not_blamed_on_the_user():
    """`forward(self, batch)` cannot take `x`: our guess fails, the user's training_step runs fine."""

    class WholeBatch(MLPClassifier):
        def forward(self, batch):
            x, _ = batch
            return self.net(x.view(x.shape[0], -1)[:, :3])  # raises on a guess of `x` alone only via net

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

    report = sanity_run(WholeBatch(), train_dataloaders=data(), accelerator="cpu", checks=["init_loss_check"])
    assert all("user_error" not in r.details for r in report.results)


def test_a_crashing_dataset_is_the_users_error():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            raise KeyError(f"record {i} missing")

    report = sanity_run(
        MLPClassifier(),
        train_dataloaders=loader(Broken()),
        accelerator="cpu",
        checks=["init_loss_check"],
        num_sanity_val_steps=0,
    )
    # Lightning itself reads the first batch before the checks run, so either it or the check stops the run
    [result] = report.results
    assert result.status.value == "failed" and result.details["user_error"]["type"] == "KeyError"


def test_the_cli_exits_1_with_the_users_exception_in_the_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    code = main(
        [
            "check",
            "tests.test_user_errors:CrashingStep",
            "--data",
            "tests.test_user_errors:data",
            "--accelerator",
            "cpu",
            "--report",
            str(path),
        ]
    )
    out = capsys.readouterr()
    assert code == 1, out.err[-3000:]
    checks = json.loads(path.read_text())["checks"]
    assert checks[0]["details"]["user_error"]["type"] == "RuntimeError"
    assert "test_user_errors.py" in checks[0]["details"]["user_error"]["location"]


SCRIPT = """
import sys
import lightning.pytorch as L
from lightning_recipe import RecipeSuite
from tests.test_user_errors import CrashingForward, data
L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
          default_root_dir=sys.argv[1], callbacks=[RecipeSuite(report_dir=sys.argv[1])]).fit(CrashingForward(), data())
"""


def test_the_environment_variable_sanity_run_exits_1_with_the_users_exception(tmp_path):
    from tests.test_sanity_run_process import run

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = run([str(script), str(tmp_path)], tmp_path)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    data_ = json.loads((tmp_path / "sanity_run.json").read_text())
    assert not data_["passed"]
    assert data_["checks"][0]["details"]["user_error"]["function"] == "forward"
    assert "Please report" not in proc.stdout + proc.stderr


def test_under_ddp_a_crashing_training_step_raises_the_users_exception_on_both_ranks(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path, "tests.test_user_errors:CrashingStep", "tests.models:cluster_loader", "InitLossCheck"
    )
    assert sorted(ranks) == [0, 1], output[-4000:]
    for seen in ranks.values():
        assert seen["error"] == "RuntimeError", seen
        assert seen["global_step"] == 0


class CrashesOnRankOne(MLPClassifier):
    """`training_step` raises on rank one only (a bad shard); rank zero's step runs."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            raise ValueError("shard 1 holds a record with 9 features, expected 8")
        return super().training_step(batch, batch_idx)


def test_under_ddp_a_crash_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    code, ranks, output = run_ddp(
        tmp_path,
        "tests.test_user_errors:CrashesOnRankOne",
        "tests.models:cluster_loader",
        ["InitLossCheck", "OverfitOneBatch"],
    )
    assert code != 0
    assert sorted(ranks) == [0, 1], output[-4000:]
    assert ranks[1]["error"] == "ValueError" and "shard 1 holds" in ranks[1]["message"]
    # rank zero saw no error of its own: it stops with the agreed verdict, which names rank one's
    assert ranks[0]["error"] == "RecipeCheckError" and "ValueError: shard 1 holds" in ranks[0]["message"]
    assert all(seen["global_step"] == 0 for seen in ranks.values())
    assert ranks[0]["result"]["details"]["rank"] == 1


# -- manual optimization ---------------------------------------------------------------------------------------------


class ManualOptimization(MLPClassifier):
    """Steps its own optimizer (`automatic_optimization = False`)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        optimizer.step()


class ManualCrashingForward(CrashingForward, ManualOptimization):
    """`forward` views its input wrongly on every call, under manual optimization."""


class ManualWithoutForward(ManualOptimization):
    """Under manual optimization, a `training_step` that calls its layers itself: the model cannot be called as
    `model(x)`, which every check's guess tries, but training runs."""

    def forward(self, x):
        raise TypeError("call the layers: this model has no forward")

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        optimizer.step()


def test_under_manual_optimization_the_users_exception_fails_a_sanity_run_too():
    """As for automatic optimization: the user's `training_step` is asked whose error it is, up to its first update."""
    report = sanity_run(ManualCrashingForward(), train_dataloaders=data(), accelerator="cpu", num_sanity_val_steps=0)
    assert [r.status.value for r in report.results] == ["failed"] * len(report.results), report.to_markdown()
    error = report.results[0].details["user_error"]
    assert error["type"] == "RuntimeError" and error["function"] == "forward"
    assert error["location"].startswith(__file__) and error["message"] == str(RAISED[-1])
    assert "please report" not in report.to_markdown().lower()


class ManualCrashingLoss(ManualOptimization):
    """`forward` runs, then the loss in `training_step` raises: no check calls the whole step under manual
    optimization, so only running it up to its first update finds the crash before training does."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.optimizers().zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y[:, None]))  # a target of the wrong shape


def test_under_manual_optimization_a_crash_past_the_forward_pass_fails_a_sanity_run():
    report = sanity_run(ManualCrashingLoss(), train_dataloaders=data(), accelerator="cpu", num_sanity_val_steps=0)
    assert not report.passed and "passed" not in [r.status.value for r in report.results], report.to_markdown()
    failed = [r for r in report.results if r.status.value == "failed"]
    assert failed, report.to_markdown()  # OverfitOneBatch skips manual optimization before it reads a batch
    for result in failed:
        error = result.details["user_error"]
        assert error["function"] == "training_step" and error["location"].startswith(__file__)
    # in a normal run the same exception leaves `fit`, as it does at step 0 without the package
    with pytest.raises(type(_raised_by_step(ManualCrashingLoss()))):
        trainer(max_steps=1, callbacks=[InitLossCheck()]).fit(ManualCrashingLoss(), data())


def _raised_by_step(model: ManualCrashingLoss) -> Exception:
    try:
        trainer(max_steps=1).fit(model, data())
    except Exception as error:  # noqa: BLE001 - the exception training itself raises
        return error
    raise AssertionError("the step was expected to raise")


class Updates(L.Callback):
    """Counts the backward passes and optimizer steps Lightning's hooks see."""

    def __init__(self) -> None:
        self.backward = self.steps = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.backward += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


@pytest.mark.parametrize(("model_cls", "status"), [(ManualWithoutForward, "skipped"), (ManualOptimization, "passed")])
def test_under_manual_optimization_asking_whose_error_it_is_takes_no_update(model_cls, status):
    """The user's step runs fine up to its `manual_backward`, where the question stops: no backward or optimizer step
    of the check's reaches Lightning's hooks or the weights. The check skips a model that is not `model(x)`, and
    asks after passing too (a crash past the forward pass would otherwise reach training)."""
    runs = []
    for callbacks in ([], [InitLossCheck()]):
        L.seed_everything(0, verbose=False)
        model, updates = model_cls(), Updates()
        trainer(max_steps=3, callbacks=[*callbacks, updates]).fit(model, data())
        runs.append((copy.deepcopy(model.state_dict()), updates.backward, updates.steps))
    (plain, *plain_counts), (checked, *checked_counts) = runs
    assert checked_counts == plain_counts == [3, 3]
    assert all(torch.equal(value, checked[key]) for key, value in plain.items())
    assert callbacks[0].result.status.value == status, callbacks[0].result.summary
    assert status == "passed" or "TypeError: call the layers" in callbacks[0].result.summary
