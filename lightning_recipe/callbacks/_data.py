"""What the package reads from the user's data, and when: the one reader of every component that needs batches
(the three checks, FirstLayerVisualizer's trace, PredictionDynamicsLogger's fixed batch).

Components read before the first optimizer step, in one of two ways, and training sees exactly the data, in the
order, it sees without them:

- **A fresh pass**, at ``on_train_start``: a new iterator over the loader, read only as far as needed, with the
  loader's and the global random number generators put back by the caller. Training's own iterator is never
  touched. Taken only where a second pass provably leaves the pipeline as it was: a map-style dataset through a
  plain ``DataLoader`` with torch's own samplers, whose only state is the random number generator.
- **The first batch training fetches**, copied at ``on_train_batch_start`` before its optimizer step, everywhere
  else (:func:`fresh_pass_refusal` says why): an ``IterableDataset`` (a stream may hand each record out once: a
  queue, a socket, a sharded reader), a sampler of another type (it may count its passes: a curriculum stage, an
  epoch counter), a ``DataLoader`` subclass (torchdata's ``StatefulDataLoader`` keeps its place in the data). A
  component that read only that batch says so in its result.

A sanity run trains nothing afterwards, so it always takes a fresh pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_recipe.callbacks._errors import CheckSkipped, UserCodeError
from lightning_recipe.diagnostics.walk import leaves_of, map_tensors

__all__ = [
    "first_batch_note",
    "fresh_batches",
    "fresh_containers",
    "fresh_pass_refusal",
    "loader_generators",
    "own_copy",
    "peek_batches",
    "prepare_batch",
    "single_loader",
    "without_persistent_workers",
]

#: values a batch may share with its copy: nothing can change them in place
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)

#: samplers whose ``__iter__`` depends on nothing but their arguments and a random number generator (restored by
#: the caller): a second pass leaves them as they were. Exact types: a subclass may add state.
_STATELESS_SAMPLERS = (
    SequentialSampler,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    DistributedSampler,
    UnrepeatedDistributedSampler,
)


def single_loader(trainer: pl.Trainer) -> DataLoader:
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise CheckSkipped(
            f"the check reads batches from one training DataLoader, but the Trainer has {type(loader).__name__}. "
            "Run the check on a model with a single `train_dataloader`."
        )
    return loader


def fresh_pass_refusal(loader: Any) -> str | None:
    """Why a second pass over ``loader`` could change what training reads, in words for a result; ``None`` when it
    cannot (a map-style dataset, a plain ``DataLoader``, torch's own samplers)."""
    if not isinstance(loader, DataLoader):
        return f"the training loader is a {type(loader).__name__}, not one DataLoader"
    if type(loader) is not DataLoader:
        return (
            f"the loader is a {type(loader).__name__}, which may keep its place in the data (torchdata's "
            "StatefulDataLoader does): a second pass would move it"
        )
    if isinstance(loader.dataset, IterableDataset):
        return (
            f"the dataset is an IterableDataset ({type(loader.dataset).__name__}): a stream may hand each record "
            "out once, so a second pass could take records training then never sees"
        )
    for sampler in _samplers(loader):
        if type(sampler) not in _STATELESS_SAMPLERS:
            return (
                f"the sampler is a {type(sampler).__name__}, which may keep state across passes (a curriculum stage, "
                "an epoch counter): a second pass could change the order training sees"
            )
    return None


def _samplers(loader: DataLoader) -> list[Any]:
    """The samplers iterating ``loader`` runs: the batch sampler's own sampler, or the sampler; those Lightning's
    ``DistributedSamplerWrapper`` wraps counted too."""
    found: list[Any] = []
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        found.append(batch_sampler)
    sampler = batch_sampler.sampler if type(batch_sampler) is BatchSampler else loader.sampler
    if isinstance(sampler, DistributedSamplerWrapper):
        # the user's sampler, iterated on every pass. Lightning's wrapper always holds a _DatasetSamplerWrapper as
        # its dataset; torch's DistributedSampler types the attribute as a plain Dataset
        found.append(sampler.dataset._sampler)  # type: ignore[attr-defined]
    elif sampler is not None:
        found.append(sampler)
    return found


def fresh_batches(
    trainer: pl.Trainer, loader: DataLoader | None = None, what: str = "training"
) -> Generator[Any, None, None]:
    """A fresh pass over ``loader`` (the training dataloader by default), one prepared batch at a time, read only as
    far as the caller asks (close the generator to end the pass). Errors of the user's dataset, sampler,
    ``collate_fn`` or batch hooks come out as :class:`UserCodeError`."""
    loader = single_loader(trainer) if loader is None else loader
    if loader.persistent_workers and loader.num_workers > 0:
        # iter() on a persistent-worker loader resets the live iterator the fit loop is using
        loader = without_persistent_workers(loader)
    try:
        iterator = iter(loader)
    except Exception as error:  # the user's dataset or sampler
        raise UserCodeError(error, f"reading the {what} dataloader") from error
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # the user's dataset, sampler or collate_fn
                raise UserCodeError(error, f"reading the {what} dataloader") from error
            try:
                prepared = prepare_batch(trainer, batch)
            except Exception as error:  # the user's on_before/after_batch_transfer
                raise UserCodeError(error, f"preparing a {what} batch (`on_before_batch_transfer`)") from error
            yield prepared
    finally:
        del iterator


def peek_batches(
    trainer: pl.Trainer,
    enough: int | Callable[[list[Any]], bool],
    loader: DataLoader | None = None,
    what: str = "training",
) -> list[Any]:
    """The first batches of a fresh pass: ``enough`` of them, or until ``enough(batches)`` holds. The real
    training iterator is not touched; the caller restores the random number generators."""
    done = (lambda batches: len(batches) >= enough) if isinstance(enough, int) else enough
    batches: list[Any] = []
    stream = fresh_batches(trainer, loader, what)
    try:
        for batch in stream:
            batches.append(batch)
            if done(batches):
                break
    finally:
        stream.close()
    if not batches:
        raise CheckSkipped(f"the {what} dataloader yielded no batch.")
    return batches


def prepare_batch(trainer: pl.Trainer, batch: Any) -> Any:
    """A batch from a dataloader made into what ``training_step`` receives, by the steps Lightning's fit loop
    takes: the precision plugin's input conversion (floating tensors to bf16/fp16/fp64 under
    ``precision="bf16-true"`` and the like), ``on_before_batch_transfer`` (the datamodule's when it defines
    one, else the module's), and the move to the device with ``transfer_batch_to_device`` and
    ``on_after_batch_transfer``."""
    batch = trainer.precision_plugin.convert_input(batch)
    datamodule = trainer.datamodule  # type: ignore[attr-defined]  # Lightning's Trainer sets it without declaring it
    if datamodule is not None and is_overridden("on_before_batch_transfer", datamodule):
        batch = datamodule.on_before_batch_transfer(batch, 0)
    elif trainer.lightning_module is not None:
        batch = trainer.lightning_module.on_before_batch_transfer(batch, 0)
    return trainer.strategy.batch_to_device(batch)


def own_copy(batch: Any) -> Any:
    """A copy of a batch training fetched, for a component to read: the user's ``training_step`` may change its
    batch in place (``labels = batch.pop("labels")``, ``x.mul_(...)``), and training must get it untouched. A batch
    ``copy.deepcopy`` refuses is copied tensor by tensor where it holds nothing else but plain values and the
    containers :mod:`~lightning_recipe.diagnostics.walk` knows; anything more would be shared with training's own
    batch, and then :class:`CheckSkipped` says the component cannot read it."""
    try:
        return copy.deepcopy(batch)
    except Exception as error:  # noqa: BLE001 - an object deepcopy cannot take (a lock, a file handle)
        shared = [leaf for leaf in leaves_of(batch) if not isinstance(leaf, (Tensor, *_IMMUTABLE))]
        if shared:
            kind = type(shared[0]).__name__
            raise CheckSkipped(
                f"the batch training fetched cannot be copied: `copy.deepcopy` raised {type(error).__name__}: "
                f"{error}, and the batch {'is' if shared[0] is batch else 'holds'} a {kind}, which only deepcopy "
                "can copy. lightning_recipe never runs your code on training's own batch (a `training_step` that "
                f"changes its batch would change it under training). Give {kind} a `__deepcopy__` method, or make "
                "the batch tensors in dicts, lists, tuples or dataclasses."
            ) from None
    return map_tensors(batch, lambda t: t.clone())


def fresh_containers(batch: Any) -> Any:
    """``batch`` with its containers (dicts, lists, tuples, dataclasses) rebuilt around the same tensors, for one
    call of the user's ``training_step``: one that pops a key from its batch (``labels = batch.pop("labels")``)
    pops it from its own containers, and the next call of a check that repeats the batch finds it again."""
    return apply_to_collection(batch, Tensor, lambda t: t)


def first_batch_note(reason: str, asked: int = 1) -> str:
    """The sentence a component adds to what it reports when it read only the first batch training fetched."""
    more = f" (of the {asked} it reads from a fresh pass)" if asked > 1 else ""
    return f"Read from the first batch training fetched{more}, not a fresh pass: {reason}."


def loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that iterating ``loader`` may advance (a sampler's own)."""
    owners = [loader, loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)]
    return [g for o in owners if isinstance(g := getattr(o, "generator", None), torch.Generator)]


def without_persistent_workers(loader: DataLoader) -> DataLoader:
    common: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
    )
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(loader.dataset, sampler=loader.sampler, batch_size=None, **common)
