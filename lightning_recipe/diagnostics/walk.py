"""The one walk over nested batches and outputs.

Every part of the package that looks inside a batch, the model's inputs or its outputs goes through
:func:`map_tensors` (rebuild with each tensor replaced) or :func:`tensors_of` (list the tensors), which walk the
same containers in the same order: mappings (dict, OrderedDict, Hugging Face ``BatchEncoding``), namedtuples,
tuples and lists, and dataclasses (frozen ones too; a Hugging Face ``ModelOutput`` is one). Anything else is a
leaf. A container kind the package learns to read is taught here once, and every component reads it.

Example::

    >>> import torch
    >>> batch = {"x": torch.zeros(2, 3), "meta": ("id", torch.ones(2))}
    >>> [tuple(t.shape) for t in tensors_of(batch)]
    [(2, 3), (2,)]
    >>> map_tensors(batch, lambda t: t.shape[0])
    {'x': 2, 'meta': ('id', 2)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["first_tensor", "leaves_of", "map_tensors", "tensors_of"]


def _children(value: Any) -> list[Any] | None:
    """The items of a container, in walking order; ``None`` for a leaf."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value) if f.init]
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (tuple, list)):
        return list(value)
    return None


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` rebuilt with ``fn(t)`` in place of every tensor ``t``, depth first; everything but tensors and
    the containers listed above is kept as it is."""
    if isinstance(value, Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, Mapping):
        items = {key: map_tensors(item, fn) for key, item in value.items()}
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except Exception:  # noqa: BLE001 - a mapping type that cannot be built from a dict
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(item, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def leaves_of(value: Any) -> list[Any]:
    """Everything in ``value`` that is not one of the containers listed above (tensors among them), depth first,
    in the order :func:`map_tensors` visits them."""
    children = _children(value)
    return [leaf for item in children for leaf in leaves_of(item)] if children is not None else [value]


def tensors_of(value: Any) -> list[Tensor]:
    """Every tensor in ``value``, depth first, in the order :func:`map_tensors` visits them."""
    return [leaf for leaf in leaves_of(value) if isinstance(leaf, Tensor)]


def first_tensor(value: Any) -> Tensor | None:
    """The first tensor found in ``value``, depth first."""
    return next(iter(tensors_of(value)), None)
