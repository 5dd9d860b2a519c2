"""Snapshot and restore of everything a check may disturb, so that a run with checks ends bit-identical
to the same run without them.

Covered: parameter and buffer values (in place, so optimizers keep their references), gradients,
``requires_grad`` flags, train/eval mode of every submodule, optimizer and LR-scheduler state, and every
random number generator: torch CPU and accelerator, numpy, Python, and any ``torch.Generator`` the caller
names (a sampler's own generator).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RngState", "TrainingState", "preserved"]


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
class TrainingState:
    """A deep copy of a model's and its optimizers' state, restorable in place."""

    module: nn.Module
    tensors: list[tuple[Tensor, Tensor]]
    buffer_owners: list[tuple[nn.Module, str, Tensor]]
    grads: list[tuple[nn.Parameter, Tensor | None]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    modes: list[tuple[nn.Module, bool]]
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
            modes=[(m, m.training) for m in module.modules()],
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
        for submodule, training in self.modes:
            submodule.training = training  # per module: .train() would recurse into children
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
