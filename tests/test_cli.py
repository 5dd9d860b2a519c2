"""The ``lightning-recipe`` console script: exit 0 when every check passed, 1 when one failed (or the model
crashed), 2 on bad usage with a message and no traceback. The installed script runs in subprocesses; usage
errors are also driven in-process through ``main`` (no Trainer is built for them)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_recipe import OverfitOneBatch, __version__
from lightning_recipe.cli import main
from tests.ddp import REPO
from tests.zoo import MLP

SCRIPT = shutil.which("lightning-recipe", path=str(Path(sys.executable).parent)) or "lightning-recipe"


def cli(*args: str, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTNING_RECIPE_SANITY_RUN", None)
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_documents_the_check_command_and_the_exit_status(capsys):
    proc = cli("--help")  # the installed console script
    assert proc.returncode == 0
    assert "check" in proc.stdout and "LIGHTNING_RECIPE_SANITY_RUN=1" in proc.stdout
    assert "exit 0 when every check passed, 1 when one failed, 2 on bad usage, 3 when nothing was checked" in " ".join(
        proc.stdout.split()
    )
    with pytest.raises(SystemExit) as stopped:
        main(["check", "--help"])
    assert stopped.value.code == 0
    check_help = capsys.readouterr().out
    assert "2 bad usage" in check_help and "Trainer options Lightning refuses" in " ".join(check_help.split())
    assert "3 nothing was checked: every check skipped" in " ".join(check_help.split())
    for option in (
        "--data",
        "--model-args",
        "--data-args",
        "--checks",
        "--report",
        "--config",
        "--accelerator",
        "--devices",
    ):
        assert option in check_help


def test_a_healthy_model_exits_0_and_writes_the_report(tmp_path):
    report = tmp_path / "reports" / "sanity.json"
    proc = cli(
        "check",
        "tests.zoo:MLP",
        "--data",
        "tests.zoo:clusters",
        "--model-args",
        '{"hidden": 16}',
        "--accelerator",
        "cpu",
        "--report",
        str(report),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "lightning_recipe sanity run: PASSED" in proc.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["checked"] is True and data["model"] == "MLP"
    assert [c["status"] for c in data["checks"]] == ["passed"] * 3
    # one writer: the fields of the sanity_run.json a sanity run writes next to the logs
    assert set(data) == {"passed", "checked", "checks", "model", "world_size", "global_step", "lightning_recipe"}
    assert (data["world_size"], data["global_step"], data["lightning_recipe"]) == (1, 0, __version__)
    assert report.with_suffix(".md").read_text().startswith("# lightning_recipe report: PASSED")


def test_a_failing_check_exits_1_with_the_fix():
    proc = cli(
        "check",
        "tests.zoo:DoubleSoftmax",
        "--data",
        "tests.zoo:clusters",
        "--checks",
        "OverfitOneBatch",
        "--accelerator",
        "cpu",
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    assert "OverfitOneBatch: Double softmax" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_run_in_which_every_check_skips_exits_3_nothing_checked(tmp_path, capsys):
    """No check could run (a model that is not `model(x)`, under manual optimization): not a pass."""
    path = tmp_path / "report.json"
    args = ["tests.test_user_errors:ManualWithoutForward", "--data", "tests.test_user_errors:data"]
    code = main(["check", *args, "--accelerator", "cpu", "--report", str(path)])
    out = capsys.readouterr().out
    assert code == 3, out[-3000:]
    assert "lightning_recipe sanity run: NOTHING CHECKED (every check skipped" in out
    data = json.loads(path.read_text())
    assert data["passed"] is False and data["checked"] is False
    assert [c["status"] for c in data["checks"]] == ["skipped"] * 3


def test_bad_usage_exits_2_with_a_message_and_no_traceback():
    proc = cli("check", "tests.zoo:NoSuchModel")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "lightning-recipe check: error: expected the model to name a class or function in "
        "tests.zoo, but 'NoSuchModel' is not there; it defines: "
    )
    assert "Traceback" not in proc.stderr


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tests.zoo"], r"expected the model as MODULE:NAME \(e.g. my_project.models:Classifier\), but got 'tests.zoo"),
        (["tests.no_such_module:Net"], r"'tests.no_such_module' was not found"),
        (["no_such_file.py:Net"], r"'no_such_file.py' does not exist"),
        (["tests.zoo:MLP", "--model-args", "[1]"], r"expected --model-args to be a JSON object .* but got '\[1\]'"),
        (["tests.zoo:MLP", "--model-args", "{oops"], r"expected --model-args to be a JSON object"),
        (["tests.zoo:MLP", "--model-args", '{"width": 3}'], r"tests.zoo:MLP does not take --model-args"),
        (["tests.zoo:MLP", "--checks", "GradientCheck"], r"Expected a check name, one of InitLossCheck"),
        (["tests.zoo:MLP", "--data", "tests.zoo:cluster_data", "--data-args", '{"n": "x"}'], None),
        (["tests.zoo:clusters"], r"expected tests.zoo:clusters to be \(or make\) a LightningModule, but got DataLoa"),
        (["tests.zoo:MLP", "--data", "tests.zoo:DictDataset", "--data-args", "{}"], r"does not take --data-args"),
        (["tests.zoo:MLP", "--config", "missing.yaml"], r"expected --config to be a YAML file"),
        ([], r"expected a model as MODULE:Model"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else "",
)
def test_bad_usage_is_a_message_naming_what_to_fix(capsys, args, message):
    code = main(["check", *args, "--accelerator", "cpu"])
    err = capsys.readouterr().err
    if message is None:  # the user's own code raised on its arguments: a failed run with its traceback
        assert code == 1 and "Traceback" in err
        return
    assert code == 2, err
    assert err.startswith("lightning-recipe check: error: ")
    assert re.search(message, err), err


class Crashes(MLP):
    """``training_step`` raises, as a shape bug would."""

    def training_step(self, batch, batch_idx):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x8 and 9x32)")


def test_a_model_that_crashes_is_a_failed_run_naming_the_error_and_where(capsys):
    code = main(["check", "tests.test_cli:Crashes", "--data", "tests.zoo:clusters", "--accelerator", "cpu"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in out
    assert f"{__file__}:" in out and "Please report" not in out


def test_a_model_from_a_file_path_and_a_datamodule(tmp_path, capsys):
    source = tmp_path / "project_file.py"
    source.write_text(
        textwrap.dedent("""
        import lightning.pytorch as L
        from torch.utils.data import DataLoader
        from tests.zoo import MLP, cluster_data

        class Clusters(L.LightningDataModule):
            def train_dataloader(self):
                return DataLoader(cluster_data(), batch_size=32, shuffle=True)
    """)
    )
    report = tmp_path / "report.json"
    torch.manual_seed(0)
    code = main(
        [
            "check",
            f"{source}:MLP",
            "--data",
            f"{source}:Clusters",
            "--checks",
            "init_loss_check",
            "--accelerator",
            "cpu",
            "--report",
            str(report),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert [c["name"] for c in json.loads(report.read_text())["checks"]] == ["InitLossCheck"]


CONFIG = """
trainer:
  accelerator: cpu
  max_epochs: 3
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: logs
      name: run
model:
  class_path: tests.zoo.DoubleSoftmax
data:
  class_path: project_data.Clusters
  init_args:
    batch_size: 16
"""

DATA = """
import lightning.pytorch as L
from torch.utils.data import DataLoader
from tests.zoo import cluster_data

class Clusters(L.LightningDataModule):
    def __init__(self, batch_size: int = 32):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(cluster_data(), batch_size=self.batch_size, shuffle=True)
"""


def in_project(tmp_path: Path, config: str, command: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` in a folder holding ``config.yaml`` and the ``project_data`` module, as a user would."""
    pytest.importorskip("jsonargparse")
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "project_data.py").write_text(DATA)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_a_lightning_cli_config_runs_unchanged(tmp_path):
    proc = in_project(tmp_path, CONFIG, [SCRIPT, "check", "--config", "config.yaml", "--checks", "OverfitOneBatch"])
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "logs" / "run" / "version_0" / "sanity_run.json").read_text())
    assert [(c["name"], c["status"]) for c in data["checks"]] == [("OverfitOneBatch", "failed")]


SUITE_CONFIG = """
trainer:
  accelerator: cpu
  max_steps: 100
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: logs
  callbacks:
    - class_path: lightning_recipe.RecipeSuite
      init_args:
        overfit_one_batch:
          max_steps: 300
        first_layer_visualizer: null
model:
  class_path: tests.zoo.DoubleSoftmax
data:
  class_path: project_data.Clusters
"""


def test_a_lightning_cli_script_with_the_suite_in_its_config_needs_only_the_variable(tmp_path):
    (tmp_path / "main.py").write_text("from lightning.pytorch.cli import LightningCLI\nLightningCLI()\n")
    proc = in_project(
        tmp_path,
        SUITE_CONFIG,
        [sys.executable, "main.py", "fit", "--config", "config.yaml"],
        LIGHTNING_RECIPE_SANITY_RUN="1",
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "sanity_run.json").read_text())
    assert [c["status"] for c in data["checks"]] == ["passed", "passed", "failed"]


def test_check_with_a_config_that_holds_the_suite_runs_only_the_checks_asked_for(tmp_path):
    proc = in_project(tmp_path, SUITE_CONFIG, [SCRIPT, "check", "--config", "config.yaml", "--checks", "InitLossCheck"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "sanity_run.json").read_text())
    assert [c["name"] for c in data["checks"]] == ["InitLossCheck"]


@pytest.mark.parametrize(
    ("typo", "message"),
    [
        (
            "max_stepz: 300",
            "Expected the settings of `overfit_one_batch` in RecipeSuite to be arguments of OverfitOneBatch, one of "
            f"{', '.join(inspect.signature(OverfitOneBatch).parameters)}, but got 'max_stepz'.",
        ),
        (
            "on_fail: wran",
            "In the settings of `overfit_one_batch` in RecipeSuite: Expected `on_fail` to be one of ['raise', "
            "'warn'], but got 'wran'.",
        ),
    ],
    ids=["unknown_argument", "unknown_choice"],
)
def test_a_typo_in_the_suites_settings_in_a_config_is_bad_usage_in_one_line(tmp_path, typo, message):
    """Not the model's crash (exit 1): the line names the component, the argument and the valid ones."""
    proc = in_project(
        tmp_path, SUITE_CONFIG.replace("max_steps: 300", typo), [SCRIPT, "check", "--config", "config.yaml"]
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.splitlines() == [f"lightning-recipe check: error: --config config.yaml: {message}"]


@pytest.mark.slow
def test_check_under_ddp_with_two_cpu_processes_writes_one_report(tmp_path):
    report = tmp_path / "report.json"
    proc = cli(
        "check",
        "tests.zoo:DoubleSoftmax",
        "--data",
        "tests.zoo:clusters",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--report",
        str(report),
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode in (1, -9), output[-4000:]  # -9: Lightning's launcher kills rank 0 after rank 1 exits 1
    assert output.count("lightning_recipe sanity run: FAILED") == 1, output[-4000:]
    data = json.loads(report.read_text())
    assert not data["passed"] and all(c["details"]["world_size"] == 2 for c in data["checks"])


class WithLoaders(MLP):
    """A model that brings its own training dataloader: no --data needed."""

    def train_dataloader(self):
        from tests.zoo import clusters

        return clusters()


def train_and_val():
    from tests.zoo import clusters

    return clusters(), clusters()


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.parametrize("data", [[], ["--data", "tests.test_cli:train_and_val"]], ids=["model_loaders", "pair"])
def test_data_from_the_model_or_a_train_val_pair(tmp_path, capsys, data):
    report = tmp_path / "report.json"
    code = main(
        [
            "check",
            "tests.test_cli:WithLoaders",
            *data,
            "--checks",
            "InitLossCheck",
            "--accelerator",
            "cpu",
            "--report",
            str(report),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["checks"][0]["status"] == "passed"


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "two"], r"Lightning's Trainer refused --devices two: .* --devices takes a number of CPU proc"),
        (
            ["--strategy", "nonsense"],
            r"Lightning's Trainer refused --strategy nonsense: .* --strategy takes one of "
            r"auto, ddp, ",
        ),
        pytest.param(
            ["--accelerator", "gpu"],
            r"Lightning's Trainer refused --accelerator gpu: No supported gpu "
            r"backend found! --accelerator takes one of auto, cpu",
            marks=NO_GPU,
        ),
        (["--num-nodes", "0"], r"Lightning's Trainer refused --num-nodes 0: .* takes a positive integer"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else "",
)
def test_trainer_options_lightning_refuses_are_bad_usage_in_one_line(tmp_path, args, message):
    """Lightning refuses these at Trainer construction with a MisconfigurationException, ValueError or TypeError:
    exit 2 and one line naming the option, its value, Lightning's reason and what the option takes."""
    proc = cli("check", "tests.zoo:MLP", "--data", "tests.zoo:clusters", *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lightning-recipe check: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_a_model_without_dataloaders_and_no_data_is_bad_usage_in_one_line(tmp_path):
    proc = cli("check", "tests.zoo:MLP", "--accelerator", "cpu", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.strip().splitlines() == [
        "lightning-recipe check: error: expected training data, but tests.zoo:MLP defines no train_dataloader and "
        "no --data was given: pass --data MODULE:DataModule (a LightningDataModule, a DataLoader, or a (train, val) "
        "pair), or define train_dataloader in the model."
    ]


class RaisesWhatLightningRaises(MLP):
    """The user's ``training_step`` raises the types Lightning raises for refused Trainer options."""

    error: type[Exception] = ValueError

    def training_step(self, batch, batch_idx):
        raise self.error("expected 3 classes but the target holds 5")


class UserMisconfiguration(RaisesWhatLightningRaises):
    error = MisconfigurationException


class UserTypeError(RaisesWhatLightningRaises):
    error = TypeError


@pytest.mark.parametrize("model", ["RaisesWhatLightningRaises", "UserMisconfiguration", "UserTypeError"])
def test_the_users_own_error_is_a_failed_run_whatever_its_type(capsys, model):
    """Bad usage is told by where the error was raised (inside the Trainer's construction), not by its type: the
    same types raised by the user's model are the user's: a failed check naming the error and where, exit 1."""
    code = main(
        [
            "check",
            f"tests.test_cli:{model}",
            "--data",
            "tests.zoo:clusters",
            "--checks",
            "InitLossCheck",
            "--accelerator",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "FAILED" in out and "expected 3 classes but the target holds 5" in out
    assert re.search(r"tests/test_cli\.py:\d+ \(in `training_step`\)", out), out
    assert "lightning-recipe check: error:" not in err


PROJECT_MODEL = """
import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(L.LightningModule):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=32)
"""

PROJECT_CONFIG = """
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
{trainer}
model:
  class_path: model.Net
  init_args:
    hidden: 8
{data}
"""


@pytest.mark.parametrize(
    ("trainer", "data", "status", "message"),
    [
        ("", "data:\n  class_path: model.Data", 0, None),
        (
            "  devices: two",
            "data:\n  class_path: model.Data",
            2,
            "Lightning's Trainer refused its options from --config cfg.yaml: `devices` selected with",
        ),
        (
            "",
            "",
            2,
            "expected training data, but cfg.yaml gives no data and Net defines no train_dataloader: add a "
            "data: section to the config, pass --data MODULE:DataModule, or define train_dataloader",
        ),
    ],
    ids=["healthy", "bad_trainer_option", "no_data"],
)
def test_a_config_imports_the_projects_modules_from_the_current_folder(tmp_path, trainer, data, status, message):
    """As with MODULE:Model, a config's class_path may name a module of the current folder (not on PYTHONPATH)."""
    pytest.importorskip("jsonargparse")
    (tmp_path / "model.py").write_text(PROJECT_MODEL)
    (tmp_path / "cfg.yaml").write_text(PROJECT_CONFIG.format(trainer=trainer, data=data))
    proc = cli("check", "--config", "cfg.yaml", "--checks", "InitLossCheck", cwd=tmp_path)
    assert proc.returncode == status, (proc.stdout + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stderr
    if message is None:
        assert "lightning_recipe sanity run: PASSED" in proc.stdout
        assert json.loads((tmp_path / "sanity_run.json").read_text())["checks"][0]["status"] == "passed"
    else:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("lightning-recipe check: error: ")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
