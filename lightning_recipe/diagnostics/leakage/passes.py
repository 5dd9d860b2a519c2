"""One forward pass, many backward passes: what the probe of examples and the probe of graph nodes share.

:class:`Runner` holds the probe leaves and the output (examples on dim 0) of one forward pass and runs the
backward passes on them; :func:`batch_dependencies` covers every pair of ``B`` examples in
``2 * ceil(log2 B)`` passes and names the exact pairs with a few more; :func:`locate_mixing` searches the
recorded layer outputs for the first that mixes. The helpers above them trace that forward pass: leaves in
place of the inputs, hooks removed whatever happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.leakage.evidence import BatchDependencies, LeakageNotApplicable, Mixing, NoGradient
from lightning_recipe.diagnostics.sparse import is_sparse

__all__ = [
    "Forward",
    "Probe",
    "Recorded",
    "Runner",
    "batch_dependencies",
    "describe_module",
    "dim_views",
    "hooked_forward",
    "locate_mixing",
    "probe_leaf",
    "reads_time_first",
    "record",
]

Forward = Callable[[nn.Module, Any], Tensor]


@dataclass
class Probe:
    """A tensor gradients are read at (an input, or an embedding's output), named for the report."""

    name: str
    tensor: Tensor  # a leaf that requires grad
    batch_dim: int
    time_dim: int | None = None  # in the batch-first layout (after moving the batch dim to 0)


class Recorded(NamedTuple):
    """A layer's output kept by a forward hook, in completion order, with the dimension of its examples."""

    name: str
    kind: str  # :func:`describe_module`
    tensor: Tensor
    dim: int
    time_first: bool  # :func:`reads_time_first`


# -- tracing the forward pass -------------------------------------------------------------------------


def probe_leaf(t: Tensor) -> tuple[Tensor, Tensor]:
    """A leaf that requires grad in place of input ``t``, and what the model is fed instead of ``t``: a
    clone of the leaf (not a leaf, so in-place ops in the model stay legal), or for a sparse ``t`` a
    sparse tensor of the same layout made from a dense leaf (sparse tensors carry no per-row gradient to
    read, and the model may need them sparse: ``torch.sparse.mm``)."""
    if not is_sparse(t):
        probe = t.detach().clone().requires_grad_(True)
        return probe, probe.clone()
    probe = t.detach().to_dense().requires_grad_(True)
    fed = probe.to_sparse() if t.layout == torch.sparse_coo else probe.to_sparse(layout=t.layout)
    return probe, fed


def hooked_forward(module: nn.Module, forward: Forward, inputs: Any, handles: list[Any]) -> Tensor:
    """``forward(module, inputs)`` with the hooks ``handles`` on, removed afterwards whatever happens; the output
    must be a tensor."""
    try:
        raw = forward(module, inputs)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(raw, Tensor):
        raise LeakageNotApplicable(
            f"Expected the forward to return a tensor, but got {type(raw).__name__}. Pass "
            "`forward=lambda module, x: ...` returning the prediction tensor."
        )
    return raw


def reads_time_first(m: nn.Module) -> bool:
    """Whether ``m`` reads dim 0 as time and dim 1 as the batch (nn.LSTM, nn.MultiheadAttention, ... by default)."""
    return getattr(m, "batch_first", None) is False


def describe_module(m: nn.Module) -> str:
    text = type(m).__name__
    if reads_time_first(m):
        text += "(batch_first=False)"
    return text


def record(name: str, m: nn.Module, t: Tensor, dim: int) -> Recorded:
    """A layer's output as :func:`locate_mixing` searches it."""
    return Recorded(name, describe_module(m), t, dim, reads_time_first(m))


def dim_views(out: Tensor, b: int, in_dim: int, output_batch_dim: int | None) -> list[tuple[str, Tensor]]:
    """The output with the examples on dim 0, for each dim of size ``b`` (``in_dim`` first, then in order), or
    for ``output_batch_dim`` alone when given."""
    if output_batch_dim is not None:
        if output_batch_dim >= out.ndim or out.shape[output_batch_dim] != b:
            raise LeakageNotApplicable(
                f"`output_batch_dim={output_batch_dim}` does not index a dimension of size {b} (the probed "
                f"examples) in the output of shape {tuple(out.shape)}."
            )
        return [(f"dim {output_batch_dim}", out.movedim(output_batch_dim, 0))]
    dims = [d for d in range(out.ndim) if out.shape[d] == b]
    dims.sort(key=lambda d: (d != in_dim, d))
    return [(f"dim {d}", out.movedim(d, 0)) for d in dims]


# -- the backward passes ------------------------------------------------------------------------------


def _max_per_example(g: Tensor, dim: int) -> Tensor:
    """max |g| per example along ``dim``: shape ``(B,)``."""
    return g.detach().movedim(dim, 0).abs().reshape(g.shape[dim], -1).amax(1).float()


class Runner:
    """One forward pass with probe leaves and recorded module outputs; many backward passes."""

    def __init__(self, leaves: list[Probe], out: Tensor, tolerance: float, seed: int) -> None:
        self.leaves = leaves
        self.out = out  # batch on dim 0
        self.tolerance = tolerance
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.passes: dict[str, int] = {}
        self._weights: dict[tuple[int, ...], Tensor] = {}

    def weights(self, like: Tensor) -> Tensor:
        key = (id(like), *like.shape)
        if key not in self._weights:
            w = torch.randn(like.shape, generator=self.gen, dtype=torch.float32)
            self._weights[key] = w.to(device=like.device, dtype=like.dtype)
        return self._weights[key]

    def grads(self, source: Tensor, purpose: str) -> list[Tensor | None]:
        self.passes[purpose] = self.passes.get(purpose, 0) + 1
        if not source.requires_grad:
            return [None] * len(self.leaves)
        return list(torch.autograd.grad(source, [p.tensor for p in self.leaves], retain_graph=True, allow_unused=True))

    def example_gradient(self, mask: Tensor, purpose: str, target: Tensor | None = None, target_dim: int = 0) -> Tensor:
        """Relative gradient per input example ``(B,)`` (max over probed tensors of ``max|g_j| / max|g|``)
        when the source is the outputs of the examples in ``mask`` (random weights)."""
        t = self.out if target is None else target
        w = self.weights(t)
        shape = [1] * t.ndim
        shape[target_dim] = -1
        source = (t * w * mask.to(t.dtype).reshape(shape)).sum()
        rel = torch.zeros(len(mask), device=mask.device)
        for probe, g in zip(self.leaves, self.grads(source, purpose), strict=True):
            if g is None:
                continue
            per = _max_per_example(g, probe.batch_dim).to(rel.device)
            scale = per.max()
            if scale > 0 and torch.isfinite(scale):
                rel = torch.maximum(rel, per / scale)
        return rel

    def leaks(self, rel: Tensor) -> Tensor:
        return rel > self.tolerance


def batch_dependencies(runner: Runner, b: int, max_exact_rows: int) -> BatchDependencies:
    """Every pair of the ``b`` examples in ``2 * ceil(log2 b)`` grouped passes, then one targeted pass per
    suspect output example (at most ``max_exact_rows``) to name the exact pairs."""
    idx = torch.arange(b)
    candidates = ~torch.eye(b, dtype=torch.bool)
    any_gradient = False
    for bit in range(max(1, math.ceil(math.log2(b)))):
        for value in (1, 0):
            source = ((idx >> bit) & 1) == value
            rel = runner.example_gradient(source.to(runner.out.device), "batch").cpu()
            any_gradient = any_gradient or bool((rel > 0).any())
            leaked = runner.leaks(rel) & ~source
            # i a source, j not: the pair (i, j) stays a candidate only if j got gradient here
            candidates[source[:, None] & ~source[None, :] & ~leaked[None, :]] = False
    if not any_gradient:
        raise NoGradient(
            "no gradient reaches the probed inputs from the outputs (detached or constant outputs), so "
            "dependencies cannot be charted."
        )
    dependency = candidates.float()
    suspects = [i for i in range(b) if candidates[i].any()]
    exact = len(suspects) <= max_exact_rows
    for i in suspects[:max_exact_rows]:
        rel = runner.example_gradient((idx == i).to(runner.out.device), "exact pairs").cpu()
        row = runner.leaks(rel)
        row[i] = False
        candidates[i] = row
        dependency[i] = row.float()
    pairs = [(i, j) for i in range(b) for j in range(b) if candidates[i, j]]
    return BatchDependencies(pairs=pairs, exact=exact, dependency=dependency)


def locate_mixing(runner: Runner, recorded: list[Recorded], i: int, b: int) -> Mixing:
    """Binary search, in execution order, for the first recorded module output whose row ``i`` depends on
    another example's input. Assumes mixing, once started, persists downstream (true of chains; in a
    branching graph the result is still a boundary between a clean and a mixing layer)."""
    if not recorded:
        return Mixing(note="no layer output with a batch dimension was recorded")
    cache: dict[int, bool] = {}

    def mixes(k: int) -> bool:
        if k not in cache:
            layer = recorded[k]
            try:
                mask = (torch.arange(b) == i).to(layer.tensor.device)
                rel = runner.example_gradient(mask, "locate layer", target=layer.tensor, target_dim=layer.dim).cpu()
            except RuntimeError:  # e.g. the tensor was later modified in place
                cache[k] = False
                return False
            rel[i] = 0
            cache[k] = bool(runner.leaks(rel).any())
        return cache[k]

    lo, hi = 0, len(recorded)  # first index in [lo, hi) that mixes; hi: none of them
    while lo < hi:
        mid = (lo + hi) // 2
        if mixes(mid):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(recorded):
        clean = (recorded[lo - 1].name, recorded[lo - 1].kind) if lo > 0 else None
        return Mixing(last_clean=clean, note="examples mix after the last layer, in the code of `forward`")
    mixing = recorded[lo]
    clean = (recorded[lo - 1].name, recorded[lo - 1].kind) if lo > 0 else None
    return Mixing(first=(mixing.name, mixing.kind), last_clean=clean, first_time_first=mixing.time_first)
