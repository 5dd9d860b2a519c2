"""Sparse tensors and graph batches: reading and cutting a user's batch without densifying it.

A sparse tensor (``torch.sparse_coo_tensor``, CSR, ...) has no strides: basic indexing, ``narrow``, ``view``,
comparisons and most reductions raise NotImplementedError on it. Everything the package does to a user's batch
goes through the helpers here, which read and cut sparse tensors as they are. Graph batches are the usual place
to meet them: the ``n`` examples are the nodes of one graph, and the adjacency (or an edge list) ties them
together, so cutting examples out of such a batch cuts edges too (:func:`slice_batch` takes the induced subgraph,
:func:`graph_adjacency` finds the graph, :func:`examples_in_loss` the nodes the loss reads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.walk import first_tensor, map_tensors, tensors_of

__all__ = [
    "all_finite",
    "examples_in_loss",
    "graph_adjacency",
    "held_tensors",
    "is_edge_list",
    "is_sparse",
    "slice_batch",
    "take_along",
    "value_stats",
]


def is_sparse(t: Tensor) -> bool:
    """Whether ``t`` has a sparse layout (COO, CSR, CSC, BSR, BSC)."""
    return t.layout != torch.strided


def take_along(t: Tensor, index: Tensor | slice, dim: int) -> Tensor:
    """``t`` indexed by ``index`` along ``dim``, for strided and sparse tensors alike (sparse ones keep
    their layout)."""
    if not is_sparse(t):
        return t[(slice(None),) * dim + (index,)]
    positions = torch.arange(t.shape[dim])[index] if isinstance(index, slice) else index.reshape(-1)
    positions = positions.to(device=t.device, dtype=torch.long)
    if t.layout == torch.sparse_coo:
        return t.index_select(dim, positions)
    return t.to_sparse_coo().index_select(dim, positions).to_sparse(layout=t.layout)


def slice_batch(value: Any, index: Tensor | slice, batch_size: int, dims: Sequence[int] = (0,)) -> Any:
    """Take ``index`` along the batch dimension of every tensor in ``value``: the first of ``dims`` whose size is
    ``batch_size`` (``(0, 1)``: the batch is on dim 0, or on dim 1 where a tensor is time-major); a tensor with
    none is left whole.

    Sparse tensors are cut with ``index_select`` (they have no strided views). A sparse ``(N, N)`` adjacency
    of a graph batch is cut on both dimensions, so the result is the subgraph the kept nodes induce rather
    than a ``(k, N)`` matrix no graph layer can take."""

    def cut(t: Tensor) -> Tensor:
        dim = next((d for d in dims if t.ndim > d and t.shape[d] == batch_size), None)
        if dim is None:
            return t
        for d in (0, 1) if dim == 0 and is_sparse(t) and _square_adjacency(t, batch_size) else (dim,):
            t = take_along(t, index, d)
        return t

    return map_tensors(value, cut)


def value_stats(t: Tensor) -> dict[str, Any] | None:
    """Mean, std, largest magnitude and finiteness of every element of ``t`` (the implicit zeros of a
    sparse tensor included), in float64; ``None`` for a non-float or empty tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    t = t.detach()
    if is_sparse(t):
        stored = t.to_sparse_coo().coalesce().values().double().reshape(-1)
        zeros = t.numel() - stored.numel()  # hybrid tensors store dense blocks: numel counts them
    else:
        stored, zeros = t.double().reshape(-1), 0
    finite = stored[torch.isfinite(stored)]
    count = finite.numel() + zeros
    if count < 2:
        return {"finite": False}
    total = finite.sum()
    mean = total / count
    var = ((finite - mean).square().sum() + zeros * mean.square()) / (count - 1)
    abs_max = finite.abs().max() if finite.numel() else torch.zeros((), dtype=torch.float64)
    return {
        "mean": float(mean),
        "std": float(var.sqrt()),
        "abs_max": float(abs_max),
        "finite": finite.numel() == stored.numel(),
        "sparse": is_sparse(t),
    }


def all_finite(value: Any) -> bool:
    """Whether every floating tensor in ``value`` holds finite numbers only (sparse ones: their stored
    values; the implicit zeros are finite)."""
    for t in tensors_of(value):
        if not t.is_floating_point():
            continue
        stored = t.to_sparse_coo().coalesce().values() if is_sparse(t) else t
        if not bool(torch.isfinite(stored).all()):
            return False
    return True


def _square_adjacency(t: Tensor, n: int) -> bool:
    return t.ndim == 2 and tuple(t.shape) == (n, n)


def held_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors a model holds besides its parameters: buffers and plain tensor attributes of every
    submodule (code written for one fixed graph keeps the adjacency there: ``self.adj = adj``)."""
    found: dict[int, Tensor] = {}
    for m in module.modules():
        for t in list(m.buffers(recurse=False)) + list(vars(m).values()):
            if isinstance(t, Tensor) and not isinstance(t, nn.Parameter):
                found.setdefault(id(t), t)
    return list(found.values())


def is_edge_list(t: Tensor, n: int) -> bool:
    """Whether ``t`` is an edge list over ``n`` nodes, as message-passing code without an adjacency matrix
    carries it (``edge_index``): integers of shape ``(2, E)``, every entry a node index in ``[0, n)``."""
    return (
        n > 2
        and t.ndim == 2
        and t.shape[0] == 2
        and t.shape[1] not in (0, n)
        and not is_sparse(t)
        and not t.is_floating_point()
        and t.dtype != torch.bool
        and bool((t >= 0).all())
        and bool((t < n).all())
    )


def graph_adjacency(value: Any, n: int, module: nn.Module | None = None) -> Tensor | None:
    """The ``(n, n)`` adjacency (or ``(2, E)`` edge list) of a graph batch whose ``n`` examples are the nodes
    of one graph, or ``None``.

    A sparse ``(n, n)`` matrix in the batch, or held by ``module`` (a buffer or attribute), is one. A dense
    one in the batch only when a feature tensor with ``n`` rows of another shape sits beside it (a lone
    ``(n, n)`` tensor is more likely ``n`` examples of ``n`` features; a dense ``(n, n)`` buffer more likely a
    mask). Cutting examples out of such a batch cuts edges of the graph: callers keep the graph whole, or
    take the subgraph the kept nodes induce."""
    tensors = tensors_of(value)
    squares = [t for t in tensors if _square_adjacency(t, n)]
    held = [t for t in held_tensors(module) if _square_adjacency(t, n)] if module is not None else []
    sparse = [t for t in squares + held if is_sparse(t)]
    if sparse:
        return sparse[0]
    features = [
        t
        for t in tensors
        if t.ndim >= 2 and t.shape[0] == n and not _square_adjacency(t, n) and (t.is_floating_point() or is_sparse(t))
    ]
    if squares and features:
        return squares[0]
    # an edge list beside node features (message passing by `index_add` / `scatter`)
    edges = [t for t in tensors if is_edge_list(t, n)]
    return edges[0] if edges and features else None


def examples_in_loss(module: nn.Module, loss_fn: Callable[[], Tensor], n: int) -> Tensor | None:
    """Which of ``n`` examples the loss reads: ``(n,)`` bool, True where the model's output row of the
    example receives a gradient from ``loss_fn()``. ``None`` when no output with ``n`` rows was seen.

    Full-batch graph training predicts every node and computes the loss on the labelled ones only
    (``loss(out[train_mask], y[train_mask])`` or ``out[idx_train]``): the other nodes' labels are never
    trained on, and comparing predictions with them tells nothing about fitting. Their output rows get an
    exactly zero gradient, whatever form the mask takes. Runs ``loss_fn`` once with a backward pass through
    autograd (no ``.grad`` is written): call it on a snapshot."""
    captured: list[Tensor] = []

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        t = out if isinstance(out, Tensor) else first_tensor(out)
        if t is not None and t.requires_grad and t.ndim >= 1 and t.shape[0] == n and not is_sparse(t):
            captured.append(t)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.enable_grad():
            loss = loss_fn()
    finally:
        for h in handles:
            h.remove()
    if not captured or not loss.requires_grad:
        return None
    output = captured[-1]  # the last module to finish: the model itself, or the one training_step called
    (grad,) = torch.autograd.grad(loss, output, allow_unused=True)
    if grad is None:
        return None
    return grad.detach().reshape(n, -1).ne(0).any(1)
