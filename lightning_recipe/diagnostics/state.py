"""Snapshot and restore of everything a check may disturb, so that a run with checks ends bit-identical
to the same run without them.

Covered: parameter and buffer values (in place, so optimizers keep their references), gradients,
``requires_grad`` flags, train/eval mode of every submodule, the plain attributes of the module and of every
submodule (a ``training_step`` that carries an RNN hidden state, counts calls or fills a cache changes them:
:class:`ModuleAttributes`), optimizer and LR-scheduler state, and every random number generator: torch CPU and
accelerator, numpy, Python, and any ``torch.Generator`` the caller names (a sampler's own generator).
"""

from __future__ import annotations

import copy
import functools
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.compiled import eager

__all__ = [
    "ModuleAttributes",
    "RngState",
    "TrainingState",
    "attributes_preserved",
    "eval_mode",
    "evaluating",
    "preserved",
]


@dataclass
class RngState:
    """The state of every global random number generator, plus the given extra generators."""

    torch_cpu: Tensor
    torch_cuda: list[Tensor] | None
    numpy: Any
    python: Any
    generators: list[tuple[torch.Generator, Tensor]]

    @classmethod
    def capture(cls, generators: Iterable[torch.Generator] = ()) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        unique = {id(g): g for g in generators}.values()
        return cls(
            torch_cpu=torch.get_rng_state(),
            torch_cuda=cuda,
            numpy=np.random.get_state(),
            python=random.getstate(),
            generators=[(g, g.get_state()) for g in unique],
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
        for generator, state in self.generators:
            generator.set_state(state)


@dataclass
class Modes:
    """The train/eval mode of a module and of every submodule, restorable. Put back per module: ``.train()``
    would recurse into the children and undo a submodule the user keeps in eval (a frozen BatchNorm)."""

    flags: list[tuple[nn.Module, bool]]

    @classmethod
    def capture(cls, module: nn.Module) -> Modes:
        return cls([(m, m.training) for m in module.modules()])

    def restore(self) -> None:
        for submodule, training in self.flags:
            submodule.training = training


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside (BatchNorm per example, dropout off); every submodule's own mode put back after."""
    modes = Modes.capture(module)
    try:
        module.eval()
        yield
    finally:
        modes.restore()


# -- plain attributes ------------------------------------------------------------------------------------------
#: Names Lightning or torch set on a module and own; never snapshotted or restored. The rest of torch's and
#: Lightning's bookkeeping is found by constructing a bare module (see :func:`_owned_names`).
_OWNED_ALWAYS = frozenset(
    {
        "training",  # train/eval mode: restored per module by TrainingState; a check switches it on purpose
        "_compiled_call_impl",  # `module.compile()`: the compiled forward, torch's
        "log",
        "log_dict",  # shadowed while a check silences `self.log` (callbacks/_context.silenced_logging)
        "manual_backward",  # shadowed while a check runs a manual step (callbacks/_context.stopped_at_first_update)
        "_trainer",
        "_fabric",
        "_fabric_optimizers",
        "_device_mesh",
        "_current_fx_name",
        "_metric_attributes",
        "_param_requires_grad_state",
        "_compiler_ctx",
        "_hparams",
        "_hparams_initial",
        "_hparams_name",
    }
)
_CONTAINERS = (list, dict, set, deque)


@functools.cache
def _owned_names(kind: str) -> frozenset[str]:
    """What a bare ``nn.Module`` (``kind="torch"``) or ``LightningModule`` (``kind="lightning"``) has in its
    ``__dict__`` right after construction: parameter/buffer/submodule registries, hook dicts, Lightning's
    trainer links. Measured, not listed, so a new torch or Lightning version's bookkeeping stays excluded."""
    names = set(nn.Module().__dict__)
    if kind == "lightning":
        names |= set(_lightning_module_type()().__dict__)
    return frozenset(names | _OWNED_ALWAYS)


def _owned_by(module: nn.Module) -> frozenset[str]:
    return _owned_names("lightning" if isinstance(module, _lightning_module_type()) else "torch")


def _plain_names(module: nn.Module, names: AbstractSet[str]) -> list[str]:
    """Of ``names`` (keys of ``module.__dict__``), those that are the user's plain attributes."""
    return [k for k in names - _owned_by(module) if not k.startswith(("_torchdynamo", "_dynamo"))]


@functools.cache
def _lightning_module_type() -> type:
    from lightning.pytorch import LightningModule  # imported late: the diagnostics need no Lightning

    return LightningModule


def _is_compile_wrapper(module: nn.Module) -> bool:
    """``torch.compile(m)`` returns an ``OptimizedModule`` whose state is all in ``m`` (``_orig_mod``, which
    ``modules()`` still visits); its own attributes are dynamo's."""
    return type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules


@dataclass
class _TensorValue:
    tensor: Tensor
    version: int | None  # in-place changes bump it; None where torch keeps none (inference tensors)
    saved: Tensor

    def restore(self) -> None:
        if self.version is not None and _version(self.tensor) == self.version:
            return  # untouched: no write, so a graph that saved it for backward stays valid
        with torch.no_grad():
            if self.tensor.shape == self.saved.shape and self.tensor.dtype == self.saved.dtype:
                self.tensor.copy_(self.saved)
            else:  # resized or re-typed in place (resize_, set_)
                self.tensor.data = self.saved.clone()


def _storage(tensor: Tensor) -> int | None:
    """Where the tensor's data lives (shared by views); ``None`` for tensors without one storage (sparse)."""
    try:
        return int(tensor.untyped_storage().data_ptr()) or None  # 0: meta or empty, shared by all of those
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _storages(tensors: Iterable[Tensor]) -> set[int]:
    return {s for t in tensors if (s := _storage(t)) is not None}


def _version(tensor: Tensor) -> int | None:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference-mode tensors track no version
        return None


@dataclass
class ModuleAttributes:
    """The plain attributes of a module and of every submodule, restorable.

    What is restored: every ``__dict__`` entry except the ones torch and Lightning own (parameter, buffer and
    submodule registries, hook dicts, ``training``, the trainer link, ``module.compile()``'s compiled call,
    a ``torch.compile`` wrapper's own fields). A rebound attribute gets its old object back (identity);
    attributes added since the capture are removed, removed ones come back. Values changed in place are put
    back by value: tensors (cloned at capture, copied back only when their version counter moved), and lists,
    dicts, sets and deques (shallow copies, recursively through nested containers and tuples). Other objects
    (a user class instance, a tokenizer) are restored by identity only: copying them is neither cheap nor
    safe. Parameters and buffers found in a container are left to :class:`TrainingState`.
    """

    entries: list[tuple[nn.Module, dict[str, Any], frozenset[str]]]  # module, its plain attributes, all its keys
    containers: list[tuple[Any, Any]] = field(default_factory=list)
    tensors: list[_TensorValue] = field(default_factory=list)

    @classmethod
    def capture(cls, module: nn.Module) -> ModuleAttributes:
        state = cls(entries=[])
        seen: set[int] = set()
        skip: set[int] | None = None  # parameters and buffers (TrainingState's), listed when first needed
        for submodule in module.modules():
            if _is_compile_wrapper(submodule):
                continue
            live = submodule.__dict__
            plain = {k: live[k] for k in _plain_names(submodule, live.keys())}
            state.entries.append((submodule, plain, frozenset(live)))
            for value in plain.values():
                if isinstance(value, (Tensor, tuple, *_CONTAINERS)):
                    if skip is None:
                        skip = _storages(_state_tensors(module))
                    state._walk(value, seen, skip)
        return state

    def _walk(self, value: Any, seen: set[int], skip: set[int]) -> None:
        """Record the value of every tensor and container reachable from ``value`` through containers."""
        stack = [value]
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            if isinstance(item, Tensor):
                seen.add(id(item))
                # a parameter or buffer, or a view of one (`self.row = self.emb.weight[0]`): TrainingState puts
                # those back; writing a view back between a check's steps would undo its training
                if not isinstance(item, nn.Parameter) and _storage(item) not in skip:
                    self.tensors.append(_TensorValue(item, _version(item), item.detach().clone()))
            elif isinstance(item, _CONTAINERS):
                seen.add(id(item))
                saved = list(item.items()) if isinstance(item, dict) else list(item)
                self.containers.append((item, saved))
                stack.extend(v for pair in saved for v in (pair if isinstance(item, dict) else (pair,)))
            elif isinstance(item, tuple):  # immutable, but may hold mutable things (an LSTM's (h, c))
                seen.add(id(item))
                stack.extend(item)

    def restore(self) -> None:
        """Cheap when nothing changed (a check calls it before every ``training_step``)."""
        for submodule, plain, keys in self.entries:
            live = submodule.__dict__
            added = live.keys() - keys
            if added:
                for name in _plain_names(submodule, added):
                    del live[name]
            for name, value in plain.items():
                if live.get(name, _MISSING) is not value:
                    live[name] = value
        for container, saved in self.containers:
            _refill(container, saved)
        for tensor in self.tensors:
            tensor.restore()


_MISSING = object()


def _refill(container: Any, saved: list[Any]) -> None:
    """Put ``saved`` back into ``container`` in place, only when something in it changed."""
    if isinstance(container, dict):
        if len(container) != len(saved) or any(container.get(k, _MISSING) is not v for k, v in saved):
            container.clear()
            container.update(saved)
        return
    if isinstance(container, set):
        if len(container) != len(saved) or any(v not in container for v in saved):
            container.clear()
            container.update(saved)
        return
    if len(container) != len(saved) or any(a is not b for a, b in zip(container, saved, strict=False)):
        container.clear()
        container.extend(saved)


@contextmanager
def attributes_preserved(module: nn.Module) -> Iterator[ModuleAttributes]:
    """Run the body, then put the plain attributes of ``module`` and its submodules back (see
    :class:`ModuleAttributes`), whether the body returned or raised. For monitors that run the model's
    forward during training: a forward that caches or counts must not change what training sees."""
    state = ModuleAttributes.capture(module)
    try:
        yield state
    finally:
        state.restore()


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside, for a forward pass of the package's own during training; the mode of
    every submodule, the module's plain attributes and every RNG put back after, so a stochastic forward does not
    shift the run and a forward that caches or counts does not change what training sees. A compiled model runs
    eagerly (see :mod:`lightning_recipe.diagnostics.compiled`)."""
    rng = RngState.capture()
    try:
        with eval_mode(module), torch.no_grad(), attributes_preserved(module), eager():
            yield
    finally:
        rng.restore()


@dataclass
class TrainingState:
    """A deep copy of a model's and its optimizers' state, restorable in place."""

    module: nn.Module
    tensors: list[tuple[Tensor, Tensor]]
    buffer_owners: list[tuple[nn.Module, str, Tensor]]
    grads: list[tuple[nn.Parameter, Tensor | None]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    modes: Modes
    attributes: ModuleAttributes
    optimizers: list[tuple[Any, dict[str, Any]]]
    schedulers: list[tuple[Any, dict[str, Any]]]
    rng: RngState

    @classmethod
    def capture(
        cls,
        module: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        schedulers: Sequence[Any] = (),
        generators: Iterable[torch.Generator] = (),
    ) -> TrainingState:
        with torch.no_grad():
            tensors = [(t, t.detach().clone()) for t in _state_tensors(module)]
            params = list(module.parameters())
            owners = [(m, n, b) for m in module.modules() for n, b in m.named_buffers(recurse=False)]
            grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        return cls(
            module=module,
            tensors=tensors,
            buffer_owners=owners,
            grads=grads,
            requires_grad=[(p, p.requires_grad) for p in params],
            modes=Modes.capture(module),
            attributes=ModuleAttributes.capture(module),
            optimizers=[(o, copy.deepcopy(o.state_dict())) for o in optimizers],
            schedulers=[(s, copy.deepcopy(s.state_dict())) for s in schedulers],
            rng=RngState.capture(generators),
        )

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self.tensors:
                live.copy_(saved)
            for owner, name, buffer in self.buffer_owners:
                if getattr(owner, name, None) is not buffer:  # user code rebound the buffer
                    setattr(owner, name, buffer)
            for param, grad in self.grads:
                param.grad = None if grad is None else grad.clone()
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        self.modes.restore()
        self.attributes.restore()
        for optimizer, state in self.optimizers:
            optimizer.load_state_dict(copy.deepcopy(state))
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(copy.deepcopy(state))
        self.rng.restore()


@contextmanager
def preserved(
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
    generators: Iterable[torch.Generator] = (),
) -> Iterator[TrainingState]:
    """Run the body, then put ``module``, ``optimizers``, ``schedulers`` and all RNGs back as they were,
    whether the body returned or raised."""
    state = TrainingState.capture(module, optimizers, schedulers, generators)
    try:
        yield state
    finally:
        state.restore()


def _state_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer, each once (shared weights appear once)."""
    seen: dict[int, Tensor] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())
