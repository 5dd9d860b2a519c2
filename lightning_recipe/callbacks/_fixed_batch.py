"""The fixed batch PredictionDynamicsLogger evaluates: where it is read from, how batches join into it, and what
of it a checkpoint can keep.

The batch is fixed for the whole run, so it must be cut and joined without breaking examples apart (a graph whose
examples are nodes is taken whole).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_recipe.diagnostics.sparse import graph_adjacency, is_sparse, slice_batch
from lightning_recipe.diagnostics.walk import map_tensors, tensors_of

__all__ = ["NOT_PLAIN", "first_examples", "plain_on_host", "val_loader"]


def val_loader(trainer: pl.Trainer) -> DataLoader | None:
    """The trainer's validation loader (the first, when there are several), or ``None``."""
    loaders: Any = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = next((item for item in loaders if isinstance(item, DataLoader)), None)
    return loaders if isinstance(loaders, DataLoader) else None


def first_examples(batches: list[Any], sizes: list[int], n: int, module: nn.Module | None = None) -> Any:
    """The first ``n`` examples of ``batches`` (holding ``sizes`` examples each): joined and cut along dim 0
    where every tensor has the batch size there; otherwise (a time-major ``(T, N, F)`` batch) the first batch as
    it is."""
    if not all(_uniform(b, size, module) for b, size in zip(batches, sizes, strict=True)):
        return batches[0]
    batch = batches[0] if len(batches) == 1 else _concat(batches)
    total = sum(sizes)
    if total > n:
        batch = slice_batch(batch, slice(0, n), total)
    return batch


NOT_PLAIN = object()


def plain_on_host(value: Any) -> Any:
    """``value`` with its tensors on the host, when it is plain data (tensors, numbers, strings, lists,
    tuples and dicts with string keys): what ``torch.load(weights_only=True)`` reads back. ``NOT_PLAIN`` when
    it holds anything else (a dataclass, a namedtuple, a sparse tensor, a graph object)."""
    if isinstance(value, Tensor):
        return value.detach().cpu() if value.layout == torch.strided else NOT_PLAIN
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) in (list, tuple):
        items = [plain_on_host(item) for item in value]
        return NOT_PLAIN if any(item is NOT_PLAIN for item in items) else type(value)(items)
    if type(value) is dict and all(isinstance(key, str) for key in value):
        plain = {key: plain_on_host(item) for key, item in value.items()}
        return NOT_PLAIN if any(item is NOT_PLAIN for item in plain.values()) else plain
    return NOT_PLAIN


def _uniform(batch: Any, n: int, module: nn.Module | None = None) -> bool:
    """Whether every tensor in ``batch`` has ``n`` on dim 0 (so it can be cut and joined there), and the
    batch is not one graph whose ``n`` examples are nodes (cutting them would cut edges)."""
    return _rows(batch, n) and graph_adjacency(batch, n, module) is None


def _rows(batch: Any, n: int) -> bool:
    return all(t.ndim > 0 and t.shape[0] == n for t in tensors_of(batch))


def _concat(batches: list[Any]) -> Any:
    """The batches joined along dim 0, tensor by tensor, in the first batch's structure."""
    joined = iter([_cat(list(column)) for column in zip(*map(tensors_of, batches), strict=True)])
    return map_tensors(batches[0], lambda _: next(joined))


def _cat(tensors: list[Tensor]) -> Tensor:
    if any(is_sparse(t) for t in tensors):  # torch.cat joins sparse COO tensors only with each other
        return torch.cat([t.to_sparse_coo() if is_sparse(t) else t.to_sparse() for t in tensors])
    return torch.cat(tensors)
