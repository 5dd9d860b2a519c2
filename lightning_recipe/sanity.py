"""What a sanity run leaves behind: the request for one, the report files, the summary table, the exit status.

A *sanity run* is the same training script with one environment variable set
(``LIGHTNING_RECIPE_SANITY_RUN=1``) or ``RecipeSuite(sanity_run=True)``: every check runs (a failure does not
stop the others), the report is written next to the logs as JSON and Markdown, a summary table is printed,
the same text goes to TensorBoard's text tab, and ``fit`` ends before the first optimizer step. The process
then exits with status 0 when every check passed (some may have skipped), 1 when one failed, and 3 when nothing
was checked (every check skipped, as in a run resumed with ``ckpt_path``), so a job script can put
``LIGHTNING_RECIPE_SANITY_RUN=1 srun python train.py || exit 1`` in front of the real run.

This module is the verdict's way out of the process, apart from the callback that runs the checks
(:class:`~lightning_recipe.RecipeSuite` in :mod:`lightning_recipe.suite`): it knows reports, files and exit
statuses, and nothing of the components.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_recipe import _logging
from lightning_recipe.report import CheckStatus, RecipeWarning, Report

__all__ = [
    "ENV_VAR",
    "EXIT_FAILED",
    "EXIT_NOTHING_CHECKED",
    "EXIT_PASSED",
    "EXIT_USAGE",
    "REPORT_NAME",
    "SanityRunExit",
    "log_dir",
    "exit_status",
    "may_exit",
    "publish",
    "sanity_run_requested",
    "summary_table",
    "write_report",
]

#: the environment variable that turns a training script into a sanity run
ENV_VAR = "LIGHTNING_RECIPE_SANITY_RUN"
#: the report's file names, without suffix (``.json`` and ``.md``)
REPORT_NAME = "sanity_run"

#: the exit statuses of a sanity run and of ``lightning-recipe check``: every check passed (some may have skipped); a
#: check failed (or the user's code raised); bad usage (the console script only); nothing was checked (every check
#: skipped: a run resumed with ``ckpt_path``, a model no check applies to), which a job script must not take for a pass
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING_CHECKED = 0, 1, 2, 3

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SanityRunExit(SystemExit):
    """Ends the process after a sanity run with :func:`exit_status`: 0 every check passed, 1 one failed, 3 nothing
    was checked.

    Raised out of ``trainer.fit`` by :class:`RecipeSuite` in sanity-run mode, once the report is written and
    on every rank at once. Lightning tears the run down as for any exception; Python then exits with ``code``
    and no traceback. Catch it to go on in the same process; ``.report`` holds the results.
    """

    def __init__(self, report: Report) -> None:
        super().__init__(exit_status(report))
        self.report = report


def exit_status(report: Report) -> int:
    """:data:`EXIT_PASSED`, :data:`EXIT_FAILED`, or :data:`EXIT_NOTHING_CHECKED` when every check skipped."""
    if report.passed:
        return EXIT_PASSED
    return EXIT_FAILED if report.checked else EXIT_NOTHING_CHECKED


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


def summary_table(report: Report, header: str = "lightning_recipe sanity run") -> str:
    """The report as a plain-text table for the console: one line per check, then the fixes."""
    failed = [r for r in report.results if r.status is CheckStatus.FAILED]
    verdict = report.verdict
    if failed:
        verdict += f" ({len(failed)} of {len(report.results)} checks failed)"
    elif not report.checked:
        verdict += " (every check skipped, see why below: not a pass)" if report.results else " (no check ran)"
    width = max([len("check"), *(len(r.name) for r in report.results)])
    lines = [f"{header}: {verdict}", f"  {'check':<{width}}  {'status':<7}  {'time (s)':>8}  summary"]
    for r in report.results:
        status = r.status.value.upper() if r.status is CheckStatus.FAILED else r.status.value
        lines.append(f"  {r.name:<{width}}  {status:<7}  {r.duration_s:>8.2f}  {r.summary}")
    if failed:
        lines.append("How to fix:")
        lines += [f"  {r.name}: {r.hint}" for r in failed if r.hint]
    return "\n".join(lines)


def publish(
    trainer: pl.Trainer, pl_module: pl.LightningModule, report: Report, directory: Path | None, tag: str, exits: bool
) -> list[Path]:
    """Rank zero: the files (when ``directory`` is given), TensorBoard's text tab under ``tag``, the table; returns
    the files written. Never raises: the other ranks wait at a barrier, and an error here would leave them
    hanging."""
    lines = [f"\n{summary_table(report)}"]
    paths: list[Path] = []
    try:
        if directory is not None:
            paths = write_report(trainer, pl_module, report, directory / f"{REPORT_NAME}.json")
            lines.append(f"Report: {' and '.join(str(p) for p in paths)}")
        _logging.log_text(trainer, tag, report.to_markdown(), trainer.global_step)
    except Exception as error:  # noqa: BLE001 - see the docstring
        lines.append(
            f"Report: could not be written to {directory}: {type(error).__name__}: {error}. The table above is "
            "the whole verdict; pass RecipeSuite(report_dir=...) to write it elsewhere."
        )
    if exits:
        code = exit_status(report)
        why = ": nothing was checked, which is not a pass" if code == EXIT_NOTHING_CHECKED else ""
        lines.append(f"Sanity run: training skipped, exit status {code}{why}.")
    print("\n".join(lines), flush=True)
    return paths


def write_report(trainer: pl.Trainer, pl_module: pl.LightningModule, report: Report, json_path: Path) -> list[Path]:
    """The report as JSON at ``json_path`` and as Markdown beside it (``.md``); returns both paths. The one writer
    of report files: a sanity run's ``sanity_run.json`` and ``lightning-recipe check --report PATH`` alike.

    The JSON is ``report.to_dict()`` (``passed``; ``checked``, whether any check gave a verdict; and ``checks``:
    each ``CheckResult.to_dict()``: ``name``, ``status``, ``summary``, ``hint``, ``details``, ``duration_s``) and
    the run it came from: ``model`` (the LightningModule's class name), ``world_size``, ``global_step`` (the
    optimizer step the checks ran at) and ``lightning_recipe`` (the package's version).
    """
    json_path = json_path.resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        **report.to_dict(),
        "model": type(pl_module).__qualname__,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "lightning_recipe": _version(),
    }
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(report.to_markdown())
    return [json_path, json_path.with_suffix(".md")]


def log_dir(trainer: pl.Trainer) -> Path:
    """``trainer.log_dir`` (the TensorBoard/CSV version folder, a logger's save_dir), else ``default_root_dir``.
    A collective (a broadcast from rank zero): every rank must ask."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def may_exit(passed: bool) -> bool:
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
