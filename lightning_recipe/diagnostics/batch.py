"""Understanding a user's batch: what goes into the model, what the target is, what comes out.

Every check and monitor accepts the same three keyword arguments, ``inputs=``, ``targets=`` and
``forward=``; this module holds their defaults and the one error that names the argument to pass.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BatchAdapter",
    "BatchNotUnderstood",
    "ChildForward",
    "all_finite",
    "call_with_batch",
    "batch_size_of",
    "default_forward",
    "default_inputs",
    "default_targets",
    "examples_in_loss",
    "first_tensor",
    "graph_adjacency",
    "held_tensors",
    "is_edge_list",
    "is_sparse",
    "map_tensors",
    "select_output",
    "slice_batch",
    "take_along",
    "tensors_of",
    "value_stats",
    "whole_batch",
]

Inputs = Any  # a tensor, or a tuple / dict of tensors
InputsFn = Callable[[Any], Inputs]
TargetsFn = Callable[[Any], Tensor]
ForwardFn = Callable[[nn.Module, Inputs], Any]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "input_ids", "features", "data", "src")
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "tgt", "mask", "masks")
OUTPUT_KEYS = ("logits", "output", "outputs", "out", "pred", "preds", "prediction", "y_hat", "scores")


class BatchNotUnderstood(ValueError):
    """The batch does not have a shape the defaults understand; the message names the argument to pass."""


def default_inputs(batch: Any) -> Inputs:
    """``batch[0]`` of a tuple/list, a common input key of a dict (or field of a dataclass), or the batch itself
    if it is a tensor."""
    if isinstance(batch, Tensor):
        return batch
    batch = _fields_of(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise BatchNotUnderstood(
            f"Expected a dict batch to hold the model input under one of {list(INPUT_KEYS)}, but its keys are "
            f"{list(batch)}. Pass `inputs=lambda batch: batch[...]` to say what the model takes."
        )
    raise BatchNotUnderstood(
        f"Expected the batch to be a tuple `(x, y, ...)` or a dict, but got {type(batch).__name__}. "
        "Pass `inputs=lambda batch: ...` (and `targets=`) to say what the model takes."
    )


def _fields_of(batch: Any) -> Any:
    """A dataclass batch (``Batch(x=..., y=...)``) as the dict of its fields; any other batch as it is."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, (type, Mapping)):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return batch


def default_targets(batch: Any) -> Tensor:
    """``batch[1]`` of a tuple/list, or a common target key of a dict (or field of a dataclass)."""
    batch = _fields_of(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
        raise BatchNotUnderstood(
            f"Expected a dict batch to hold the target under one of {list(TARGET_KEYS)}, but its keys are "
            f"{list(batch)}. Pass `targets=lambda batch: batch[...]` to say where the labels are."
        )
    raise BatchNotUnderstood(
        f"Expected the batch to be a tuple `(x, y, ...)` with a tensor target second, but got "
        f"{_describe(batch)}. Pass `targets=lambda batch: ...` to say where the labels are."
    )


def default_forward(module: nn.Module, inputs: Inputs) -> Any:
    """``module(x)``, ``module(*x)`` for a tuple, ``module(**x)`` for a dict."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def select_output(outputs: Any) -> Tensor:
    """The tensor of predictions in what a model returned: the tensor itself, ``logits`` of a dict, or
    the first floating tensor of a tuple/dict."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(outputs.get(key), Tensor):
                return outputs[key]
        candidates = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        candidates = list(outputs)
    else:
        candidates = [getattr(outputs, key, None) for key in OUTPUT_KEYS]
    for item in candidates:
        if isinstance(item, Tensor) and item.is_floating_point():
            return item
    raise BatchNotUnderstood(
        f"Expected the model to return a tensor, or a tuple/dict holding one, but got {_describe(outputs)}. "
        "Pass `forward=lambda module, x: ...` returning the prediction tensor."
    )


# -- the one walk over nested batches and outputs ----------------------------------------------------
#
# Every part of the package that looks inside a batch, the model's inputs or its outputs goes through
# `map_tensors` (rebuild with each tensor replaced) or `tensors_of` (list the tensors), which walk the same
# containers in the same order: mappings (dict, OrderedDict, Hugging Face `BatchEncoding`), namedtuples, tuples
# and lists, and dataclasses (frozen ones too; a Hugging Face `ModelOutput` is one). Anything else is a leaf.


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


def tensors_of(value: Any) -> list[Tensor]:
    """Every tensor in ``value``, depth first, in the order :func:`map_tensors` visits them."""
    if isinstance(value, Tensor):
        return [value]
    children = _children(value)
    return [t for item in children for t in tensors_of(item)] if children is not None else []


def first_tensor(value: Any) -> Tensor | None:
    """The first tensor found in ``value``, depth first."""
    return next(iter(tensors_of(value)), None)


def batch_size_of(inputs: Inputs) -> int:
    """Size of the first dimension of the first tensor in ``inputs``."""
    tensor = first_tensor(inputs)
    if tensor is None or tensor.ndim == 0:
        raise BatchNotUnderstood(
            f"Expected the model input to contain a tensor with a batch dimension, but got {_describe(inputs)}. "
            "Pass `inputs=lambda batch: ...` returning the tensor(s) the model takes."
        )
    return int(tensor.shape[0])


@dataclass(frozen=True)
class BatchAdapter:
    """The three user-overridable pieces of batch understanding, bundled."""

    inputs: InputsFn = default_inputs
    targets: TargetsFn = default_targets
    forward: ForwardFn = default_forward

    @classmethod
    def build(
        cls, inputs: InputsFn | None = None, targets: TargetsFn | None = None, forward: ForwardFn | None = None
    ) -> BatchAdapter:
        for name, fn in (("inputs", inputs), ("targets", targets), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise TypeError(f"Expected `{name}` to be a callable, but got {fn!r}.")
        return cls(inputs or default_inputs, targets or default_targets, forward or default_forward)

    def get_inputs(self, batch: Any) -> Inputs:
        return self.inputs(batch)

    def get_targets(self, batch: Any) -> Tensor:
        targets = self.targets(batch)
        if not isinstance(targets, Tensor):
            raise BatchNotUnderstood(
                f"Expected `targets` to return a tensor, but got {_describe(targets)}. "
                "Pass `targets=lambda batch: ...` returning the label tensor."
            )
        return targets

    def predict(self, module: nn.Module, inputs: Inputs) -> Tensor:
        return select_output(self.forward(module, inputs))

    def fitted(self, module: nn.Module, batch: Any) -> BatchAdapter:
        """This adapter if the model can be called with it on ``batch``; else, when ``inputs=`` and
        ``forward=`` were left to their defaults, one that hands the model the whole batch (``module(batch)``,
        as a ``forward(self, batch)`` wants), or, for a module without ``forward`` that wraps one model, one that
        calls that model (:class:`ChildForward`). Raises :class:`BatchNotUnderstood` naming the arguments to pass
        when neither works. Runs the model once or twice: call it under ``torch.no_grad()`` on a snapshot."""
        guessed = self.inputs is default_inputs and self.forward is default_forward
        first: Exception | None = None
        inputs = None
        try:
            inputs = self.get_inputs(batch)
            if not guessed or self._per_example(self.predict(module, inputs), batch):
                return self
        except BatchNotUnderstood as error:
            first = error
        except Exception as error:  # noqa: BLE001 - the user's forward on what we guessed it takes
            first = error
        if guessed and (by_name := self._by_signature(module, batch)) is not None:
            # `forward(self, x, adj)` fed from `(x, adj, y, ...)`, or `forward(self, x, adj)` from a dict
            # with those keys: the batch entries the signature names are the inputs
            try:
                if by_name._per_example(by_name.predict(module, by_name.get_inputs(batch)), batch):
                    return by_name
            except Exception:  # noqa: BLE001 - the first error is the one worth reporting
                pass
        if guessed and not isinstance(batch, Tensor):
            whole = replace(self, inputs=whole_batch, forward=call_with_batch)
            try:
                if self._per_example(whole.predict(module, batch), batch):
                    return whole
            except Exception:  # noqa: BLE001 - the first error is the one worth reporting
                pass
        if first is None:
            return self  # odd outputs from the default call, and no better reading: leave it to the check
        child = _sole_model(module) if guessed and isinstance(first, NotImplementedError) else None
        if child is not None:
            # a LightningModule without `forward` that wraps one model (`self.model(**batch)` in training_step,
            # as Hugging Face users write it): call that model, with the whole dict batch first (attention
            # masks included), then with the input alone
            candidates = [ChildForward(child, whole=True)] if isinstance(batch, Mapping) else []
            for forward in [*candidates, ChildForward(child, whole=False)]:
                adapter = (
                    replace(self, inputs=whole_batch, forward=forward)
                    if forward.whole
                    else replace(self, forward=forward)
                )
                try:
                    if self._per_example(adapter.predict(module, adapter.get_inputs(batch)), batch):
                        return adapter
                except Exception:  # noqa: BLE001 - the first error is the one worth reporting
                    pass
        if isinstance(first, BatchNotUnderstood):
            raise first
        tried = f"`module(x)` with x = {_describe(inputs)}" if guessed else "your `inputs=` / `forward=`"
        also = " and `module(batch)` with the whole batch" if guessed and not isinstance(batch, Tensor) else ""
        raise BatchNotUnderstood(
            f"calling the model as {tried}{also} raised {type(first).__name__}: {first}. Pass "
            "`inputs=lambda batch: ...` returning what `forward` takes, or `forward=lambda module, x: ...`."
        ) from first

    def _by_signature(self, module: nn.Module, batch: Any) -> BatchAdapter | None:
        """An adapter whose inputs are the batch entries ``module.forward``'s signature asks for: the first
        ``k`` items of a tuple batch for ``k`` required positional parameters (the target is then item
        ``k``, unless ``targets=`` was given), or the keys of a dict batch that name parameters. ``None``
        when the signature does not say more than ``module(x)`` already tried."""
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            k = len(required)
            if k < 2 or k >= len(batch) or not all(isinstance(v, Tensor) for v in batch[: k + 1]):
                return None
            targets = self.targets if self.targets is not default_targets else _ItemAt(k)
            return replace(self, inputs=_LeadingItems(k), targets=targets)
        if isinstance(batch, Mapping):
            named = tuple(p.name for p in params if p.name in batch and p.kind is not p.POSITIONAL_ONLY)
            if not named or any(p.name not in named for p in required if p.kind is not p.POSITIONAL_ONLY):
                return None
            return replace(self, inputs=_Keys(named))
        return None

    def _per_example(self, output: Tensor, batch: Any) -> bool:
        """Whether ``output`` can hold one prediction per example: a dimension of the targets' batch size,
        or flattened rows (``(N*T, ...)``). A forward that took a guessed input and still ran can return
        something else (``batch[0]`` of a tensor is its first row)."""
        try:
            n = self.get_targets(batch).shape[0]
        except (BatchNotUnderstood, IndexError):
            return True  # no targets to compare with
        return n in output.shape or (output.ndim >= 1 and output.shape[0] >= n and output.shape[0] % n == 0)


def _sole_model(module: nn.Module) -> str | None:
    """The name of the one direct submodule with parameters (``self.model``), if there is exactly one."""
    named = [name for name, child in module.named_children() if next(child.parameters(), None) is not None]
    return named[0] if len(named) == 1 else None


@dataclass(frozen=True)
class ChildForward:
    """``forward=`` that calls the submodule ``name`` of the module: ``model(**batch)`` with ``whole``, else
    :func:`default_forward` on it. Picklable, and it follows the module to any device or process."""

    name: str
    whole: bool = False

    def __call__(self, module: nn.Module, inputs: Inputs) -> Any:
        child = getattr(module, self.name)
        if self.whole and isinstance(inputs, Mapping):
            return child(**inputs)
        return default_forward(child, inputs)


@dataclass(frozen=True)
class _LeadingItems:
    """``inputs=`` taking the first ``count`` items of a tuple batch (a multi-input ``forward``)."""

    count: int

    def __call__(self, batch: Any) -> tuple[Any, ...]:
        return tuple(batch[: self.count])


@dataclass(frozen=True)
class _ItemAt:
    """``targets=`` taking item ``index`` of a tuple batch (the item after the inputs)."""

    index: int

    def __call__(self, batch: Any) -> Any:
        return batch[self.index]


@dataclass(frozen=True)
class _Keys:
    """``inputs=`` taking the entries of a dict batch that ``forward`` names as parameters."""

    keys: tuple[str, ...]

    def __call__(self, batch: Any) -> dict[str, Any]:
        return {key: batch[key] for key in self.keys}


def whole_batch(batch: Any) -> Any:
    """``inputs=`` for models whose ``forward`` takes the whole batch."""
    return batch


def call_with_batch(module: nn.Module, batch: Any) -> Any:
    """``forward=`` for models whose ``forward`` takes the whole batch as one argument."""
    return module(batch)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        kind = "a sparse tensor" if is_sparse(value) else "a tensor"
        return f"{kind} of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__


def slice_batch(value: Any, index: Tensor | slice, batch_size: int, dim: int = 0) -> Any:
    """Take ``index`` along ``dim`` of every tensor in ``value`` whose size there is ``batch_size``.

    Sparse tensors are cut with ``index_select`` (they have no strided views). A sparse ``(N, N)`` adjacency
    of a graph batch is cut on both dimensions, so the result is the subgraph the kept nodes induce rather
    than a ``(k, N)`` matrix no graph layer can take."""

    def cut(t: Tensor) -> Tensor:
        if t.ndim <= dim or t.shape[dim] != batch_size:
            return t
        if is_sparse(t):
            for d in (0, 1) if dim == 0 and _square_adjacency(t, batch_size) else (dim,):
                t = take_along(t, index, d)
            return t
        return t[(slice(None),) * dim + (index,)]

    return map_tensors(value, cut)


# -- sparse tensors and graph batches ----------------------------------------------------------------
#
# A sparse tensor (``torch.sparse_coo_tensor``, CSR, ...) has no strides: basic indexing, ``narrow``, ``view``,
# comparisons and most reductions raise NotImplementedError on it. Everything the package does to a user's
# batch goes through the helpers below, which read and cut sparse tensors without densifying them.


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
