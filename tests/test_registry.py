"""The one registry of components (lightning_recipe/registry.py): what RecipeSuite, the sanity run, the command
line, the zoo and the benchmarks read, so a new component is one registration line. The suite's keywords are
generated from it: they must still reach ``inspect.signature`` and LightningCLI's jsonargparse."""

from __future__ import annotations

import inspect
import json
import typing
import warnings

import pytest
from lightning.pytorch.callbacks import Callback
from typing_extensions import Unpack

import lightning_recipe
from lightning_recipe import RecipeSuite
from lightning_recipe.callbacks._base import RecipeCallback
from lightning_recipe.callbacks._monitor import Monitor
from lightning_recipe.callbacks._preflight import CheckOptions, PreflightCheck
from lightning_recipe.registry import CHECKS, COMPONENTS, MONITORS, by_kind, component_key, resolve_checks
from tests import real_models, zoo

OWN_ARGUMENTS = ["sanity_run", "on_fail", "report_dir", "exit_process", "inputs", "targets", "forward"]


def test_every_component_is_a_check_or_a_monitor_under_its_snake_case_key():
    # the design card's components, the checks in the order they run (cheap first); a new component adds to them
    recipe_checks = ["init_loss_check", "batch_leakage_probe", "overfit_one_batch"]
    assert [key for key in CHECKS if key in recipe_checks] == recipe_checks
    assert {"update_ratio_monitor", "prediction_dynamics_logger", "first_layer_visualizer"} <= set(MONITORS)
    assert [*CHECKS.values(), *MONITORS.values()] == list(COMPONENTS)
    assert all(issubclass(cls, PreflightCheck) for cls in CHECKS.values())
    assert all(issubclass(cls, Monitor) for cls in MONITORS.values())
    for cls in COMPONENTS:  # the key is the component its TensorBoard tags live under
        assert component_key(cls) == cls().component


def test_a_registry_with_a_stranger_or_a_component_twice_is_refused():
    class NotAComponent(RecipeCallback):
        pass

    with pytest.raises(TypeError, match=r"check \(PreflightCheck\) or a monitor \(Monitor\), but NotAComponent is"):
        by_kind([*COMPONENTS, NotAComponent], Monitor)
    with pytest.raises(TypeError, match=r"registered once, but InitLossCheck is there twice"):
        by_kind([*COMPONENTS, lightning_recipe.InitLossCheck], PreflightCheck)


def test_the_public_api_exports_exactly_the_registered_components():
    """The second line a new component needs (its export in __init__.py) is held to the first."""
    exported = {
        name
        for name in lightning_recipe.__all__
        if isinstance(obj := getattr(lightning_recipe, name), type)
        and issubclass(obj, Callback)
        and obj is not RecipeSuite
    }
    assert exported == {cls.__name__ for cls in COMPONENTS}
    assert all(getattr(lightning_recipe, cls.__name__) is cls for cls in COMPONENTS)


def test_the_zoo_and_the_real_models_name_the_registered_components():
    assert tuple(cls.__name__ for cls in CHECKS.values()) == zoo.CHECKS
    assert tuple(cls.__name__ for cls in MONITORS.values()) == zoo.MONITORS
    assert (real_models.CHECKS, real_models.MONITORS) == (zoo.CHECKS, zoo.MONITORS)


def test_the_suite_builds_every_registered_component_by_default_and_none_when_each_is_left_out():
    suite = RecipeSuite(sanity_run=False)
    assert [type(c) for c in suite.checks] == list(CHECKS.values())
    assert [type(m) for m in suite.monitors] == list(MONITORS.values())
    empty = RecipeSuite(sanity_run=False, **dict.fromkeys(CHECKS), **dict.fromkeys(MONITORS, False))
    assert empty.checks == [] and empty.monitors == []


def _tail_problems(cls: type[RecipeCallback]) -> list[str]:
    """The shared keywords (``on_fail`` for a check; ``inputs``, ``targets``, ``forward``) that ``cls``'s signature
    does not end on, keyword-only, with their defaults and types: none when the tail is whole."""
    tail = {"on_fail": "raise", "inputs": None, "targets": None, "forward": None}
    if not issubclass(cls, PreflightCheck):
        del tail["on_fail"]
    parameters = list(inspect.signature(cls).parameters.values())[-len(tail) :]
    written = {p.name: (p.kind, p.default) for p in parameters}
    hints = typing.get_type_hints(cls.__init__)
    return [
        name
        for name, default in tail.items()
        if written.get(name) != (inspect.Parameter.KEYWORD_ONLY, default) or name not in hints
    ]


def test_every_component_spells_out_the_shared_tail_with_its_defaults():
    """A component takes the tail as ``**options: Unpack[CheckOptions]`` (``BatchOptions`` for a monitor), and its
    signature spells it out: what help(), jsonargparse (LightningCLI) and RecipeSuite's typed settings read."""
    for cls in COMPONENTS:
        assert _tail_problems(cls) == [], cls.__name__

    class Written(PreflightCheck):  # a check written as the components are
        def __init__(self, level: int = 1, **options: Unpack[CheckOptions]) -> None:
            super().__init__(**options)

    class Tailless(PreflightCheck):  # one that forgot the tail
        def __init__(self, level: int = 1) -> None:
            super().__init__()

    class Untyped(Monitor):  # one that took it untyped: the signature shows `**kwargs`
        def __init__(self, **kwargs: typing.Any) -> None:
            super().__init__(every_n_steps=1, **kwargs)

    assert _tail_problems(Written) == []
    assert _tail_problems(Tailless) == ["on_fail", "inputs", "targets", "forward"]
    assert _tail_problems(Untyped) == ["inputs", "targets", "forward"]
    # a keyword outside the signature is refused, as Python refuses it in a signature written out
    with pytest.raises(TypeError, match=r"Written got an unexpected keyword argument 'on_fial'; it takes level, on_"):
        Written(on_fial="warn")  # type: ignore[call-arg]
    assert Written(on_fail="warn").on_fail == "warn"


def test_the_suite_signature_lists_every_component_keyword_with_its_class():
    parameters = inspect.signature(RecipeSuite).parameters
    keys = [component_key(cls) for cls in COMPONENTS]
    assert list(parameters) == [*OWN_ARGUMENTS[:4], *keys, *OWN_ARGUMENTS[4:]]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())  # no **kwargs left
    for cls in COMPONENTS:
        parameter = parameters[component_key(cls)]
        assert parameter.default is True
        assert cls in parameter.annotation.__args__ and bool in parameter.annotation.__args__
        # the dict it takes is typed: the class's arguments, the shared tail (on_fail, inputs, ...) included
        (settings,) = [a for a in parameter.annotation.__args__ if typing.is_typeddict(a)]
        written = [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
        assert list(settings.__annotations__) == written and not settings.__required_keys__
        assert {"inputs", "targets", "forward"} <= set(written)
        assert issubclass(cls, Monitor) or "on_fail" in written
    # the signature is the truth: it accepts what the suite accepts, and refuses what it refuses
    inspect.signature(RecipeSuite).bind(overfit_one_batch={"max_steps": 5}, first_layer_visualizer=None)
    with pytest.raises(TypeError):
        inspect.signature(RecipeSuite).bind(overfit=None)


def _parser():
    """A jsonargparse parser with a ``Callback`` field: how LightningCLI reads ``trainer.callbacks``."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    return parser


def test_jsonargparse_builds_the_suite_from_a_config_naming_component_keywords():
    parser = _parser()
    config = {
        "class_path": "lightning_recipe.RecipeSuite",
        "init_args": {
            "on_fail": "warn",
            "overfit_one_batch": {"max_steps": 50},
            "batch_leakage_probe": {"num_examples": 4},
            "first_layer_visualizer": None,
            "prediction_dynamics_logger": False,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        suite = parser.instantiate(parser.parse_args(["--callback", json.dumps(config)])).callback
    assert isinstance(suite, RecipeSuite)
    assert [type(c).__name__ for c in suite.checks] == ["InitLossCheck", "BatchLeakageProbe", "OverfitOneBatch"]
    assert suite.checks[2].max_steps == 50 and suite.checks[1].settings.num_examples == 4
    assert all(c.on_fail == "warn" for c in suite.checks)
    turned_off = {"FirstLayerVisualizer", "PredictionDynamicsLogger"}
    assert [type(m).__name__ for m in suite.monitors] == [
        c.__name__ for c in MONITORS.values() if c.__name__ not in turned_off
    ]


def test_jsonargparse_refuses_a_misspelled_component_keyword_in_a_config():
    parser = _parser()
    config = {"class_path": "lightning_recipe.RecipeSuite", "init_args": {"overfit": {"max_steps": 50}}}
    refused = pytest.importorskip("jsonargparse").ArgumentError
    with pytest.raises(refused, match=r"(?s)lightning_recipe.RecipeSuite.*'overfit(\.max_steps)?' is not accepted"):
        parser.parse_args(["--callback", json.dumps(config)])


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"max_stepz": 50}, r"Unexpected keys: \{'max_stepz'\}"),
        ({"on_fail": "wran"}, r"\"on_fail\":\s+Expected a typing.Literal\['raise', 'warn'\]. Got value: wran"),
        ({"max_steps": "many"}, r"Parser key \"max_steps\":\s+Expected a <class 'int'>. Got value: many"),
    ],
    ids=["unknown_argument", "unknown_choice", "wrong_type"],
)
def test_jsonargparse_refuses_a_components_settings_that_its_class_refuses_naming_the_argument(settings, refusal):
    """A component's dict is typed with its class's arguments: LightningCLI refuses a typo in a config while
    parsing it, naming the argument, instead of building the suite and crashing in a page of union errors."""
    parser = _parser()
    config = {"class_path": "lightning_recipe.RecipeSuite", "init_args": {"overfit_one_batch": settings}}
    refused = pytest.importorskip("jsonargparse").ArgumentError
    with pytest.raises(refused, match=r'(?s)Parser key "overfit_one_batch":.*' + refusal):
        parser.parse_args(["--callback", json.dumps(config)])


def test_checks_are_resolved_by_either_name_in_the_registry_order():
    chosen = resolve_checks(["OverfitOneBatch", "init_loss_check"])
    assert [type(c) for c in chosen] == [CHECKS["init_loss_check"], CHECKS["overfit_one_batch"]]
    assert [type(c) for c in resolve_checks(None)] == list(CHECKS.values())
    with pytest.raises(ValueError, match=r"each check once in `checks`, but InitLossCheck is there twice"):
        resolve_checks(["InitLossCheck", "init_loss_check"])
    with pytest.raises(ValueError, match=r"at least one check, one of \['init_loss_check', "):
        resolve_checks([])


def test_a_misspelled_keyword_is_refused_naming_every_component_and_the_suites_own_arguments():
    keys = [component_key(cls) for cls in COMPONENTS]
    with pytest.raises(ValueError) as refused:
        RecipeSuite(overfit=None)
    assert str(refused.value) == (
        f"Expected the component keywords of RecipeSuite to name checks or monitors, one of {keys}, but got "
        f"'overfit'. Its other arguments are: {', '.join(OWN_ARGUMENTS)}."
    )
