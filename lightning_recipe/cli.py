"""The ``lightning-recipe`` console script: a sanity run of a model from the command line.

    lightning-recipe check my_project.models:Classifier --data my_project.data:ShapesData --report report.json
    lightning-recipe check train.py:Net --model-args '{"width": 64}' --checks InitLossCheck OverfitOneBatch

Exit status: 0 every check passed (some may have skipped), 1 a check failed (or the model crashed during the run),
2 bad usage (a message, no traceback), 3 nothing was checked (every check skipped: not a pass).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_recipe import __version__
from lightning_recipe._loading import (
    UsageError,
    build_data,
    build_model,
    import_from_current_folder,
    json_object,
    load_object,
)
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.registry import CHECKS, MONITORS, resolve_checks
from lightning_recipe.report import Report
from lightning_recipe.sanity import EXIT_FAILED, EXIT_USAGE, exit_status, write_report
from lightning_recipe.suite import ComponentArgumentError, RecipeSuite, sanity_run, sanity_suite

__all__ = ["main"]

#: the registered checks, as --checks takes them and the help lists them
_CHECK_NAMES = ", ".join(cls.__name__ for cls in CHECKS.values())

_DESCRIPTION = f"""\
Karpathy's "Recipe for Training Neural Networks" as PyTorch Lightning callbacks.

commands:
  check   run the pre-flight checks ({_CHECK_NAMES}) on a model and its
          data without training, print a summary table, optionally write the report; exit 0 when every check
          passed, 1 when one failed, 2 on bad usage, 3 when nothing was checked (every check skipped).
          `lightning-recipe check --help` lists its options.

In a training script, the same sanity run is one environment variable away:
  callbacks=[RecipeSuite()] in the Trainer, then LIGHTNING_RECIPE_SANITY_RUN=1 python train.py
"""

_CHECK_EPILOG = """\
MODULE:NAME is a dotted module importable from the current folder (as with `python -m`) or a path to a .py
file, and the name of a class or function in it. The model is NAME(**model_args) and must be a
LightningModule. The data is NAME(**data_args): a LightningDataModule, a training DataLoader, or a
(train, val) pair of DataLoaders; without --data the model's own *_dataloader methods are used.

--config runs what a LightningCLI config describes (model, data, trainer with its loggers and callbacks; the
report then also lands next to its logs). Leave MODULE:Model and --data out when the config names class_path
entries; give them when it was written for LightningCLI(Model, DataModule). Trainer options given here win.

exit status: 0 every check passed (some may have skipped), 1 a check failed or the model or its data raised an
error, 2 bad usage: an unknown or unloadable MODULE:NAME, arguments the model or data do not take, no training
data, or Trainer options Lightning refuses (an unknown accelerator or strategy, devices this machine does not
have), 3 nothing was checked: every check skipped (each says why in the table), which is not a pass.

examples:
  lightning-recipe check my_project.models:Classifier --data my_project.data:ShapesData
  lightning-recipe check train.py:Net --model-args '{"width": 64}' --report sanity_run.json
  lightning-recipe check --config config.yaml --accelerator gpu --devices 1
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-recipe", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lightning_recipe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="run the pre-flight checks on a model without training",
        description="Run the pre-flight checks on a model and its data, without training (a sanity run).",
        epilog=_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("model", metavar="MODULE:Model", nargs="?", help="the LightningModule class or factory")
    check.add_argument("--data", metavar="MODULE:Data", help="a LightningDataModule class, or a dataloader factory")
    check.add_argument("--model-args", metavar="JSON", default="{}", help="keyword arguments of the model, as JSON")
    check.add_argument("--data-args", metavar="JSON", default="{}", help="keyword arguments of the data, as JSON")
    check.add_argument(
        "--checks",
        nargs="+",
        metavar="NAME",
        help=f"the checks to run ({_CHECK_NAMES}); default: all",
    )
    check.add_argument("--report", metavar="PATH", help="write the report as JSON to PATH and Markdown beside it")
    check.add_argument("--config", metavar="YAML", help="a LightningCLI config (see below)")
    check.add_argument("--accelerator", default="auto", help="as for the Trainer (default: auto)")
    check.add_argument("--devices", default="1", help="as for the Trainer (default: 1)")
    check.add_argument("--strategy", default="auto", help="as for the Trainer, e.g. ddp (default: auto)")
    check.add_argument("--num-nodes", type=int, default=1, help="as for the Trainer (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-recipe``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _check(args)
    except UsageError as error:
        print(f"lightning-recipe check: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _check(args: argparse.Namespace) -> int:
    model_args = json_object("--model-args", args.model_args)
    data_args = json_object("--data-args", args.data_args)
    trainer_kwargs = _trainer_kwargs(args)
    import_from_current_folder()
    if args.model is None and args.config is None:
        raise UsageError("expected a model as MODULE:Model (or a LightningCLI --config), but got none.")
    try:
        checks = resolve_checks(args.checks)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        if args.config is not None:
            model, report = _run_config(args, checks)
        else:
            model = build_model(args.model, model_args)
            if args.data is None and not is_overridden("train_dataloader", model):
                raise UsageError(
                    f"expected training data, but {args.model} defines no train_dataloader and no --data was "
                    f"given: pass --data MODULE:DataModule (a LightningDataModule, a DataLoader, or a (train, val) "
                    f"pair), or define train_dataloader in the model."
                )
            fit_kwargs = build_data(args.data, data_args) if args.data else {}
            report = sanity_run(model, checks=checks, **fit_kwargs, **trainer_kwargs)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - sorted below: Lightning refusing options, or the user's code
        if _refused_by_trainer(error):
            raise UsageError(_trainer_refusal(error, args, trainer_kwargs)) from None
        # the user's code crashed: that is a failed sanity run, with its traceback
        traceback.print_exc()
        print(
            "\nlightning-recipe check: the model or its data raised an error during the sanity run (above), before "
            "the checks could give a verdict. Fix it and run again; a training run would crash the same way.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    # Lightning sets rank_zero_only.rank at import; its overloaded signature does not declare the attribute
    if args.report and rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        # the Trainer the sanity run fitted stays attached to the model: the run the report came from
        paths = write_report(model.trainer, model, report, Path(args.report))
        print(f"Report: {' and '.join(str(p) for p in paths)}")
    return exit_status(report)


def _run_config(args: argparse.Namespace, checks: list[Any]) -> tuple[pl.LightningModule, Report]:
    """A sanity run of what a LightningCLI config describes: its model, data and Trainer (loggers included, so
    the report also lands next to its logs); Trainer options given on the command line override the config."""
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as error:  # pragma: no cover - lightning always ships it
        raise UsageError(f"--config needs Lightning's LightningCLI: {error}") from None
    if importlib.util.find_spec("jsonargparse") is None:
        raise UsageError(
            "--config reads LightningCLI configs with jsonargparse, which is not installed: "
            "pip install 'lightning_recipe[cli]'."
        )
    if not Path(args.config).is_file():
        raise UsageError(f"expected --config to be a YAML file, but {args.config!r} does not exist.")
    _check_suite_settings(args.config)
    model_class = load_object(args.model, "the model") if args.model else None
    data_class = load_object(args.data, "--data") if args.data else None
    overrides = [f"--trainer.{key}={value}" for key, value in _given(args).items()]
    suite = sanity_suite(checks, report_dir=None)
    with warnings.catch_warnings():  # `args` is how we pass the config: its warning about sys.argv is for scripts
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = LightningCLI(
            model_class,
            data_class,
            run=False,
            save_config_callback=None,
            subclass_mode_model=model_class is None,
            subclass_mode_data=data_class is None,
            args=["--config", args.config, *overrides],
        )
    if cli.datamodule is None and not is_overridden("train_dataloader", cli.model):
        raise UsageError(
            f"expected training data, but {args.config} gives no data and {type(cli.model).__name__} defines no "
            f"train_dataloader: add a data: section to the config, pass --data MODULE:DataModule, or define "
            f"train_dataloader in the model."
        )
    # the sanity suite replaces the config's own suite or checks (which would run again and raise per on_fail)
    # Trainer.callbacks is set by Lightning's callback connector and not declared on the class
    others = [c for c in cli.trainer.callbacks if not isinstance(c, (RecipeSuite, PreflightCheck))]  # type: ignore[attr-defined]
    cli.trainer.callbacks = [*others, suite]  # type: ignore[attr-defined]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if suite.report is None:
        raise RuntimeError("The sanity run did not reach the start of training, so no check ran.")
    return cli.model, suite.report


def _check_suite_settings(config: str) -> None:
    """Refuse, in one line, a RecipeSuite in the config's ``trainer.callbacks`` whose component settings hold an
    argument the component does not take or a value it refuses, by building those components here. LightningCLI
    would refuse the first in a page of nested union errors, and would build the suite for the second and fail
    as if the model had crashed. Read with jsonargparse's loader, so the values are the ones LightningCLI sees; the
    batch adapters (import paths in a config) and components given as ``class_path`` are left to LightningCLI."""
    from jsonargparse import get_loader

    try:
        callbacks = get_loader("yaml")(Path(config).read_text())["trainer"]["callbacks"]
    except Exception:  # noqa: BLE001 - not YAML, or no callbacks: LightningCLI's parser judges the rest
        return
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(entry, dict) or str(entry.get("class_path")).rsplit(".", 1)[-1] != RecipeSuite.__name__:
            continue
        # Any: the keys are component keywords only, but mypy cannot tell them from the suite's own arguments
        settings: dict[str, Any] = {
            key: {name: value for name, value in spec.items() if name not in ("inputs", "targets", "forward")}
            for key, spec in (entry["init_args"] if isinstance(entry.get("init_args"), dict) else {}).items()
            if (key in CHECKS or key in MONITORS) and isinstance(spec, dict) and "class_path" not in spec
        }
        try:
            RecipeSuite(sanity_run=False, **settings)
        except ComponentArgumentError as error:
            raise UsageError(f"--config {config}: {error}") from None


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer options given on the command line (not left at their defaults): they override a config."""
    given = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "num_nodes": args.num_nodes,
    }
    defaults = {"accelerator": "auto", "devices": "1", "strategy": "auto", "num_nodes": 1}
    return {key: value for key, value in given.items() if value != defaults[key]}


def _trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer options of the command line; ``--devices`` as Lightning takes it (a count, ``-1``, or a string
    such as ``0,1`` or ``auto``)."""
    try:
        devices: Any = int(args.devices)
    except ValueError:
        devices = args.devices
    return dict(accelerator=args.accelerator, devices=devices, strategy=args.strategy, num_nodes=args.num_nodes)


_TRAINER_OPTIONS = {
    "accelerator": "--accelerator",
    "strategy": "--strategy",
    "devices": "--devices",
    "num_nodes": "--num-nodes",
}
_DEFAULTS = {"accelerator": "auto", "strategy": "auto", "devices": 1, "num_nodes": 1}


def _refused_by_trainer(error: BaseException) -> bool:
    """Whether ``error`` was raised by Lightning (or torch) while the ``Trainer`` was being constructed: the Trainer
    refused its options (an unknown accelerator or strategy, devices it cannot parse or this machine does not have,
    a strategy whose package is missing). Lightning raises MisconfigurationException, ValueError, TypeError or
    ImportError for these, so the type cannot tell; where it was raised can. That is bad usage; an error of the
    user's model or data is raised later, inside ``fit``, or from the user's own files."""
    trainer_file = inspect.getfile(pl.Trainer)
    libraries = tuple(str(Path(inspect.getfile(package)).resolve().parent) for package in (lightning, torch))
    in_trainer_init, innermost = False, ""
    frame = error.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        in_trainer_init = in_trainer_init or (code.co_name == "__init__" and code.co_filename == trainer_file)
        innermost = code.co_filename
        frame = frame.tb_next
    return in_trainer_init and str(Path(innermost).resolve()).startswith(libraries)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's device banner and warnings while probing Trainer options (the probe is not a run)."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)


def _culprit(trainer_kwargs: dict[str, Any]) -> tuple[str, BaseException] | None:
    """The first command-line Trainer option that Lightning refuses, given the ones before it, and its error.

    Options are added one at a time over Lightning's defaults, in the order the Trainer resolves them (accelerator,
    strategy, devices, nodes), so ``--devices 2`` with ``--accelerator gpu`` on a one-GPU machine blames
    ``--devices``. ``None`` when each is accepted (the refused value came from a ``--config``)."""
    tried: dict[str, Any] = {}
    for key in _TRAINER_OPTIONS:
        tried[key] = trainer_kwargs[key]
        if trainer_kwargs[key] == _DEFAULTS[key]:
            continue
        try:
            with _quiet():
                pl.Trainer(
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    **tried,
                )
        except Exception as error:  # noqa: BLE001 - any refusal names this option
            return key, error
    return None


def _valid_choices(key: str, trainer_kwargs: dict[str, Any]) -> str:
    """What the option ``key`` takes on this machine, for the usage message."""
    if key == "accelerator":
        available = []
        for name in sorted(AcceleratorRegistry.available_accelerators()):
            try:
                if AcceleratorRegistry[name]["accelerator"].is_available():
                    available.append(name)
            except Exception:  # noqa: BLE001 - an accelerator whose probe fails is not available
                continue
        if "cuda" in available:
            available.append("gpu")
        return f"one of {', '.join(['auto', *available])} (available on this machine)"
    if key == "strategy":
        names = [n for n in StrategyRegistry.available_strategies() if "find_unused_parameters" not in n]
        return f"one of {', '.join(['auto', *names])} (and the ddp*_find_unused_parameters_true/false variants)"
    if key == "devices":
        gpus = torch.cuda.device_count()
        if trainer_kwargs["accelerator"] == "cpu" or (trainer_kwargs["accelerator"] == "auto" and gpus == 0):
            return "a number of CPU processes like 1 or 2, or auto"
        return f"a count like 1 or 2, GPU indices like 0,1, -1 for all, or auto (this machine has {gpus} GPU(s))"
    return "a positive integer"


def _trainer_refusal(error: BaseException, args: argparse.Namespace, trainer_kwargs: dict[str, Any]) -> str:
    """One line for a Trainer that refused its options: the option and its value, Lightning's reason, and what
    the option takes."""
    culprit = _culprit(trainer_kwargs)
    if culprit is None:
        reason = " ".join(str(error).split()) or type(error).__name__
        source = f" from --config {args.config}" if args.config else ""
        return (
            f"Lightning's Trainer refused its options{source}: {reason} Fix the trainer: section of the config "
            f"or override it here with --accelerator, --devices, --strategy, --num-nodes."
        )
    key, refusal = culprit
    reason = " ".join(str(refusal).split()) or type(refusal).__name__
    context = [
        f"{_TRAINER_OPTIONS[k]} {trainer_kwargs[k]}"
        for k in _TRAINER_OPTIONS
        if k != key and trainer_kwargs[k] != _DEFAULTS[k]
    ]
    given = f" (with {', '.join(context)})" if context else ""
    option = _TRAINER_OPTIONS[key]
    return (
        f"Lightning's Trainer refused {option} {getattr(args, key)}{given}: {reason} {option} takes "
        f"{_valid_choices(key, trainer_kwargs)}."
    )


if __name__ == "__main__":
    sys.exit(main())
