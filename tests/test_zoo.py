"""The bug zoo through real `Trainer.fit` runs: every bug is caught by its check, before any optimizer step,
with a hint; every healthy model passes all three checks."""

from __future__ import annotations

import lightning.pytorch as L
import pytest

import lightning_recipe
from lightning_recipe import CheckStatus, RecipeCheckError
from tests.models import trainer
from tests.zoo import BUGS, CHECKS, HEALTHY, Case


def _fit(case: Case, callbacks: list[L.Callback]) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    t = trainer(max_steps=1, callbacks=callbacks, **case.trainer_kwargs)
    t.fit(case.model(), case.data())
    return t


def test_the_zoo_is_big_enough():
    assert len(BUGS) >= 15 and len(HEALTHY) >= 10
    assert {case.catches for case in BUGS} == set(CHECKS)


@pytest.mark.parametrize("case", HEALTHY, ids=str)
def test_healthy_model_passes_every_check(case: Case):
    checks = [getattr(lightning_recipe, name)(**case.check_kwargs) for name in CHECKS]
    t = _fit(case, checks)
    for check in checks:
        assert check.result.status is CheckStatus.PASSED, check.result.format()
    assert t.global_step == 1


@pytest.mark.parametrize("case", BUGS, ids=str)
def test_bug_is_caught_before_the_first_step(case: Case):
    check = getattr(lightning_recipe, case.catches)(**case.check_kwargs)
    with pytest.raises(RecipeCheckError) as info:
        _fit(case, [check])
    result = info.value.result
    assert result.name == case.catches
    assert result.status is CheckStatus.FAILED
    assert result.hint, result.format()
    assert case.hint_contains.lower() in (result.summary + " " + result.hint).lower(), result.format()
    assert check.result is result
