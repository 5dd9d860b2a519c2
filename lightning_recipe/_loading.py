"""Loading the user's objects named on the command line: ``MODULE:NAME`` to a class or function, JSON to its
keyword arguments, and the result to a model and its data, with a one-line usage error for each way it goes wrong.

Apart from the command (:mod:`lightning_recipe.cli`) because it is about the user's files and signatures, not
about checks: the command turns a :class:`UsageError` from here into exit status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["UsageError", "build_data", "build_model", "import_from_current_folder", "json_object", "load_object"]


class UsageError(Exception):
    """Bad command-line usage: reported as a one-line message with exit status 2."""


def import_from_current_folder() -> None:
    """Make the modules of the current folder importable, as ``python -m`` does. The installed console script
    has its own ``bin`` folder first on ``sys.path`` instead, so without this neither ``MODULE:Model`` nor the
    ``class_path`` entries of a ``--config`` could name the project's own modules."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def json_object(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"expected {option} to be a JSON object like '{{\"width\": 64}}', but got {text!r} ({error})."
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"expected {option} to be a JSON object like '{{\"width\": 64}}', but got {text!r}.")
    return value


def load_object(target: str, option: str) -> Any:
    """``"package.module:Name"`` or ``"path/to/file.py:Name"`` -> the object; usage errors name ``option``."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected {option} as MODULE:NAME (e.g. my_project.models:Classifier), but got {target!r}.")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"expected {option} to name an existing .py file, but {str(path)!r} does not exist.")
        sys.path.insert(0, str(path.resolve().parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        import_from_current_folder()
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                raise UsageError(
                    f"expected {option} to name an importable module, but {module_name!r} was not found "
                    f"(run from the folder that holds it, or set PYTHONPATH)."
                ) from None
            raise  # the module exists and an import inside it failed: the user's traceback says more
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = [
                name
                for name, value in vars(module).items()
                if not name.startswith("_") and callable(value) and getattr(value, "__module__", "") == module.__name__
            ]
            raise UsageError(
                f"expected {option} to name a class or function in {module_name}, but {attr!r} is not there; it "
                f"defines: {', '.join(sorted(defined)) or 'none'}."
            )
        obj = getattr(obj, part)
    return obj


def build_model(target: str, kwargs: dict[str, Any]) -> Any:
    """The LightningModule that ``target`` (a class or factory) makes from ``kwargs``; anything else is bad usage."""
    obj = load_object(target, "the model")
    model = _call(obj, kwargs, "--model-args", target)
    if not isinstance(model, pl.LightningModule):
        raise UsageError(f"expected {target} to be (or make) a LightningModule, but got {type(model).__name__}.")
    return model


def build_data(target: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``fit``'s data arguments from what ``target`` makes: a datamodule, a (train, val) pair, or a training loader."""
    data = _call(load_object(target, "--data"), kwargs, "--data-args", target)
    if isinstance(data, pl.LightningDataModule):
        return {"datamodule": data}
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return {"train_dataloaders": data[0], "val_dataloaders": data[1]}
    if hasattr(data, "__iter__"):
        return {"train_dataloaders": data}
    raise UsageError(
        f"expected --data {target} to be (or make) a LightningDataModule, a DataLoader or a (train, val) pair, "
        f"but got {type(data).__name__}."
    )


def _call(obj: Any, kwargs: dict[str, Any], option: str, target: str) -> Any:
    if not callable(obj) or isinstance(obj, torch.nn.Module):
        if kwargs:
            raise UsageError(f"expected {target} to be a class or function for {option}, but it is an instance.")
        return obj
    try:
        return obj(**kwargs)
    except TypeError as error:
        if _signature_mismatch(obj, kwargs):
            raise UsageError(f"{target} does not take {option} {json.dumps(kwargs)}: {error}.") from None
        raise


def _signature_mismatch(obj: Any, kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError:
        return True
    except ValueError:  # no signature to read
        return False
    return False
