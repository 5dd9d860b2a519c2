"""Models compiled with ``torch.compile``: the package's own forward passes run them eagerly.

A compiled model (``torch.compile(submodule)``, ``module.compile()``, ``trainer.fit(torch.compile(model))``)
computes the same function as the plain one, so every diagnostic can run it uncompiled. It must: a forward
pass of ours that went through dynamo would

- compile graphs training never asks for (eval mode, no gradients, another batch size, our forward hooks),
  and a guard that fails later makes dynamo *recompile* training's own graph, marking sizes dynamic and
  picking other kernels: the run stops being bit-identical to the run without the package;
- trace our hooks (the leakage probe keeps layer outputs in a Python list and swaps an embedding's output
  for a leaf tensor), which dynamo refuses with a long internal error;
- cost a compilation (seconds to minutes) for a handful of forward passes.

:func:`eager` switches dynamo off for the block with ``torch.compiler.set_stance("force_eager")``: compiled
code runs as the Python it wraps, hooks on inner modules fire, and dynamo's caches are not touched, so
training compiles exactly what it would have compiled without the package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eager"]


@contextmanager
def eager() -> Iterator[None]:
    """Run every ``torch.compile``'d module and function eagerly inside the block (dynamo's caches
    untouched). Before torch 2.6 (no ``torch.compiler.set_stance``) dynamo's ``disable`` switch does it for
    code not compiled yet (a graph compiled earlier for the very same call may still run: same function).
    Nothing changes inside a region being compiled, where the stance cannot be set."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3 has it; be lenient
    if is_compiling is not None and is_compiling():
        yield
        return
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        with set_stance("force_eager"):
            yield
        return
    from torch._dynamo import config  # loaded only for torch versions without set_stance

    with config.patch(disable=True):
        yield
