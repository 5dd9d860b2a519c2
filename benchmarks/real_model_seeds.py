"""The three checks on every healthy real model (``tests/real_models.py``) at more seeds than the test suite's one:
the test ``test_healthy_real_model_passes_every_check`` run with ``seed_everything(seed)`` for each seed given.
Prints the models that failed (none is the expected answer).

    python benchmarks/real_model_seeds.py 1 2 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import pytest

import tests.test_real_models as real


def main() -> None:
    seed_everything = L.seed_everything
    for seed in [int(s) for s in sys.argv[1:]] or [1, 2, 3]:
        real.L.seed_everything = lambda *args, s=seed, **kwargs: seed_everything(s, verbose=False)
        failed = []
        for case in real.HEALTHY:
            try:
                real.test_healthy_real_model_passes_every_check(case)
            except pytest.skip.Exception:
                continue  # a library that is not installed
            except AssertionError as error:
                failed.append(f"{case.name}: {str(error)[:200]}")
        print(f"seed {seed}: {len(real.HEALTHY)} healthy models, failed: {failed or 'none'}", flush=True)
    real.L.seed_everything = seed_everything


if __name__ == "__main__":
    main()
