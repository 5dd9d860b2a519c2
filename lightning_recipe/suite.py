"""RecipeSuite: the checks and monitors as one callback, and the sanity-run mode for cluster jobs.

A *sanity run* is the same training script with one environment variable set
(``LIGHTNING_RECIPE_SANITY_RUN=1``) or ``RecipeSuite(sanity_run=True)``: every check runs (a failure does not
stop the others), the report is written next to the logs as JSON and Markdown, a summary table is printed,
the same text goes to TensorBoard's text tab, and ``fit`` ends before the first optimizer step. The process
then exits with status 0 when every check passed and 1 when one failed, so a job script can put
``LIGHTNING_RECIPE_SANITY_RUN=1 srun python train.py || exit 1`` in front of the real run.

:func:`sanity_run` does the same for notebooks and tests and returns the :class:`Report` instead of exiting.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import ON_FAIL_CHOICES, check_choice
from lightning_recipe.callbacks._base import RecipeCallback
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.callbacks.batch_leakage_probe import BatchLeakageProbe
from lightning_recipe.callbacks.first_layer_visualizer import FirstLayerVisualizer
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.callbacks.overfit_one_batch import OverfitOneBatch
from lightning_recipe.callbacks.prediction_dynamics_logger import PredictionDynamicsLogger
from lightning_recipe.callbacks.update_ratio_monitor import UpdateRatioMonitor
from lightning_recipe.diagnostics.batch import ForwardFn, InputsFn, TargetsFn
from lightning_recipe.report import CheckStatus, RecipeWarning, Report

__all__ = [
    "CHECKS",
    "ENV_VAR",
    "MONITORS",
    "REPORT_NAME",
    "RecipeSuite",
    "SanityRunExit",
    "resolve_checks",
    "sanity_run",
    "sanity_run_requested",
    "sanity_suite",
    "summary_table",
]

#: the environment variable that turns a training script into a sanity run
ENV_VAR = "LIGHTNING_RECIPE_SANITY_RUN"
#: the report's file names, without suffix (``.json`` and ``.md``)
REPORT_NAME = "sanity_run"

#: the checks, in the order they run: the two cheap ones first, in the recipe's order (about 3 and 1 training
#: steps of the quick-start model), then the one that trains a copy (about 6; benchmarks/results/check_cost.md)
CHECKS: dict[str, type[PreflightCheck]] = {
    "init_loss_check": InitLossCheck,
    "batch_leakage_probe": BatchLeakageProbe,
    "overfit_one_batch": OverfitOneBatch,
}
MONITORS: dict[str, type[Monitor]] = {
    "update_ratio_monitor": UpdateRatioMonitor,
    "prediction_dynamics_logger": PredictionDynamicsLogger,
    "first_layer_visualizer": FirstLayerVisualizer,
}
_COMPONENTS: dict[str, type[RecipeCallback]] = {**CHECKS, **MONITORS}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SanityRunExit(SystemExit):
    """Ends the process after a sanity run: ``code`` 0 when every check passed, 1 when one failed.

    Raised out of ``trainer.fit`` by :class:`RecipeSuite` in sanity-run mode, once the report is written and
    on every rank at once. Lightning tears the run down as for any exception; Python then exits with ``code``
    and no traceback. Catch it to go on in the same process; ``.report`` holds the results.
    """

    def __init__(self, report: Report) -> None:
        super().__init__(0 if report.passed else 1)
        self.report = report


def sanity_run_requested() -> bool:
    """Whether ``LIGHTNING_RECIPE_SANITY_RUN`` asks for a sanity run (``1``, ``true``, ``yes``, ``on``)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"Expected the environment variable {ENV_VAR} to be 1 or 0 (or true/false, yes/no, on/off), but got "
        f"{os.environ[ENV_VAR]!r}."
    )


def _component_name(name: str, registry: Mapping[str, type[RecipeCallback]]) -> str:
    """``"InitLossCheck"`` or ``"init_loss_check"`` -> ``"init_loss_check"``; refuses other names."""
    by_class = {cls.__name__: key for key, cls in registry.items()}
    if name in registry:
        return name
    if name in by_class:
        return by_class[name]
    valid = ", ".join(f"{cls.__name__} ({key})" for key, cls in registry.items())
    raise ValueError(f"Expected a check name, one of {valid}, but got {name!r}.")


def resolve_checks(checks: Iterable[str | PreflightCheck] | None) -> list[PreflightCheck]:
    """The checks named (class name or snake_case) or given, in the suite's fixed order; all when ``None``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a repeated check, or no check at all.
    """
    if checks is None:
        return [cls() for cls in CHECKS.values()]
    if isinstance(checks, (str, PreflightCheck)):
        checks = [checks]
    chosen: dict[str, PreflightCheck] = {}
    for item in checks:
        if isinstance(item, PreflightCheck):
            key = _component_name(type(item).__name__, CHECKS)
            instance = item
        elif isinstance(item, str):
            key = _component_name(item, CHECKS)
            instance = CHECKS[key]()
        else:
            raise TypeError(f"Expected `checks` to hold check names or check instances, but got {item!r}.")
        if key in chosen:
            raise ValueError(f"Expected each check once in `checks`, but {CHECKS[key].__name__} is there twice.")
        chosen[key] = instance
    if not chosen:
        raise ValueError(f"Expected `checks` to name at least one check, one of {list(CHECKS)}, but it is empty.")
    return [chosen[key] for key in CHECKS if key in chosen]


def summary_table(report: Report, header: str = "lightning_recipe sanity run") -> str:
    """The report as a plain-text table for the console: one line per check, then the fixes."""
    failed = [r for r in report.results if r.status is CheckStatus.FAILED]
    verdict = "PASSED" if report.passed else f"FAILED ({len(failed)} of {len(report.results)} checks failed)"
    width = max([len("check"), *(len(r.name) for r in report.results)])
    lines = [f"{header}: {verdict}", f"  {'check':<{width}}  {'status':<7}  {'time (s)':>8}  summary"]
    for r in report.results:
        status = r.status.value.upper() if r.status is CheckStatus.FAILED else r.status.value
        lines.append(f"  {r.name:<{width}}  {status:<7}  {r.duration_s:>8.2f}  {r.summary}")
    if failed:
        lines.append("How to fix:")
        lines += [f"  {r.name}: {r.hint}" for r in failed if r.hint]
    return "\n".join(lines)


class RecipeSuite(RecipeCallback):
    """The checks and the monitors as one callback, and the sanity-run mode.

    Without sanity mode it behaves as the separate callbacks would: the checks run before the first optimizer
    step in a fixed order (``InitLossCheck``, ``BatchLeakageProbe``, ``OverfitOneBatch``: cheap ones first), a
    failure raises :class:`~lightning_recipe.RecipeCheckError` or warns per ``on_fail``, and the monitors
    watch the training that follows.

    In sanity mode (``sanity_run=True``, or ``LIGHTNING_RECIPE_SANITY_RUN=1`` with ``sanity_run`` left unset)
    every check runs whatever the others found, and then, on rank zero: the report is written to
    ``<report_dir>/sanity_run.json`` and ``.md`` (default: ``trainer.log_dir``, else ``default_root_dir``), a
    summary table is printed, and the Markdown goes to TensorBoard's text tab (``recipe/sanity_run/report``).
    ``fit`` then ends before the first optimizer step, the monitors never start, and with ``exit_process=True``
    (the default) the process exits with status 0 (all passed) or 1 (a check failed) by raising
    :class:`SanityRunExit` on every rank, so nothing after ``fit`` (testing, exporting) runs on an untrained
    model. With ``exit_process=False`` ``fit`` returns and ``suite.report`` holds the verdict. Lightning tears
    the run down as for any exception, so loggers are finalized with status ``"failed"`` even when every check
    passed. Under ``ddp_spawn``/``ddp_fork`` a failure fails the job (the parent process sees the workers
    exit 1), and a pass returns from ``fit`` with a warning, since the parent would hang on a clean exit.

    Args:
        sanity_run: ``True``/``False`` force the mode; ``None`` reads ``LIGHTNING_RECIPE_SANITY_RUN``.
        on_fail: ``"raise"`` or ``"warn"``, for the checks the suite builds (ignored in sanity mode).
        report_dir: the folder a sanity run writes its report to; ``None``: next to the logs; ``False``: no files.
        exit_process: end the process after a sanity run, with its verdict as the exit status.
        init_loss_check, batch_leakage_probe, overfit_one_batch, update_ratio_monitor,
            prediction_dynamics_logger, first_layer_visualizer: one keyword per check or monitor: ``True``
            (default) builds it with default arguments, a dict builds it with those keyword arguments, an
            instance is used as it is, ``None`` or ``False`` leaves it out. Another name is refused, with the
            valid ones listed.
        inputs, targets, forward: how to read a batch, given to every check and monitor the suite builds.

    Example::

        trainer = L.Trainer(callbacks=[RecipeSuite(overfit_one_batch={"max_steps": 400}, first_layer_visualizer=None)])
        trainer.fit(model, datamodule)   # LIGHTNING_RECIPE_SANITY_RUN=1 python train.py: checks, report, exit 0/1

    Attributes:
        checks: the checks, in the order they run.
        monitors: the monitors.
        report: after a sanity run, the :class:`~lightning_recipe.Report`; else ``None``.
        report_paths: after a sanity run, the JSON and Markdown files rank zero wrote.
    """

    def __init__(
        self,
        *,
        sanity_run: bool | None = None,
        on_fail: str = "raise",
        report_dir: str | os.PathLike[str] | Literal[False] | None = None,
        exit_process: bool = True,
        init_loss_check: bool | dict[str, Any] | InitLossCheck | None = True,
        batch_leakage_probe: bool | dict[str, Any] | BatchLeakageProbe | None = True,
        overfit_one_batch: bool | dict[str, Any] | OverfitOneBatch | None = True,
        update_ratio_monitor: bool | dict[str, Any] | UpdateRatioMonitor | None = True,
        prediction_dynamics_logger: bool | dict[str, Any] | PredictionDynamicsLogger | None = True,
        first_layer_visualizer: bool | dict[str, Any] | FirstLayerVisualizer | None = True,
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
        **unknown: Any,
    ) -> None:
        check_choice("sanity_run", sanity_run, (None, True, False))
        check_choice("on_fail", on_fail, ON_FAIL_CHOICES)
        check_choice("exit_process", exit_process, (True, False))
        if unknown:  # caught here rather than by Python, so the message can list the valid names
            raise ValueError(
                f"Expected the component keywords of RecipeSuite to name checks or monitors, one of "
                f"{list(_COMPONENTS)}, but got {next(iter(unknown))!r}. Its other arguments are: sanity_run, "
                "on_fail, report_dir, exit_process, inputs, targets, forward."
            )
        components = {
            "init_loss_check": init_loss_check,
            "batch_leakage_probe": batch_leakage_probe,
            "overfit_one_batch": overfit_one_batch,
            "update_ratio_monitor": update_ratio_monitor,
            "prediction_dynamics_logger": prediction_dynamics_logger,
            "first_layer_visualizer": first_layer_visualizer,
        }
        self.sanity_run = sanity_run_requested() if sanity_run is None else sanity_run
        self.on_fail = on_fail
        if report_dir is not None and report_dir is not False and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"Expected `report_dir` to be a path, None or False, but got {report_dir!r}.")
        self.report_dir: Path | Literal[False] | None = (
            report_dir if report_dir is None or report_dir is False else Path(report_dir)
        )
        self.exit_process = exit_process
        adapters = {"inputs": inputs, "targets": targets, "forward": forward}
        adapters = {key: fn for key, fn in adapters.items() if fn is not None}
        built = {name: _build(name, cls, components[name], adapters, on_fail) for name, cls in _COMPONENTS.items()}
        self.checks: list[PreflightCheck] = [c for n in CHECKS if isinstance(c := built[n], PreflightCheck)]
        self.monitors: list[Monitor] = [m for n in MONITORS if isinstance(m := built[n], Monitor)]
        self.report: Report | None = None
        self.report_paths: list[Path] = []
        if self.sanity_run and not self.checks:
            rank_zero_warn(
                "lightning_recipe: RecipeSuite is in sanity-run mode with every check removed, so the sanity run "
                "checks nothing and passes. Keep at least one of init_loss_check, batch_leakage_probe, "
                "overfit_one_batch.",
                category=RecipeWarning,
            )

    @property
    def component(self) -> str:
        return "sanity_run"

    def _children(self) -> list[Callback]:
        """The callbacks that get Lightning's hooks: none of the monitors in a sanity run (no training)."""
        return list(self.checks) if self.sanity_run else [*self.checks, *self.monitors]

    # -- the checks --------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sanity_run:
            self._sanity_run(trainer, pl_module)
            return
        for check in self.checks:
            check.on_train_start(trainer, pl_module)  # runs now, or waits for the first batch training fetches
        for monitor in self.monitors:
            monitor.on_train_start(trainer, pl_module)

    def _sanity_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = []
        for check in self.checks:  # every rank runs every check: the verdicts are agreed by collectives
            check.result = check.execute(trainer, pl_module)
            _logging.log_text(trainer, check.tag("verdict"), check.result.format(), trainer.global_step)
            results.append(check.result)
        self.report = Report(results)
        # trainer.log_dir is a collective (a broadcast from rank zero): every rank asks
        directory = None if self.report_dir is False else self.report_dir or _log_dir(trainer)
        exits = self.exit_process and _may_exit(self.report.passed)
        if trainer.is_global_zero:
            self._publish(trainer, pl_module, directory, exits)
        trainer.strategy.barrier("lightning_recipe.sanity_run")  # the report exists before any rank exits
        if exits:
            raise SanityRunExit(self.report)
        trainer.should_stop = True
        # `should_stop` is obeyed only once min_epochs / min_steps are met: no training in a sanity run
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = None

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: Path | None, exits: bool) -> None:
        """Rank zero: the files, TensorBoard's text tab, the table. Never raises: the other ranks wait at a
        barrier, and an error here would leave them hanging."""
        assert self.report is not None
        lines = [f"\n{summary_table(self.report)}"]
        try:
            if directory is not None:
                self.report_paths = self._write(trainer, pl_module, directory)
                lines.append(f"Report: {' and '.join(str(p) for p in self.report_paths)}")
            _logging.log_text(trainer, self.tag("report"), self.report.to_markdown(), trainer.global_step)
        except Exception as error:  # noqa: BLE001 - see the docstring
            lines.append(
                f"Report: could not be written to {directory}: {type(error).__name__}: {error}. The table above is "
                "the whole verdict; pass RecipeSuite(report_dir=...) to write it elsewhere."
            )
        if exits:
            lines.append(f"Sanity run: training skipped, exit status {0 if self.report.passed else 1}.")
        print("\n".join(lines), flush=True)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: Path) -> list[Path]:
        assert self.report is not None
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        data = {
            **self.report.to_dict(),
            "model": type(pl_module).__qualname__,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "lightning_recipe": _version(),
        }
        json_path, md_path = directory / f"{REPORT_NAME}.json", directory / f"{REPORT_NAME}.md"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        md_path.write_text(self.report.to_markdown())
        return [json_path, md_path]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.sanity_run:  # never reached: `fit` ends at on_train_start; a guard against silent training
            raise RuntimeError(
                "lightning_recipe's sanity run reached a training batch, but it ends `fit` before the first one. "
                "Please report this with your Trainer arguments."
            )
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sanity_run and self.report is None:
            rank_zero_warn(
                "lightning_recipe's sanity run checked nothing: `fit` ended before training started (no training "
                "batches, or limit_train_batches=0), and the checks run at the start of training. Give the Trainer "
                "a training dataloader with at least one batch.",
                category=RecipeWarning,
            )
        self._forward("on_fit_end", trainer, pl_module)

    # -- state ------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {child.state_key: state for child in self._all() if (state := child.state_dict())}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for child in self._all():
            # a suite checkpoint written before monitors had a key per instance holds them under the class name
            state = state_dict.get(child.state_key, state_dict.get(type(child).__name__))
            if state:
                child.load_state_dict(state)

    def _all(self) -> list[Callback]:
        return [*self.checks, *self.monitors]

    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for child in self._children():
            getattr(child, hook)(*args, **kwargs)


def _forwarding(hook: str) -> Any:
    def forward(self: RecipeSuite, *args: Any, **kwargs: Any) -> None:
        self._forward(hook, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"Calls ``{hook}`` of the checks and (unless in a sanity run) the monitors."
    return forward


# Every other Callback hook goes to the children unchanged, so a check or monitor that starts using a hook
# works inside the suite without a change here.
_FORWARDED = [
    name
    for name, value in vars(Callback).items()
    if callable(value) and (name.startswith("on_") or name in ("setup", "teardown")) and name not in vars(RecipeSuite)
]
for _hook in _FORWARDED:
    setattr(RecipeSuite, _hook, _forwarding(_hook))


def _build(
    name: str, cls: type[RecipeCallback], spec: Any, adapters: dict[str, Any], on_fail: str
) -> RecipeCallback | None:
    if spec is None or spec is False:
        return None
    if isinstance(spec, cls):
        return spec
    kwargs: dict[str, Any] = dict(adapters)
    if issubclass(cls, PreflightCheck):
        kwargs["on_fail"] = on_fail
    if spec is True:
        return cls(**kwargs)
    if isinstance(spec, Mapping):
        return cls(**{**kwargs, **spec})
    raise TypeError(
        f"Expected `{name}` to be True, False, None, a dict of {cls.__name__} arguments or a {cls.__name__}, "
        f"but got {spec!r}."
    )


def _log_dir(trainer: pl.Trainer) -> Path:
    """``trainer.log_dir`` (the TensorBoard/CSV version folder, a logger's save_dir), else ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _may_exit(passed: bool) -> bool:
    """Whether raising SystemExit ends the job cleanly. In a worker started by multiprocessing (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``, a worker pool) the parent waits for the worker's return value: a clean exit
    would hang it, while a non-zero one fails it (which is the verdict). So there a passing run returns."""
    if multiprocessing.parent_process() is None or not passed:
        return True
    rank_zero_warn(
        "lightning_recipe: every check passed, and this process was started by multiprocessing (ddp_spawn, "
        "ddp_fork, ddp_notebook, or a worker pool), whose parent would hang on a clean exit: the sanity run ends "
        "`fit` without exiting, so the code after `fit` runs. Use strategy='ddp' (or torchrun, srun) for a sanity "
        "run that stops the script.",
        category=RecipeWarning,
    )
    return False


def _version() -> str:
    from lightning_recipe import __version__

    return __version__


def sanity_suite(
    checks: Iterable[str | PreflightCheck] | None, report_dir: str | os.PathLike[str] | Literal[False] | None
) -> RecipeSuite:
    """A suite in sanity mode that returns from ``fit`` (no exit) and holds only ``checks``."""
    chosen = resolve_checks(checks)
    # each keyword takes its own component type (or None); the dicts hold several, hence Any
    picked: dict[str, Any] = {
        name: next((c for c in chosen if isinstance(c, cls)), None) for name, cls in CHECKS.items()
    }
    monitors_off: dict[str, Any] = {name: None for name in MONITORS}
    return RecipeSuite(sanity_run=True, exit_process=False, report_dir=report_dir, **picked, **monitors_off)


def sanity_run(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    checks: Iterable[str | PreflightCheck] | None = None,
    **trainer_kwargs: Any,
) -> Report:
    """Run the checks on ``model`` and return the :class:`Report`, without training: no optimizer step.

    For notebooks and tests. A failed check is in the report, never raised (``on_fail`` is ignored).
    The Trainer is built from ``trainer_kwargs`` over quiet defaults (no logger, no checkpoints, no progress
    bar, no model summary); no report file is written (``report.to_json()``, ``report.to_markdown()`` give
    it). Lightning's sanity validation runs as usual, so a broken ``validation_step`` surfaces here too.

    Args:
        model: the LightningModule.
        datamodule, train_dataloaders, val_dataloaders: as for ``trainer.fit``.
        checks: check names (``"InitLossCheck"`` or ``"init_loss_check"``) or instances; all by default.
        **trainer_kwargs: ``Trainer`` arguments, e.g. ``accelerator="gpu", devices=1``.

    Example::

        report = sanity_run(model, datamodule=dm)
        assert report.passed, report.to_markdown()
    """
    suite = sanity_suite(checks, report_dir=False)
    if "callbacks" in trainer_kwargs:
        callbacks = trainer_kwargs.pop("callbacks")
        callbacks = [*callbacks] if isinstance(callbacks, (list, tuple)) else [callbacks]
    else:
        callbacks = []
    defaults: dict[str, Any] = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=1
    )
    trainer = pl.Trainer(**{**defaults, **trainer_kwargs}, callbacks=[*callbacks, suite])
    trainer.fit(model, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule)
    if suite.report is None:  # fit ended before on_train_start: no training batches, limit_train_batches=0
        raise RuntimeError(
            "The sanity run did not reach the start of training, so no check ran. Expected a training "
            "dataloader with at least one batch and `limit_train_batches` > 0."
        )
    return suite.report
