"""RecipeSuite: the registered checks and monitors as one callback, and the sanity-run mode for cluster jobs.

The suite builds one component per keyword, from the registry (:mod:`lightning_recipe.registry`), and hands
Lightning's hooks to them; in sanity-run mode it runs only the checks and ends ``fit``, leaving the report, the
table and the exit status to :mod:`lightning_recipe.sanity`. :func:`sanity_run` does the same for notebooks and
tests and returns the :class:`Report` instead of exiting.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypedDict

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_recipe import _logging
from lightning_recipe._args import ON_FAIL_CHOICES, OnFail, check_choice
from lightning_recipe.callbacks._base import RecipeCallback
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.diagnostics.batch import ForwardFn, InputsFn, TargetsFn
from lightning_recipe.registry import CHECKS, COMPONENTS, MONITORS, arguments, component_key, resolve_checks
from lightning_recipe.report import RecipeWarning, Report
from lightning_recipe.sanity import (
    EXIT_NOTHING_CHECKED,
    SanityRunExit,
    log_dir,
    may_exit,
    publish,
    sanity_run_requested,
)

__all__ = ["ComponentArgumentError", "ComponentSpec", "RecipeSuite", "sanity_run", "sanity_suite"]

#: what a component keyword of RecipeSuite takes: True (default arguments), a dict of arguments, an instance, or
#: None/False (left out); each keyword's own type, in the generated signature, names the component's class
ComponentSpec: TypeAlias = bool | dict[str, Any] | RecipeCallback | None


class RecipeSuite(RecipeCallback):
    """The checks and the monitors as one callback, and the sanity-run mode.

    Without sanity mode it behaves as the separate callbacks would: the checks run before the first optimizer
    step in the registry's order (``InitLossCheck``, ``BatchLeakageProbe``, ``OverfitOneBatch``: cheap ones
    first), a failure raises :class:`~lightning_recipe.RecipeCheckError` or warns per ``on_fail``, and the monitors
    watch the training that follows.

    In sanity mode (``sanity_run=True``, or ``LIGHTNING_RECIPE_SANITY_RUN=1`` with ``sanity_run`` left unset)
    every check runs whatever the others found, and then, on rank zero: the report is written to
    ``<report_dir>/sanity_run.json`` and ``.md`` (default: ``trainer.log_dir``, else ``default_root_dir``), a
    summary table is printed, and the Markdown goes to TensorBoard's text tab (``recipe/sanity_run/report``).
    ``fit`` then ends before the first optimizer step, the monitors never start, and with ``exit_process=True``
    (the default) the process exits with status 0 (all passed), 1 (a check failed) or 3 (nothing was checked:
    every check skipped, as in a run resumed with ``ckpt_path``, or ``fit`` ended before training started) by
    raising :class:`SanityRunExit` on every rank, so nothing after ``fit`` (testing, exporting) runs on an untrained
    model. With ``exit_process=False`` ``fit`` returns and ``suite.report`` holds the verdict. Lightning tears
    the run down as for any exception, so loggers are finalized with status ``"failed"`` even when every check
    passed. Under ``ddp_spawn``/``ddp_fork`` a failure fails the job (the parent process sees the workers
    exit 1), and a pass returns from ``fit`` with a warning, since the parent would hang on a clean exit.

    Args:
        sanity_run: ``True``/``False`` force the mode; ``None`` reads ``LIGHTNING_RECIPE_SANITY_RUN``.
        on_fail: ``"raise"`` or ``"warn"``, for the checks the suite builds (ignored in sanity mode).
        report_dir: the folder a sanity run writes its report to; ``None``: next to the logs; ``False``: no files.
        exit_process: end the process after a sanity run, with its verdict as the exit status.
        **components: one keyword per registered check or monitor (:data:`lightning_recipe.registry.COMPONENTS`),
            its class name in snake_case (``init_loss_check``, ``overfit_one_batch``, ``first_layer_visualizer``,
            ...). ``True`` (default) builds it with default arguments, a dict builds it with those keyword
            arguments, an instance is used as it is, ``None`` or ``False`` leaves it out. Another name is refused,
            with the valid ones listed; so is a dict with an argument the component does not take or a value it
            refuses (:class:`ComponentArgumentError`, naming the component). ``inspect.signature(RecipeSuite)``
            lists every keyword with its type (the class, and a TypedDict of its arguments for the dict), which is
            what ``help()`` shows and LightningCLI (jsonargparse) reads from a config.
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
        on_fail: OnFail = "raise",
        report_dir: str | os.PathLike[str] | Literal[False] | None = None,
        exit_process: bool = True,
        inputs: InputsFn | None = None,
        targets: TargetsFn | None = None,
        forward: ForwardFn | None = None,
        **components: ComponentSpec,
    ) -> None:
        check_choice("sanity_run", sanity_run, (None, True, False))
        check_choice("on_fail", on_fail, ON_FAIL_CHOICES)
        check_choice("exit_process", exit_process, (True, False))
        keys = [component_key(cls) for cls in COMPONENTS]
        unknown = [name for name in components if name not in keys]
        if unknown:  # caught here rather than by Python, so the message can list the valid names
            raise ValueError(
                f"Expected the component keywords of RecipeSuite to name checks or monitors, one of "
                f"{keys}, but got {unknown[0]!r}. Its other arguments are: {', '.join(_OWN_ARGUMENTS)}."
            )
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
        built = {
            key: _build(key, cls, components.get(key, True), adapters, on_fail)
            for key, cls in zip(keys, COMPONENTS, strict=True)
        }
        self.checks: list[PreflightCheck] = [c for n in CHECKS if isinstance(c := built[n], PreflightCheck)]
        self.monitors: list[Monitor] = [m for n in MONITORS if isinstance(m := built[n], Monitor)]
        self.report: Report | None = None
        self.report_paths: list[Path] = []
        if self.sanity_run and not self.checks:
            rank_zero_warn(
                "lightning_recipe: RecipeSuite is in sanity-run mode with every check removed: its sanity run checks "
                f"nothing (exit status {EXIT_NOTHING_CHECKED}, not a pass). Keep at least one of {', '.join(CHECKS)}.",
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
        directory = None if self.report_dir is False else self.report_dir or log_dir(trainer)
        exits = self.exit_process and may_exit(self.report.passed)
        if trainer.is_global_zero:
            self.report_paths = publish(trainer, pl_module, self.report, directory, self.tag("report"), exits)
        trainer.strategy.barrier("lightning_recipe.sanity_run")  # the report exists before any rank exits
        if exits:
            raise SanityRunExit(self.report)
        trainer.should_stop = True
        # `should_stop` is obeyed only once min_epochs / min_steps are met: no training in a sanity run
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = None

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
        self._forward("on_fit_end", trainer, pl_module)
        if self.sanity_run and self.report is None:
            rank_zero_warn(
                "lightning_recipe's sanity run checked nothing: `fit` ended before training started (no training "
                "batches, limit_train_batches=0, or a checkpoint already at max_steps), and the checks run at the "
                "start of training. Give the Trainer a training dataloader with at least one batch"
                + (f"; exit status {EXIT_NOTHING_CHECKED}, which is not a pass." if self.exit_process else "."),
                category=RecipeWarning,
            )
            if self.exit_process:
                raise SanityRunExit(Report([]))

    # -- state ------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {child.state_key: state for child in self._all() if (state := child.state_dict())}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for child in self._all():
            if state := state_dict.get(child.state_key):
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


class ComponentArgumentError(ValueError):
    """A component keyword of RecipeSuite holds an argument its class does not take, or a value it refuses: bad
    usage, which the command line reports in one line (exit status 2) rather than as the model's crash."""


def _settings(cls: type[RecipeCallback]) -> Any:
    """A TypedDict (every key optional) of ``cls``'s arguments and their types: what the dict a component keyword
    takes may hold. jsonargparse reads it from the signature, so LightningCLI refuses a misspelled argument or a
    value of the wrong type in a config while parsing it, naming the argument, before anything is built."""
    hints = typing.get_type_hints(cls.__init__)
    typed_dict: Any = TypedDict  # its keys are known only at run time, which mypy's TypedDict() refuses
    return typed_dict(f"{cls.__name__}Settings", {name: hints[name] for name in arguments(cls)}, total=False)


def _signature() -> inspect.Signature:
    """RecipeSuite's signature with one keyword per registered component, typed with the component's class and
    its settings (:func:`_settings`), in place of ``**components``: what ``help()``, IPython and Jupyter show, and
    what LightningCLI (jsonargparse) reads to build the suite from a config and to refuse a misspelled keyword or
    argument there. The keywords sit where the written ones used to, between ``exit_process`` and ``inputs``."""
    written = inspect.signature(RecipeSuite.__init__)
    own = [p for p in written.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in own].index("inputs")
    keywords = [
        inspect.Parameter(
            component_key(cls),
            inspect.Parameter.KEYWORD_ONLY,
            default=True,
            annotation=bool | _settings(cls) | cls | None,
        )
        for cls in COMPONENTS
    ]
    return written.replace(parameters=[*own[:at], *keywords, *own[at:]])


#: RecipeSuite's own arguments, besides one keyword per component (named in the message refusing another keyword)
_OWN_ARGUMENTS = tuple(name for name in inspect.signature(RecipeSuite).parameters if name != "components")
RecipeSuite.__init__.__signature__ = _signature()  # type: ignore[attr-defined]


def _build(
    name: str, cls: type[RecipeCallback], spec: Any, adapters: dict[str, Any], on_fail: OnFail
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
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"Expected `{name}` to be True, False, None, a dict of {cls.__name__} arguments or a {cls.__name__}, "
            f"but got {spec!r}."
        )
    valid = arguments(cls)
    unknown = [key for key in spec if key not in valid]
    if unknown:
        raise ComponentArgumentError(
            f"Expected the settings of `{name}` in RecipeSuite to be arguments of {cls.__name__}, one of "
            f"{', '.join(valid)}, but got {unknown[0]!r}."
        )
    try:
        return cls(**{**kwargs, **spec})
    except (TypeError, ValueError) as error:  # the component's own argument checks: name the component too
        raise ComponentArgumentError(f"In the settings of `{name}` in RecipeSuite: {error}") from None


def sanity_suite(
    checks: Iterable[str | PreflightCheck] | None, report_dir: str | os.PathLike[str] | Literal[False] | None
) -> RecipeSuite:
    """A suite in sanity mode that returns from ``fit`` (no exit) and holds only ``checks``."""
    chosen = resolve_checks(checks)
    # Any: the keys are component keywords only, but mypy cannot tell them from the suite's own arguments
    picked: dict[str, Any] = {
        name: next((c for c in chosen if isinstance(c, cls)), None) for name, cls in CHECKS.items()
    }
    monitors_off: dict[str, Any] = dict.fromkeys(MONITORS)
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
