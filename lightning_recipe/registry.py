"""The one list of lightning_recipe's components: every check and monitor, one line each, in the order they run.

Everything that needs "all the components" reads it: :class:`~lightning_recipe.RecipeSuite` (one keyword per
component, its signature built from here), :func:`~lightning_recipe.sanity_run` and the command line's
``--checks`` (names to checks), the test zoo and the benchmarks. So adding a component is its diagnostic module,
its callback module, its tests, one line in :data:`COMPONENTS` (and its public export in ``__init__.py``, which a
test holds to this list).

The registry sits above the components: it imports them, and they import neither it nor the suite.

Example::

    >>> list(CHECKS)
    ['init_loss_check', 'batch_leakage_probe', 'overfit_one_batch']
    >>> component_key(FirstLayerVisualizer)
    'first_layer_visualizer'
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import TypeVar

from lightning_recipe.callbacks._base import RecipeCallback, snake_case
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.callbacks._preflight import PreflightCheck
from lightning_recipe.callbacks.batch_leakage_probe import BatchLeakageProbe
from lightning_recipe.callbacks.first_layer_visualizer import FirstLayerVisualizer
from lightning_recipe.callbacks.init_loss_check import InitLossCheck
from lightning_recipe.callbacks.overfit_one_batch import OverfitOneBatch
from lightning_recipe.callbacks.prediction_dynamics_logger import PredictionDynamicsLogger
from lightning_recipe.callbacks.update_ratio_monitor import UpdateRatioMonitor

__all__ = ["CHECKS", "COMPONENTS", "MONITORS", "arguments", "by_kind", "component_key", "find", "resolve_checks"]

#: Every component, one registration line each. The checks run in this order, the two cheap ones first in the
#: recipe's order (about 3 and 1 training steps of the quick-start model), then the one that trains a copy (about
#: 6; benchmarks/results/check_cost.md). A component is a check (a PreflightCheck) or a monitor (a Monitor).
COMPONENTS: tuple[type[RecipeCallback], ...] = (
    InitLossCheck,
    BatchLeakageProbe,
    OverfitOneBatch,
    UpdateRatioMonitor,
    PredictionDynamicsLogger,
    FirstLayerVisualizer,
)

_Kind = TypeVar("_Kind", bound=RecipeCallback)


def component_key(cls: type[RecipeCallback]) -> str:
    """The component's keyword in RecipeSuite and its name on the command line: its class name in snake_case,
    which is also the ``recipe/<component>/`` its TensorBoard tags live under."""
    return snake_case(cls.__name__)


def arguments(cls: type[RecipeCallback]) -> list[str]:
    """The names of the keyword arguments ``cls`` takes, in the order of its signature."""
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def by_kind(components: Iterable[type[RecipeCallback]], kind: type[_Kind]) -> dict[str, type[_Kind]]:
    """The components of one kind (checks or monitors) by key, in registration order.

    Raises:
        TypeError: a component that is neither a check nor a monitor, or two with one key: the registry is
            wrong, which is ours to fix (a test builds it on import, so this never reaches a user).
    """
    components = tuple(components)
    keys = [component_key(cls) for cls in components]
    for cls in components:
        if not issubclass(cls, (PreflightCheck, Monitor)):
            raise TypeError(
                f"Expected every registered component to be a check (PreflightCheck) or a monitor (Monitor), but "
                f"{cls.__name__} is neither. Please report this."
            )
        if keys.count(component_key(cls)) > 1:
            raise TypeError(f"Expected each component registered once, but {cls.__name__} is there twice.")
    return {component_key(cls): cls for cls in components if issubclass(cls, kind)}


#: the checks by key, in the order they run
CHECKS: dict[str, type[PreflightCheck]] = by_kind(COMPONENTS, PreflightCheck)
#: the monitors by key
MONITORS: dict[str, type[Monitor]] = by_kind(COMPONENTS, Monitor)


def find(name: str, registry: Mapping[str, type[RecipeCallback]]) -> str:
    """``"InitLossCheck"`` or ``"init_loss_check"`` -> ``"init_loss_check"``; refuses other names, listing the
    valid ones."""
    by_class = {cls.__name__: key for key, cls in registry.items()}
    if name in registry:
        return name
    if name in by_class:
        return by_class[name]
    valid = ", ".join(f"{cls.__name__} ({key})" for key, cls in registry.items())
    raise ValueError(f"Expected a check name, one of {valid}, but got {name!r}.")


def resolve_checks(checks: Iterable[str | PreflightCheck] | str | PreflightCheck | None) -> list[PreflightCheck]:
    """The checks named (class name or snake_case) or given, in the registry's order; all when ``None``.

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
            key = find(type(item).__name__, CHECKS)
            instance = item
        elif isinstance(item, str):
            key = find(item, CHECKS)
            instance = CHECKS[key]()
        else:
            raise TypeError(f"Expected `checks` to hold check names or check instances, but got {item!r}.")
        if key in chosen:
            raise ValueError(f"Expected each check once in `checks`, but {CHECKS[key].__name__} is there twice.")
        chosen[key] = instance
    if not chosen:
        raise ValueError(f"Expected `checks` to name at least one check, one of {list(CHECKS)}, but it is empty.")
    return [chosen[key] for key in CHECKS if key in chosen]
