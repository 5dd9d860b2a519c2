"""The status table of the real models (tests/real_models.py): each model trained with all six callbacks at their
defaults (the checks with ``on_fail="warn"``, so a bug trains on and the monitors still watch), one row per model
with every check's status and summary and every monitor's alerts. The tests in tests/test_real_models.py hold the
verdicts; this is the overview a person reads.

Run (about 3-5 minutes on one thread):

    PYTHONPATH=. python benchmarks/real_models.py [--steps 300] [--only NAME ...] [--width 110]

Cases whose library is not installed are listed as such. Nothing is written unless ``--out FILE`` is given (the
table in Markdown).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L

import lightning_recipe
from tests.models import trainer
from tests.real_models import ALL, CHECKS, MONITORS, RealCase


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_case(case: RealCase, steps: int) -> dict:
    """Fit one case with the six callbacks; returns what each said (or the exception that ended the run)."""
    missing = [lib for lib in case.requires if importlib.util.find_spec(lib) is None]
    if missing:
        return {"missing": missing}
    L.seed_everything(0, verbose=False)
    checks = [getattr(lightning_recipe, name)(on_fail="warn", **case.check_kwargs) for name in CHECKS]
    monitors = [getattr(lightning_recipe, name)(**case.check_kwargs) for name in MONITORS]
    start = time.perf_counter()
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", lightning_recipe.RecipeWarning)
        try:
            t = trainer(max_steps=steps, callbacks=checks + monitors, **case.trainer_kwargs)
            t.fit(case.model(), **case.loaders())
        except Exception as exc:  # noqa: BLE001 - a crash is a row of the table, not the end of it
            error = f"{type(exc).__name__}: {exc}"
    return {
        "checks": [(name, c.result) for name, c in zip(CHECKS, checks, strict=True)],
        "monitors": [(name, m) for name, m in zip(MONITORS, monitors, strict=True)],
        "error": error,
        "internal_errors": [str(w.message) for w in caught if "please report" in str(w.message).lower()],
        "seconds": time.perf_counter() - start,
    }


def expected(case: RealCase) -> str:
    if case.healthy:
        return "healthy: all pass, no alert"
    return f"bug: {' or '.join(case.catches)} fails naming {' / '.join(repr(w) for w in case.cause)}"


def verdict(case: RealCase, out: dict) -> str:
    """OK when the row is what the case requires (the same rule as the tests), else what is wrong."""
    if out.get("error"):
        return "CRASH"
    problems = [f"{len(out['internal_errors'])} 'please report this' warning(s)"] if out["internal_errors"] else []
    failed = [(n, r) for n, r in out["checks"] if r is not None and r.status.value == "failed"]
    if case.healthy:
        for name, result in out["checks"]:
            if result is None:
                problems.append(f"{name} did not run")
            elif result.status.value == "failed":
                problems.append(f"{name} false alarm")
            elif (
                result.status.value == "passed"
                and name in case.reads
                and not any(w.lower() in result.summary.lower() for w in case.reads[name])
            ):
                problems.append(f"{name} misread the task (want one of {case.reads[name]})")
            elif result.status.value == "skipped" and not any(
                w.lower() in result.summary.lower() for w in case.may_skip.get(name, ())
            ):
                problems.append(f"{name} skipped" + (" without saying why" if name in case.may_skip else ""))
        for name, monitor in out["monitors"]:
            if monitor.alerts:
                problems.append(f"{name} alerted")
            if not monitor.enabled and name not in case.may_skip:
                problems.append(f"{name} switched off")
    else:
        caught = [
            (n, r)
            for n, r in failed
            if n in case.catches and any(w.lower() in f"{r.summary} {r.hint}".lower() for w in case.cause)
        ]
        if not caught:
            problems.append("missed" if not failed else "caught without its cause named")
    return "OK" if not problems else "; ".join(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    parser.add_argument("--width", type=int, default=110, help="summary characters per line")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    lines = [f"# Real models with the six callbacks at defaults ({args.steps} steps, checks on_fail='warn')", ""]
    tally = {"OK": 0, "not OK": 0}
    for case in ALL:
        if args.only and case.name not in args.only:
            continue
        out = run_case(case, args.steps)
        if "missing" in out:
            row = [f"## {case.name}: not run, missing {', '.join(out['missing'])}"]
        else:
            v = verdict(case, out)
            tally["OK" if v == "OK" else "not OK"] += 1
            row = [f"## {case.name}  [{v}]  ({out['seconds']:.1f} s)", f"expected: {expected(case)}"]
            if out["error"]:
                row.append(f"run ended: {_short(out['error'], args.width)}")
            for message in out["internal_errors"]:
                row.append(f"- internal error: {_short(message, args.width)}")
            for name, result in out["checks"]:
                if result is None:
                    row.append(f"- {name}: did not run")
                else:
                    row.append(f"- {name}: {result.status.value.upper()}: {_short(result.summary, args.width)}")
                    if result.status.value == "failed" and result.hint:
                        row.append(f"    hint: {_short(result.hint, args.width)}")
            for name, monitor in out["monitors"]:
                alerts = "; ".join(f"{a.kind}@{a.step}: {_short(a.message, 60)}" for a in monitor.alerts) or "none"
                state = "" if monitor.enabled else " (switched off)"
                row.append(f"- {name}{state}: alerts: {alerts}")
        print("\n".join(row) + "\n", flush=True)
        lines += row + [""]
    summary = f"{tally['OK']} rows as required, {tally['not OK']} not"
    print(summary)
    if args.out is not None:
        args.out.write_text("\n".join(lines + [summary, ""]))


if __name__ == "__main__":
    main()
