"""RecipeSuite and the sanity-run mode, in-process: construction, the env variable, the report files and
TensorBoard text, the exit status, no optimizer step, and ``sanity_run()`` returning a Report."""

from __future__ import annotations

import inspect
import json
import re

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_recipe import (
    BatchLeakageProbe,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    RecipeCheckError,
    RecipeSuite,
    RecipeWarning,
    Report,
    SanityRunExit,
    UpdateRatioMonitor,
    sanity_run,
)
from lightning_recipe.registry import COMPONENTS, MONITORS, component_key
from lightning_recipe.sanity import ENV_VAR, summary_table
from lightning_recipe.suite import ComponentArgumentError
from tests.models import trainer
from tests.tensorboard import read_events
from tests.zoo import MLP, DoubleSoftmax, clusters

REPORT_KEYS = {"name", "status", "summary", "hint", "details", "duration_s"}


class StepCounter(Callback):
    """Counts the optimizer steps Lightning takes."""

    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a sanity run changed the weights"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# -- construction ------------------------------------------------------------------------------------


def test_unknown_component_names_are_refused_listing_the_valid_ones():
    keys = [component_key(cls) for cls in COMPONENTS]  # every registered component, in order
    assert keys[:3] == ["init_loss_check", "batch_leakage_probe", "overfit_one_batch"]
    with pytest.raises(ValueError, match=re.escape(f"one of {keys}, but got 'overfit'")):
        RecipeSuite(overfit=None)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"max_stepz": 50},
            "Expected the settings of `overfit_one_batch` in RecipeSuite to be arguments of OverfitOneBatch, one of "
            f"{', '.join(inspect.signature(OverfitOneBatch).parameters)}, but got 'max_stepz'.",
        ),
        (
            {"on_fail": "wran"},
            "In the settings of `overfit_one_batch` in RecipeSuite: Expected `on_fail` to be one of ['raise', "
            "'warn'], but got 'wran'.",
        ),
    ],
    ids=["unknown_argument", "unknown_choice"],
)
def test_settings_a_component_refuses_are_refused_naming_the_component_and_the_valid_ones(settings, message):
    with pytest.raises(ComponentArgumentError) as refused:
        RecipeSuite(overfit_one_batch=settings)
    assert str(refused.value) == message and isinstance(refused.value, ValueError)


def test_a_component_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"Expected `overfit_one_batch` to be True, False, None, a dict of "):
        RecipeSuite(overfit_one_batch=InitLossCheck())
    with pytest.raises(ValueError, match=r"Expected `on_fail` to be one of \['raise', 'warn'\]"):
        RecipeSuite(on_fail="ignore")


def test_components_are_configured_removed_or_given_and_checks_run_cheap_first():
    probe = BatchLeakageProbe(num_examples=4)
    suite = RecipeSuite(
        overfit_one_batch={"max_steps": 50},
        batch_leakage_probe=probe,
        init_loss_check=True,
        first_layer_visualizer=None,
        prediction_dynamics_logger=False,
        on_fail="warn",
    )
    assert [type(c) for c in suite.checks] == [InitLossCheck, BatchLeakageProbe, OverfitOneBatch]
    assert suite.checks[1] is probe
    assert suite.checks[2].max_steps == 50
    assert suite.checks[0].on_fail == "warn" and suite.checks[2].on_fail == "warn"
    turned_off = (FirstLayerVisualizer, PredictionDynamicsLogger)
    assert [type(m) for m in suite.monitors] == [c for c in MONITORS.values() if c not in turned_off]
    assert UpdateRatioMonitor in [type(m) for m in suite.monitors]
    assert not suite.sanity_run


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_the_environment_variable_turns_the_suite_into_a_sanity_run(monkeypatch, value, expected):
    monkeypatch.setenv(ENV_VAR, value)
    assert RecipeSuite().sanity_run is expected
    assert RecipeSuite(sanity_run=False).sanity_run is False  # an explicit argument wins


def test_a_bad_environment_value_is_refused_at_construction(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=r"LIGHTNING_RECIPE_SANITY_RUN to be 1 or 0 .* but got 'maybe'"):
        RecipeSuite()


# -- without sanity mode: the checks and monitors as separate callbacks --------------------------------


def test_without_sanity_mode_a_failed_check_raises_before_any_step(tmp_path):
    counter = StepCounter()
    with pytest.raises(RecipeCheckError, match="OverfitOneBatch: FAILED"):
        trainer(tmp_path, callbacks=[RecipeSuite(), counter]).fit(DoubleSoftmax(), clusters())
    assert counter.steps == 0


def test_without_sanity_mode_training_goes_on_and_the_monitors_watch_it(tmp_path):
    suite = RecipeSuite(update_ratio_monitor={"every_n_steps": 1})
    run = trainer(tmp_path, max_steps=4, callbacks=[suite])
    run.fit(MLP(), clusters())
    assert run.global_step == 4
    assert [c.result.status.value for c in suite.checks] == ["passed"] * 3
    assert all(m.seconds > 0 for m in suite.monitors), [(m.name, m.seconds) for m in suite.monitors]
    state = suite.state_dict()
    assert set(state) >= {m.state_key for m in suite.monitors}
    suite.load_state_dict(state)


# -- sanity mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "code"), [(MLP, 0), (DoubleSoftmax, 1)], ids=["healthy", "double_softmax"])
def test_a_sanity_run_writes_the_report_and_exits_with_the_verdict(tmp_path, capsys, model, code):

    L.seed_everything(0)
    net, counter, suite = model(), StepCounter(), RecipeSuite(sanity_run=True)
    before = weights(net)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    run = trainer(tmp_path, max_steps=100, logger=logger, callbacks=[suite, counter])
    with pytest.raises(SanityRunExit) as stopped:
        run.fit(net, clusters())
    assert stopped.value.code == code
    assert stopped.value.report is suite.report
    assert counter.steps == 0 and run.global_step == 0
    assert_untouched(net, before)

    folder = tmp_path / "run" / "version_0"
    data = json.loads((folder / "sanity_run.json").read_text())
    assert data["passed"] is (code == 0) and data["checked"] is True
    assert data["global_step"] == 0 and data["world_size"] == 1 and data["model"] == model.__name__
    assert set(data) == {"passed", "checked", "checks", "model", "world_size", "global_step", "lightning_recipe"}
    assert [c["name"] for c in data["checks"]] == ["InitLossCheck", "BatchLeakageProbe", "OverfitOneBatch"]
    assert all(set(c) == REPORT_KEYS for c in data["checks"])
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    assert statuses["OverfitOneBatch"] == ("passed" if code == 0 else "failed")
    markdown = (folder / "sanity_run.md").read_text()
    assert markdown == suite.report.to_markdown()

    printed = capsys.readouterr().out
    assert f"lightning_recipe sanity run: {'PASSED' if code == 0 else 'FAILED (1 of 3 checks failed)'}" in printed
    assert f"exit status {code}" in printed and str(folder / "sanity_run.json") in printed

    events = read_events(str(folder))
    assert "recipe/sanity_run/report/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("recipe/sanity_run/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == markdown


def test_a_sanity_run_without_exit_returns_from_fit_even_with_min_steps(tmp_path):
    suite, counter = RecipeSuite(sanity_run=True, exit_process=False, report_dir=tmp_path / "out"), StepCounter()
    run = trainer(tmp_path, max_steps=50, min_steps=10, callbacks=[suite, counter])
    run.fit(DoubleSoftmax(), clusters())
    assert counter.steps == 0 and run.global_step == 0
    assert suite.report is not None and not suite.report.passed
    assert suite.report_paths == [tmp_path / "out" / "sanity_run.json", tmp_path / "out" / "sanity_run.md"]
    assert all(m.seconds == 0 for m in suite.monitors)  # no monitor starts in a sanity run


def test_sanity_run_returns_a_report_without_training_and_never_raises():
    healthy, buggy = MLP(), DoubleSoftmax()
    before = weights(buggy)
    report = sanity_run(healthy, train_dataloaders=clusters(), accelerator="cpu")
    assert isinstance(report, Report) and report.passed
    assert [r.name for r in report.results] == ["InitLossCheck", "BatchLeakageProbe", "OverfitOneBatch"]

    counter = StepCounter()
    report = sanity_run(
        buggy,
        train_dataloaders=clusters(),
        checks=[OverfitOneBatch(), "init_loss_check"],
        accelerator="cpu",
        callbacks=[counter],
    )
    assert not report.passed
    assert [(r.name, r.status.value) for r in report.results] == [
        ("InitLossCheck", "passed"),
        ("OverfitOneBatch", "failed"),
    ]
    assert "softmax" in report.results[1].hint
    assert counter.steps == 0
    assert_untouched(buggy, before)
    assert json.loads(report.to_json())["checks"][1]["status"] == "failed"


def test_sanity_run_refuses_unknown_check_names():
    with pytest.raises(
        ValueError,
        match=r"Expected a check name, one of InitLossCheck \(init_loss_check\), .* "
        r"but got 'GradientCheck'",
    ):
        sanity_run(MLP(), train_dataloaders=clusters(), checks=["GradientCheck"])


def test_the_summary_table_lists_every_check_and_the_fixes():
    report = sanity_run(DoubleSoftmax(), train_dataloaders=clusters(), checks=["OverfitOneBatch"], accelerator="cpu")
    table = summary_table(report)
    lines = table.splitlines()
    assert lines[0] == "lightning_recipe sanity run: FAILED (1 of 1 checks failed)"
    assert lines[2].split()[:2] == ["OverfitOneBatch", "FAILED"]
    assert lines[3] == "How to fix:" and lines[4].startswith("  OverfitOneBatch: Double softmax")


def test_a_sanity_run_that_never_reaches_training_says_no_check_ran_and_exits_3(tmp_path):
    suite = RecipeSuite(sanity_run=True)
    with (
        pytest.warns(RecipeWarning, match="sanity run checked nothing.* exit status 3, which is not a pass"),
        pytest.raises(SanityRunExit) as stopped,
    ):
        trainer(tmp_path, limit_train_batches=0, callbacks=[suite]).fit(MLP(), clusters())
    assert stopped.value.code == 3 and suite.report is None
    quiet = RecipeSuite(sanity_run=True, exit_process=False)
    with pytest.warns(RecipeWarning, match="sanity run checked nothing"):
        trainer(tmp_path, limit_train_batches=0, callbacks=[quiet]).fit(MLP(), clusters())  # returns


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_sanity_run_of_a_resumed_run_says_nothing_was_checked_and_exits_3(tmp_path, capsys):
    """Every check skips a resumed run: nothing was checked, which a job script must not take for a pass."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(tmp_path, save_last=True)
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[saver]).fit(MLP(), clusters())
    suite = RecipeSuite(sanity_run=True, report_dir=tmp_path / "report")
    with pytest.raises(SanityRunExit) as stopped:
        trainer(tmp_path, max_steps=10, callbacks=[suite]).fit(MLP(), clusters(), ckpt_path=tmp_path / "last.ckpt")
    assert stopped.value.code == 3
    report = stopped.value.report
    assert not report.passed and not report.checked and report.verdict == "NOTHING CHECKED"
    assert all(r.status.value == "skipped" and "resumed run" in r.summary for r in report.results)
    data = json.loads((tmp_path / "report" / "sanity_run.json").read_text())
    assert data["passed"] is False and data["checked"] is False
    assert report.to_markdown().startswith("# lightning_recipe report: NOTHING CHECKED")
    printed = capsys.readouterr().out
    assert "lightning_recipe sanity run: NOTHING CHECKED (every check skipped, see why below: not a pass)" in printed
    assert "exit status 3: nothing was checked" in printed


def test_a_report_says_passed_failed_or_nothing_checked():
    from lightning_recipe import CheckResult, CheckStatus
    from lightning_recipe.sanity import exit_status

    passed, failed, skipped = (CheckResult("C", status, "s") for status in CheckStatus)
    cases = [
        ([passed, skipped], "PASSED", 0),
        ([passed, failed], "FAILED", 1),
        ([skipped, skipped], "NOTHING CHECKED", 3),
    ]
    for results, verdict, code in [*cases, ([], "NOTHING CHECKED", 3)]:
        report = Report(results)
        assert (report.verdict, exit_status(report), report.passed) == (verdict, code, code == 0)
        assert report.to_dict()["checked"] is (code != 3)


def test_a_report_that_cannot_be_written_is_said_and_the_verdict_still_stands(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(SanityRunExit) as stopped:
        trainer(tmp_path, callbacks=[RecipeSuite(sanity_run=True, report_dir=blocker)]).fit(DoubleSoftmax(), clusters())
    assert stopped.value.code == 1
    out = capsys.readouterr().out
    assert f"Report: could not be written to {blocker}: FileExistsError" in out
    assert "exit status 1" in out


def test_without_sanity_mode_warn_lets_training_go_on(tmp_path):
    suite = RecipeSuite(
        on_fail="warn",
        init_loss_check=None,
        batch_leakage_probe=None,
        update_ratio_monitor=None,
        prediction_dynamics_logger=None,
        first_layer_visualizer=None,
    )
    run = trainer(tmp_path, max_steps=2, callbacks=[suite])
    with pytest.warns(RecipeWarning, match="OverfitOneBatch: FAILED"):
        run.fit(DoubleSoftmax(), clusters())
    assert run.global_step == 2


def _seeded_run(callbacks: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from tests.test_no_side_effects import ScheduledCNN
    from tests.zoo import shapes

    L.seed_everything(123, workers=True, verbose=False)
    model = ScheduledCNN()
    trainer(max_steps=6, callbacks=callbacks, deterministic=True).fit(model, shapes(), shapes())
    return weights(model), torch.get_rng_state()


def test_the_suite_leaves_a_seeded_run_bit_identical():
    every_step = {"every_n_steps": 1}
    suite = RecipeSuite(
        update_ratio_monitor=every_step, prediction_dynamics_logger=every_step, first_layer_visualizer=every_step
    )
    plain, with_suite = _seeded_run([]), _seeded_run([suite])
    assert all(c.result.passed for c in suite.checks) and all(m.enabled for m in suite.monitors)
    for key, value in plain[0].items():
        assert torch.equal(value, with_suite[0][key]), f"{key} differs"
    assert torch.equal(plain[1], with_suite[1]), "the global RNG ended in a different state"


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_the_suite_state_is_saved_in_checkpoints_and_restored_on_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = RecipeSuite(update_ratio_monitor={"every_n_steps": 1})
    checkpoint = ModelCheckpoint(tmp_path, save_last=True)
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[first, checkpoint]).fit(MLP(), clusters())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["RecipeSuite"]
    assert set(saved) == {m.state_key for m in first.monitors}  # each monitor under its own key
    resumed = RecipeSuite(update_ratio_monitor={"every_n_steps": 1})  # the same monitors: the same keys
    loaded = []
    for monitor in resumed.monitors:
        monitor.load_state_dict = lambda state, name=monitor.name: loaded.append((name, state))  # type: ignore
    run = trainer(tmp_path, max_steps=5, callbacks=[resumed])
    run.fit(MLP(), clusters(), ckpt_path=tmp_path / "last.ckpt")
    assert run.global_step == 5
    # repr: the states hold tensors (the fixed batch, the first layer's start), and `==` of tensors is elementwise
    assert repr(loaded) == repr([(m.name, saved[m.state_key]) for m in first.monitors])
    assert all(c.result.status.value == "skipped" for c in resumed.checks)  # a resumed run is past its first step


def test_a_sanity_run_without_any_check_is_warned_about():
    with pytest.warns(RecipeWarning, match=r"sanity-run mode with every check removed: .*exit status 3, not a pass"):
        RecipeSuite(sanity_run=True, init_loss_check=None, batch_leakage_probe=False, overfit_one_batch=None)
