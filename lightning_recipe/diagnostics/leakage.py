"""Charting dependencies with backprop: does the output of one example depend on the input of another
(a batch leak), and does the output at time ``t`` depend on inputs after ``t`` (a causality leak)?

The recipe's trick is to set the loss to the outputs of example ``i`` and look for gradient on the inputs
of any other example. Done naively that is one backward pass per example; here every pair is covered in
``2 * ceil(log2 B)`` passes by grouping:

* **Batch passes.** For each bit ``b`` of the example index, one pass takes as source the outputs of the
  examples whose bit ``b`` is 1, one pass those whose bit is 0. Any two examples ``i != j`` differ in some
  bit, so there is a pass with ``i`` a source and ``j`` not: a dependency of output ``i`` on input ``j``
  shows up as gradient on a non-source example. The source outputs are weighted with fixed random
  numbers, so dependencies cannot cancel (a plain sum of a softmax over the batch has zero gradient).
  Only when a leak shows up, one targeted pass per suspect output example (bounded) names the exact pairs.
* **Layer where the mixing starts.** Forward hooks keep the output of every leaf module; a binary search
  over them in execution order (one pass each, ``O(log M)``) finds the first whose row for example ``i``
  already depends on another example's input.
* **Causal passes.** Once examples are known to be independent, each example can carry its own cut: in one
  pass example ``e`` takes as source its outputs at positions ``<= c_e`` and any gradient at its input
  positions ``> c_e`` is a violation. ``B`` cuts per pass, ``ceil((T - 1) / B)`` passes (bounded; the cuts
  are then spread over the sequence). Targeted passes from single positions name the offending pairs.

* **Graphs.** When the examples are the nodes of one graph (full-batch node classification: an ``(N, N)``
  adjacency, sparse or dense, in the batch or held by the model), a node depends on its neighbours by
  design. The probe counts how often ``forward`` multiplies node features by the adjacency (``k``), and
  holds each of a sample of nodes to its ``k``-hop neighbourhood instead of to independence; a graph it
  cannot read that way (an edge list) is skipped, saying so. See the section at the end of this file.

The model runs in eval mode (BatchNorm uses running statistics and is per example; dropout is off), in its
own dtype. Integer token inputs carry no gradient, so they are probed at the output of the ``nn.Embedding``
that reads them. "Non-zero" is relative, per probed tensor: gradient on an example counts when it exceeds
``tolerance`` times the largest gradient on that tensor in the same pass. A per-example model gives exact
zeros there (autograd never routes a gradient between independent rows), so the tolerance only has to sit
above rounding noise of mathematically cancelling operations (~1e-7 in float32) and below real leaks
(a batch mean of ``B`` examples leaks ``1/B``).

Pure: no Lightning here. The module's train/eval modes are restored afterwards; no ``.grad`` is written
(gradients come from :func:`torch.autograd.grad` on probe tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe.diagnostics.batch import (
    graph_adjacency,
    held_tensors,
    is_edge_list,
    is_sparse,
    map_tensors,
    slice_batch,
    tensors_of,
)
from lightning_recipe.diagnostics.task import is_int as _is_int
from lightning_recipe.diagnostics.task import looks_like_next_step

__all__ = ["GraphReading", "LeakageNotApplicable", "LeakageReport", "probe_batch_leakage"]

Forward = Callable[[nn.Module, Any], Tensor]


class LeakageNotApplicable(ValueError):
    """The probe cannot run on this model/batch; the message says why and which argument helps."""


class NoGradientPath(LeakageNotApplicable):
    """No floating-point input and no embedding output to read a gradient at."""


@dataclass(frozen=True)
class LeakageReport:
    """What the probe saw.

    Attributes:
        num_examples: examples probed (``B``).
        input_batch_dim: the batch dimension of the inputs, as given to the model.
        output_layout: how outputs were mapped to examples, e.g. ``"dim 0"`` or ``"flattened (B*T, ...)"``.
        probed: the tensors gradients were read at (inputs, embedding outputs).
        leaking_pairs: ``(i, j)``: output of example ``i`` depends on the input of example ``j != i``.
        pairs_exact: whether ``leaking_pairs`` is exact (``False``: candidates, a superset of the leaks).
        first_mixing_module / last_clean_module: where mixing starts, ``(name, type)``, when found.
        causal_checked / causal_reason: whether causality was checked, and why (or why not).
        causal_violations: ``(t, [t', ...])``: output at position ``t`` depends on inputs at ``t' > t``.
        violating_cuts: cuts ``c`` for which some output ``<= c`` depends on an input ``> c``.
        cuts_checked: the cuts ``c`` that were checked.
        backward_passes: every backward pass run, by purpose.
        dependency: ``(B, B)`` matrix, 1 where output ``i`` depends on input ``j != i``; diagonal not probed.
        graph: set when the examples are the nodes of one graph: what was read, and the allowed neighbourhood
            the dependencies were held to (``leaking_pairs`` then lists nodes outside it, by node index).
        probed_layer: the layer whose outputs were probed in place of the model's when no gradient reaches the
            inputs from the model's output (a zero-initialised final layer); ``None`` when the model's were.
    """

    num_examples: int
    input_batch_dim: int
    output_layout: str
    probed: list[str]
    leaking_pairs: list[tuple[int, int]]
    pairs_exact: bool
    first_mixing_module: tuple[str, str] | None
    last_clean_module: tuple[str, str] | None
    mixing_module_note: str | None
    causal_checked: bool
    causal_reason: str
    causal_violations: list[tuple[int, list[int]]]
    violating_cuts: list[int]
    cuts_checked: list[int]
    sequence_length: int | None
    backward_passes: dict[str, int]
    tolerance: float
    dependency: Tensor = field(repr=False)
    graph: GraphReading | None = None
    probed_layer: str | None = None

    @property
    def batch_leak(self) -> bool:
        return bool(self.leaking_pairs)

    @property
    def causal_leak(self) -> bool:
        return bool(self.violating_cuts)

    @property
    def total_backward_passes(self) -> int:
        return sum(self.backward_passes.values())


# -- structure helpers ------------------------------------------------------------------------------


def _probe_leaf(t: Tensor) -> tuple[Tensor, Tensor]:
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


def _edges_within(edges: Tensor, b: int) -> Tensor:
    """The edges of a ``(2, E)`` edge list between the first ``b`` nodes: the induced subgraph's."""
    return edges[:, (edges < b).all(0)]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _per_example(g: Tensor, dim: int) -> Tensor:
    """max |g| per example along ``dim``: shape ``(B,)``."""
    return g.detach().movedim(dim, 0).abs().reshape(g.shape[dim], -1).amax(1).float()


# -- hypotheses about where the batch is ------------------------------------------------------------


def _input_batch_dims(inputs: Any, targets: Tensor | None, batch_dim: int | None) -> list[int]:
    """Candidate batch dims of the inputs, most likely first; later ones are tried only when the earlier
    show a leak (a wrong guess for the batch dim looks like a leak; a right one does not)."""
    if batch_dim is not None:
        return [batch_dim]
    tensors = [t for t in tensors_of(inputs) if t.ndim >= 1]
    if not tensors:
        raise LeakageNotApplicable(
            "the model input holds no tensor with a batch dimension. Pass `inputs=lambda batch: ...` "
            "returning the tensor(s) the model takes."
        )
    x = next((t for t in tensors if t.is_floating_point() or _is_int(t)), tensors[0])
    # (T, N, F) float sequences or (T, N) tokens may carry the batch on dim 1
    dims = [0, 1] if (x.ndim >= 3 or (x.ndim == 2 and _is_int(x))) else [0]
    n = int(targets.shape[0]) if targets is not None and targets.ndim >= 1 else None
    matching = [d for d in dims if n is not None and x.shape[d] == n]
    return matching or dims


def _choose_num_examples(tensors: list[Tensor], dim: int, n: int, wanted: int) -> int:
    """``min(n, wanted)``, nudged down so it does not equal another dimension's size (which would make
    the batch dimension of outputs and intermediate tensors ambiguous)."""
    if n <= wanted:
        return n
    others = {s for t in tensors for d, s in enumerate(t.shape) if d != dim}
    for b in range(wanted, 1, -1):
        if b not in others:
            return b
    return wanted


def _output_views(out: Tensor, b: int, in_dim: int, output_batch_dim: int | None) -> list[tuple[str, Tensor]]:
    """Ways to read the output with the examples on dim 0, most likely first."""
    if output_batch_dim is not None:
        if output_batch_dim >= out.ndim or out.shape[output_batch_dim] != b:
            raise LeakageNotApplicable(
                f"`output_batch_dim={output_batch_dim}` does not index a dimension of size {b} (the probed "
                f"examples) in the output of shape {tuple(out.shape)}."
            )
        return [(f"dim {output_batch_dim}", out.movedim(output_batch_dim, 0))]
    dims = [d for d in range(out.ndim) if out.shape[d] == b]
    dims.sort(key=lambda d: (d != in_dim, d))
    views = [(f"dim {d}", out.movedim(d, 0)) for d in dims]
    if out.ndim >= 1 and out.shape[0] % b == 0 and out.shape[0] > b:
        k, rest = out.shape[0] // b, out.shape[1:]
        example_major = ("flattened (B*T, ...) example-major", out.reshape(b, k, *rest))
        time_major = ("flattened (T*B, ...) time-major", out.reshape(k, b, *rest).movedim(1, 0))
        views += [example_major, time_major] if in_dim == 0 else [time_major, example_major]
    return views[:4]


# -- the probe --------------------------------------------------------------------------------------


@dataclass
class _Probe:
    name: str
    tensor: Tensor  # a leaf that requires grad
    batch_dim: int
    time_dim: int | None = None  # in the batch-first layout (after moving the batch dim to 0)


class _Runner:
    """One forward pass with probe leaves and recorded module outputs; many backward passes."""

    def __init__(self, leaves: list[_Probe], out: Tensor, tolerance: float, seed: int) -> None:
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
            per = _per_example(g, probe.batch_dim).to(rel.device)
            scale = per.max()
            if scale > 0 and torch.isfinite(scale):
                rel = torch.maximum(rel, per / scale)
        return rel

    def leaks(self, rel: Tensor) -> Tensor:
        return rel > self.tolerance


def _make_leaves(inputs: Any, b: int, in_dim: int) -> tuple[Any, list[_Probe]]:
    leaves: list[_Probe] = []

    def leaf(t: Tensor) -> Tensor:
        if t.is_floating_point() and t.ndim > in_dim and t.shape[in_dim] == b:
            probe, fed = _probe_leaf(t)
            leaves.append(_Probe(f"input {tuple(t.shape)}{' (sparse)' if is_sparse(t) else ''}", probe, in_dim))
            return fed
        return t

    return map_tensors(inputs, leaf), leaves


def probe_batch_leakage(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    *,
    targets: Tensor | None = None,
    batch_dim: int | None = None,
    output_batch_dim: int | None = None,
    causal: bool | None = None,
    time_dim: int | None = None,
    num_examples: int = 16,
    tolerance: float = 1e-5,
    max_exact_rows: int = 16,
    max_causal_passes: int = 4,
    seed: int = 0,
    next_token: str | None = None,
    graph: bool | None = None,
    _cast_integers: bool = True,
) -> LeakageReport:
    """Chart which examples (and positions) each output depends on, in eval mode.

    Args:
        module: the model; its train/eval modes are restored afterwards.
        inputs: what ``forward`` takes: a tensor, or a tuple/dict of tensors, batch included.
        forward: ``(module, inputs) -> output tensor``.
        targets: the labels, used to find the batch size and to recognise next-token training.
        batch_dim: batch dimension of the inputs (default: found).
        output_batch_dim: batch dimension of the output (default: found; flattened ``(N*T, ...)`` outputs
            are mapped back).
        causal: check that output ``t`` depends on inputs ``<= t`` only. ``None``: when ``time_dim`` is
            given or the targets are the inputs shifted by one position.
        time_dim: time dimension of the inputs, as given to the model (default: the first non-batch dim).
        next_token: how the caller knows the model is trained on next-token targets when the batch does not
            show it (the shift is inside the model's loss); with ``causal=None`` causality is then checked.
        num_examples: how many examples of the batch to probe.
        tolerance: relative gradient below which an example counts as independent.
        graph: whether the examples are the nodes of one graph (an ``(N, N)`` adjacency among the inputs that
            ``forward`` multiplies node features by). ``None``: found. Then each node is held to the
            neighbourhood the propagations reach, not to independence; ``False`` probes the nodes as
            independent examples (on the subgraph the first ``num_examples`` nodes induce).

    Raises:
        LeakageNotApplicable: fewer than two examples, nothing to probe, or no batch dim in the output.

    Example::

        >>> net = nn.Linear(3, 2)
        >>> report = probe_batch_leakage(net, torch.randn(8, 3), lambda m, x: m(x))
        >>> report.batch_leak, report.total_backward_passes
        (False, 6)
    """
    hypotheses = _input_batch_dims(inputs, targets, batch_dim)
    shifted_batch = any(looks_like_next_step(inputs, targets, d) for d in hypotheses[:1])
    wants_causal = causal if causal is not None else (time_dim is not None or shifted_batch or bool(next_token))
    causal_reason = (
        "asked (`causal=True`)"
        if causal
        else "not asked (`causal=False`)"
        if causal is False
        else "asked (`time_dim` given)"
        if time_dim is not None
        else "the targets are the inputs shifted by one position (next-step training)"
        if shifted_batch
        else str(next_token)
        if next_token
        else "not asked, and the model is not trained on next-token targets"
    )
    first_report: LeakageReport | None = None
    errors: list[LeakageNotApplicable] = []
    with _eval_mode(module):
        found = None if graph is False else _read_graph(module, inputs, forward, targets)
        if found is not None:
            n, adjacencies, hops, candidates = found
            if adjacencies and hops > 0:
                return _probe_graph(
                    module, inputs, forward, n, adjacencies, hops, output_batch_dim, num_examples, tolerance, seed
                )
            if graph or any(is_sparse(t) or is_edge_list(t, n) for t in candidates):
                raise _not_a_graph_model(n, candidates)
            # a dense (N, N) input that never multiplies node features: N examples of N features
        elif graph:
            raise LeakageNotApplicable(
                "`graph=True`, but no input is an (N, N) adjacency over the N examples of the batch; pass "
                "`inputs=` returning the node features and the adjacency."
            )
        for in_dim in hypotheses:
            try:
                report = _probe_with_batch_dim(
                    module,
                    inputs,
                    forward,
                    in_dim,
                    output_batch_dim,
                    wants_causal,
                    causal_reason,
                    time_dim,
                    num_examples,
                    tolerance,
                    max_exact_rows,
                    max_causal_passes,
                    seed,
                )
            except LeakageNotApplicable as reason:
                errors.append(reason)
                continue
            if not report.batch_leak:
                return report
            first_report = first_report or report
    if first_report is not None:
        return first_report
    if errors and isinstance(errors[0], NoGradientPath) and _cast_integers:
        # uint8 images and the like: the model casts them to float itself, so the same values as float
        # tensors give it the same outputs, with a gradient to read
        floated = map_tensors(inputs, lambda t: t.float() if _is_int(t) else t)
        try:
            report = probe_batch_leakage(
                module,
                floated,
                forward,
                targets=targets,
                batch_dim=batch_dim,
                output_batch_dim=output_batch_dim,
                causal=causal,
                time_dim=time_dim,
                num_examples=num_examples,
                tolerance=tolerance,
                max_exact_rows=max_exact_rows,
                max_causal_passes=max_causal_passes,
                seed=seed,
                graph=graph,
                next_token=next_token,
                _cast_integers=False,
            )
        except Exception:  # noqa: BLE001 - the model needs integers after all: the original reason stands
            raise errors[0] from None
        return replace(report, probed=[f"{p} (integer input, probed as float)" for p in report.probed])
    raise errors[0] if errors else LeakageNotApplicable("no batch dimension found")


def _probe_with_batch_dim(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    in_dim: int,
    output_batch_dim: int | None,
    wants_causal: bool,
    causal_reason: str,
    time_dim: int | None,
    num_examples: int,
    tolerance: float,
    max_exact_rows: int,
    max_causal_passes: int,
    seed: int,
) -> LeakageReport:
    tensors = [t for t in tensors_of(inputs) if t.ndim > in_dim]
    if not tensors:
        raise LeakageNotApplicable(
            f"no input tensor has a dimension {in_dim}; pass `batch_dim=` to say where the batch is."
        )
    n = int(tensors[0].shape[in_dim])
    if n < 2:
        raise LeakageNotApplicable(
            f"the batch holds {n} example; the probe needs at least 2 to see whether examples mix. "
            "Use a training batch size of 2 or more."
        )
    b = _choose_num_examples(tensors, in_dim, n, num_examples)
    if b < n:
        # a graph is cut to the subgraph the first b nodes induce (adjacency on both dims, edges between
        # them); it only gets here when asked to (`graph=False`). Sparse tensors are cut with index_select.
        adjacency = graph_adjacency(inputs, n) if in_dim == 0 else None
        inputs = map_tensors(inputs, lambda t: t[:b, :b] if t is adjacency and not is_sparse(t) else t)
        inputs = slice_batch(inputs, slice(0, b), n, in_dim)
        inputs = map_tensors(inputs, lambda t: _edges_within(t, b) if is_edge_list(t, n) else t)
    probe_inputs, leaves = _make_leaves(inputs, b, in_dim)
    int_shapes = {tuple(t.shape) for t in tensors_of(inputs) if _is_int(t) and t.ndim > in_dim and t.shape[in_dim] == b}
    names = {m: name for name, m in module.named_modules()}
    recorded: list[tuple[str, str, Tensor, int]] = []

    def embedding_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        idx = args[0] if args else None
        if (
            isinstance(idx, Tensor)
            and tuple(idx.shape) in int_shapes
            and isinstance(out, Tensor)
            and out.is_floating_point()
        ):
            probe = out.detach().requires_grad_(True)
            leaves.append(_Probe(f"embedding `{names.get(mod, '?')}` output", probe, in_dim))
            return probe.clone()
        return None

    def record_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = out if isinstance(out, Tensor) else next(iter(tensors_of(out)), None)
        if t is None or not t.is_floating_point() or not t.requires_grad:
            return
        dims = [d for d in range(t.ndim) if t.shape[d] == b]
        if dims:
            d = in_dim if in_dim in dims else dims[0]
            recorded.append((names.get(mod, "?"), _describe_module(mod), t, d))

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Embedding) and int_shapes:
            handles.append(m.register_forward_hook(embedding_hook))
        elif m is not module and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # children complete (and are recorded) before their parents: completion order
            handles.append(m.register_forward_hook(record_hook))
    raw = _hooked_forward(module, forward, probe_inputs, handles)
    if not leaves:
        raise NoGradientPath(
            "the model takes no floating-point input with a batch dimension and no `nn.Embedding` reads its "
            "integer input, so there is nowhere to read a gradient. Pass `inputs=` returning the float "
            "tensor(s) (or token ids fed to an `nn.Embedding`)."
        )
    views = _output_views(raw, b, in_dim, output_batch_dim)
    if not views:
        raise LeakageNotApplicable(
            f"the output of shape {tuple(raw.shape)} has no dimension of size {b} (the probed examples), so "
            "outputs cannot be mapped to examples. Pass `output_batch_dim=` (and `batch_dim=` for the "
            "inputs), or `forward=` returning per-example outputs."
        )
    if not torch.isfinite(raw.detach()).all():
        raise LeakageNotApplicable(
            "the model's outputs are not finite at initialisation, so gradients cannot be compared; fix the "
            "non-finite outputs first."
        )
    first: LeakageReport | None = None
    no_gradient: _NoGradient | None = None
    for layout, out in views:
        runner = _Runner(leaves, out, tolerance, seed)
        try:
            report = _run_passes(
                runner,
                b,
                in_dim,
                layout,
                recorded,
                wants_causal,
                causal_reason,
                time_dim,
                inputs,
                max_exact_rows,
                max_causal_passes,
            )
        except _NoGradient as error:
            no_gradient = error
            continue
        if not report.batch_leak:
            return report
        first = first or report
    if first is not None:
        return first
    # No gradient reaches the inputs from the output (e.g. a zero-initialised final layer): chart the
    # dependencies of the last layer outputs that do pass one; mixing after that layer stays unseen.
    for name, kind, t, d in reversed(recorded[-8:]):
        layout = (
            f"output of layer `{name}` ({kind}): no gradient reaches the inputs from the model output "
            "(zero-initialised final layer?), so the last layer that passes one was probed"
        )
        try:
            fallback = _run_passes(
                _Runner(leaves, t.movedim(d, 0), tolerance, seed),
                b,
                in_dim,
                layout,
                recorded,
                wants_causal,
                causal_reason,
                time_dim,
                inputs,
                max_exact_rows,
                max_causal_passes,
            )
        except (_NoGradient, RuntimeError):
            continue
        return replace(fallback, probed_layer=name)
    assert no_gradient is not None
    raise no_gradient


class _NoGradient(LeakageNotApplicable):
    pass


def _run_passes(
    runner: _Runner,
    b: int,
    in_dim: int,
    layout: str,
    recorded: list[tuple[str, str, Tensor, int]],
    wants_causal: bool,
    causal_reason: str,
    time_dim: int | None,
    inputs: Any,
    max_exact_rows: int,
    max_causal_passes: int,
) -> LeakageReport:
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
        raise _NoGradient(
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
    first_mixing = last_clean = None
    note = None
    if pairs:
        first_mixing, last_clean, note = _locate_mixing(runner, recorded, pairs[0][0], b)
    report: dict[str, Any] = dict(
        num_examples=b,
        input_batch_dim=in_dim,
        output_layout=layout,
        probed=[p.name for p in runner.leaves],
        leaking_pairs=pairs,
        pairs_exact=exact,
        first_mixing_module=first_mixing,
        last_clean_module=last_clean,
        mixing_module_note=note,
        dependency=dependency,
    )
    causal_fields: dict[str, Any] = dict(
        causal_checked=False,
        causal_reason=causal_reason,
        causal_violations=[],
        violating_cuts=[],
        cuts_checked=[],
        sequence_length=None,
    )
    if wants_causal and pairs:
        causal_fields["causal_reason"] = f"{causal_reason}; not checked while examples mix (fix that first)"
    elif wants_causal:
        causal_fields.update(_causal_passes(runner, b, in_dim, time_dim, inputs, causal_reason, max_causal_passes))
    return LeakageReport(**report, **causal_fields, backward_passes=dict(runner.passes), tolerance=runner.tolerance)


def _hooked_forward(module: nn.Module, forward: Forward, inputs: Any, handles: list[Any]) -> Tensor:
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


def _describe_module(m: nn.Module) -> str:
    text = type(m).__name__
    if getattr(m, "batch_first", None) is False:
        text += "(batch_first=False)"
    return text


def _locate_mixing(
    runner: _Runner, recorded: list[tuple[str, str, Tensor, int]], i: int, b: int
) -> tuple[tuple[str, str] | None, tuple[str, str] | None, str | None]:
    """Binary search, in execution order, for the first recorded module output whose row ``i`` depends on
    another example's input. Assumes mixing, once started, persists downstream (true of chains; in a
    branching graph the result is still a boundary between a clean and a mixing layer)."""
    if not recorded:
        return None, None, "no layer output with a batch dimension was recorded"
    cache: dict[int, bool] = {}

    def mixes(k: int) -> bool:
        if k not in cache:
            _, _, t, d = recorded[k]
            try:
                mask = (torch.arange(b) == i).to(t.device)
                rel = runner.example_gradient(mask, "locate layer", target=t, target_dim=d).cpu()
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
    first = recorded[lo][:2] if lo < len(recorded) else None
    clean = recorded[lo - 1][:2] if lo > 0 else None
    note = None if first is not None else "examples mix after the last layer, in the code of `forward`"
    return first, clean, note


def _causal_passes(
    runner: _Runner, b: int, in_dim: int, time_dim: int | None, inputs: Any, reason: str, max_passes: int
) -> dict[str, Any]:
    not_checked = dict(
        causal_checked=False, causal_violations=[], violating_cuts=[], cuts_checked=[], sequence_length=None
    )
    if time_dim is not None and time_dim == in_dim:
        return {**not_checked, "causal_reason": f"{reason}; but `time_dim` equals the batch dim {in_dim}"}
    # time dim in the batch-first layout of the probed tensors
    t_dim = 1 if time_dim is None else (time_dim + 1 if time_dim < in_dim else time_dim)
    lengths = [p.tensor.movedim(p.batch_dim, 0).shape[t_dim] for p in runner.leaves if p.tensor.ndim > t_dim]
    if not lengths:
        return {
            **not_checked,
            "causal_reason": f"{reason}; but the inputs have no time dimension {t_dim} (pass `time_dim=`)",
        }
    length = lengths[0]
    out = runner.out
    out_dims = [d for d in range(1, out.ndim) if out.shape[d] == length]
    if length < 2 or not out_dims:
        return {
            **not_checked,
            "sequence_length": length,
            "causal_reason": f"{reason}; but the output of shape "
            f"{tuple(out.shape)} (examples first) has no time dimension of length {length} to match the "
            "inputs' (pass `time_dim=`, or `forward=` returning per-position outputs)",
        }
    o_dim = 1 if 1 in out_dims else out_dims[0]
    probes = {
        id(p)
        for p in runner.leaves
        if p.tensor.ndim > t_dim and p.tensor.movedim(p.batch_dim, 0).shape[t_dim] == length
    }
    all_cuts = list(range(length - 1))
    capacity = b * max_passes
    if len(all_cuts) > capacity:
        all_cuts = sorted({round(x) for x in torch.linspace(0, length - 2, capacity).tolist()})
    positions = torch.arange(length, device=out.device)

    def run(cuts: list[int], exact: bool, purpose: str) -> list[list[int]]:
        """One pass: example e takes as source its outputs at positions <= cuts[e] (== when exact); returns,
        per cut, the input positions > cut that received gradient."""
        cut = torch.full((b,), -1, device=out.device, dtype=torch.long)
        cut[: len(cuts)] = torch.tensor(cuts, device=out.device)
        sel = (positions[None, :] == cut[:, None]) if exact else (positions[None, :] <= cut[:, None])
        shape = [b] + [1] * (out.ndim - 1)
        shape[o_dim] = length
        w = runner.weights(out)
        source = (out * w * sel.to(out.dtype).reshape(shape)).sum()
        rel = torch.zeros(b, length, device=out.device)
        for probe, g in zip(runner.leaves, runner.grads(source, purpose), strict=True):
            if g is None or id(probe) not in probes:
                continue
            gb = g.detach().movedim(probe.batch_dim, 0).movedim(t_dim, 1).abs()
            per = gb.reshape(b, length, -1).amax(2).float().to(rel.device)
            scale = per.max()
            if scale > 0 and torch.isfinite(scale):
                rel = torch.maximum(rel, per / scale)
        found = []
        for e, c in enumerate(cuts):
            late = (rel[e] > runner.tolerance) & (positions > c)
            found.append(positions[late].tolist())
        return found

    violating: list[int] = []
    for start in range(0, len(all_cuts), b):
        chunk = all_cuts[start : start + b]
        for c, late in zip(chunk, run(chunk, exact=False, purpose="causal"), strict=True):
            if late:
                violating.append(c)
    violations: list[tuple[int, list[int]]] = []
    if violating:
        # name pairs from single output positions: the first violating cuts, up to one pass
        named = violating[:b]
        for t, late in zip(named, run(named, exact=True, purpose="causal pairs"), strict=True):
            if late:
                violations.append((t, late))
    return dict(
        causal_checked=True,
        causal_reason=reason,
        causal_violations=violations,
        violating_cuts=violating,
        cuts_checked=all_cuts,
        sequence_length=length,
    )


# -- graph batches: the examples are the nodes of one graph -------------------------------------------
#
# Full-batch node classification feeds the whole graph as one batch: node features ``(N, F)`` and an
# ``(N, N)`` adjacency (sparse or dense). A node's output depends on its neighbours by design, so the batch
# test above would call every healthy graph network leaky. What a node may depend on is known, though: a
# model that multiplies node features by the adjacency ``k`` times in ``forward`` (``adj @ h``,
# ``torch.sparse.mm(adj, h)``) reaches the ``k``-hop neighbourhood, and nothing else. The probe counts those
# propagations in one forward pass (a TorchFunctionMode watches which calls take the adjacency or a tensor
# derived from it), then holds a sample of nodes to their neighbourhood: a dependency on a node outside it
# (a softmax or statistics over the node axis) is a leak.

_PRODUCTS = frozenset(
    {"mm", "matmul", "__matmul__", "__rmatmul__", "spmm", "_sparse_mm", "bmm", "addmm", "sparse_mm", "mv", "einsum"}
)


@dataclass(frozen=True)
class GraphReading:
    """How a batch was read as one graph.

    Attributes:
        num_nodes: ``N``, the examples of the batch.
        adjacency: the adjacency input(s), e.g. ``"sparse (120, 120)"``.
        hops: propagations through the adjacency ``forward`` makes: each node may depend on its
            ``hops``-hop neighbourhood (edges followed in both directions).
        probed_nodes: the nodes whose dependencies were charted.
        neighbourhood_sizes: size of each probed node's allowed neighbourhood, itself included.
        dependencies_within: (probed node, other node) dependencies seen inside the neighbourhoods: the
            evidence that the probe saw the message passing at all.
    """

    num_nodes: int
    adjacency: str
    hops: int
    probed_nodes: list[int]
    neighbourhood_sizes: list[int]
    dependencies_within: int


def _describe_tensor(t: Tensor) -> str:
    if is_sparse(t):
        return f"sparse {tuple(t.shape)}"
    return f"dense {tuple(t.shape)}" if t.is_floating_point() else f"{tuple(t.shape)} {str(t.dtype)[6:]}"


def _node_count(inputs: Any, targets: Tensor | None) -> int | None:
    if targets is not None and targets.ndim >= 1:
        return int(targets.shape[0])
    squares = [t for t in tensors_of(inputs) if t.ndim == 2 and t.shape[0] == t.shape[1]]
    return int(squares[0].shape[0]) if squares else None


class _Propagation(TorchFunctionMode):
    """Counts, during one forward pass, the calls that multiply node features by an adjacency candidate
    (or by a tensor derived from one: ``adj.t()``, ``adj.coalesce()``, an attention matrix masked by it)."""

    def __init__(self, candidates: list[Tensor], n: int) -> None:
        super().__init__()
        self.n = n
        self.weight: dict[int, int] = {id(t): 1 for t in candidates}  # hops one product by it advances
        self.origin: dict[int, int] = {id(t): id(t) for t in candidates}
        self.alive: list[Tensor] = list(candidates)  # keeps ids unique while tracked
        self.hops = 0
        self.used: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor):
            return out
        arguments = tensors_of(list(args)) + tensors_of(list(kwargs.values()))
        tracked = [a for a in arguments if id(a) in self.weight]
        if not tracked:
            return out
        product = getattr(func, "__name__", "") in _PRODUCTS
        weights = [self.weight[id(a)] for a in tracked]
        weight = sum(weights) if product else max(weights)
        origin = self.origin[id(tracked[0])]
        n = self.n
        if out.ndim == 2 and tuple(out.shape) == (n, n):
            self.weight[id(out)] = weight
            self.origin[id(out)] = origin
            self.alive.append(out)
        elif (
            product
            and out.ndim >= 1
            and out.shape[0] == n
            and any(
                id(a) not in self.weight and not isinstance(a, nn.Parameter) and a.ndim >= 1 and a.shape[0] == n
                for a in arguments
            )
        ):
            self.hops += weight
            self.used.update(self.origin[id(a)] for a in tracked)
        return out


def _read_graph(
    module: nn.Module, inputs: Any, forward: Forward, targets: Tensor | None
) -> tuple[int, list[Tensor], int, list[Tensor]] | None:
    """``(N, adjacencies, hops, all (N, N) candidates)`` when an ``(N, N)`` input, or an ``(N, N)`` tensor the
    model holds (a buffer: code written for one fixed graph), multiplies node features in ``forward``;
    ``None`` when there is no ``(N, N)`` candidate. Runs the model once, without gradients."""
    n = _node_count(inputs, targets)
    if n is None or n < 2:
        return None
    candidates = [
        t
        for t in tensors_of(inputs) + held_tensors(module)
        if t.ndim == 2 and tuple(t.shape) == (n, n) and (t.is_floating_point() or is_sparse(t) or t.dtype == torch.bool)
    ]
    if not candidates:
        edges = [t for t in tensors_of(inputs) if is_edge_list(t, n)]
        if edges and any(
            t.is_floating_point() or is_sparse(t) for t in tensors_of(inputs) if t.ndim >= 1 and t.shape[0] == n
        ):
            return n, [], 0, edges  # an edge list: how far messages travel through it cannot be counted
        return None
    mode = _Propagation(candidates, n)
    try:
        with torch.no_grad(), mode:
            forward(module, inputs)
    except Exception:  # noqa: BLE001 - e.g. a compiled forward refusing the mode: the per-example probe runs
        return None  # the forward again, and a user's error surfaces there, unchanged
    used = [t for t in candidates if id(t) in mode.used]
    return n, used, mode.hops, candidates


def _neighbourhoods(adjacencies: list[Tensor], n: int, hops: int, nodes: Tensor) -> Tensor:
    """``(len(nodes), N)``: True where a node is within ``hops`` edges of a probed node, edges of every
    adjacency followed both ways (a model may propagate with ``adj`` or ``adj.T``)."""
    rows, cols = [], []
    for a in adjacencies:
        index = a.to_sparse_coo().coalesce().indices() if is_sparse(a) else a.nonzero().T
        rows.append(index[0].cpu())
        cols.append(index[1].cpu())
    src = torch.cat(rows + cols)
    dst = torch.cat(cols + rows)
    reach = torch.zeros(len(nodes), n, dtype=torch.bool)
    reach[torch.arange(len(nodes)), nodes] = True
    for _ in range(hops):
        step = reach.clone()
        hit = reach[:, src]  # (nodes, edges): the edge leaves a reached node
        where = hit.nonzero()
        step[where[:, 0], dst[where[:, 1]]] = True
        reach = step
    return reach


class _GraphRunner(_Runner):
    """A runner whose leaks are dependencies outside the allowed neighbourhood of the node being probed."""

    allowed: Tensor | None = None

    def leaks(self, rel: Tensor) -> Tensor:
        leaked = rel > self.tolerance
        return leaked if self.allowed is None else leaked & ~self.allowed.to(leaked.device)


def _not_a_graph_model(n: int, candidates: list[Tensor]) -> LeakageNotApplicable:
    seen = ", ".join(_describe_tensor(t) for t in candidates)
    if all(tuple(t.shape) != (n, n) for t in candidates):
        what = f"an edge list over the {n} examples ({seen})"
        unseen = "how far messages travel along an edge list cannot be counted from `forward`"
    else:
        what = f"an ({n}, {n}) matrix over the {n} examples ({seen})"
        unseen = (
            "`forward` did not multiply node features by it where the probe can see (`adj @ h`, "
            "`torch.sparse.mm(adj, h)`)"
        )
    return LeakageNotApplicable(
        f"the inputs hold {what}: they look like the nodes of one graph, and a node depends on its neighbours "
        f"by design, so they are not held to per-example independence; {unseen}, so the neighbourhood each "
        "node may depend on is unknown and was not checked. To probe the nodes as independent examples "
        "anyway (on the subgraph of the first `num_examples` nodes), pass `graph=False`."
    )


def _probe_graph(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    n: int,
    adjacencies: list[Tensor],
    hops: int,
    output_batch_dim: int | None,
    num_examples: int,
    tolerance: float,
    seed: int,
) -> LeakageReport:
    skip = {id(a) for a in adjacencies}
    leaves: list[_Probe] = []

    def leaf(t: Tensor) -> Tensor:
        if id(t) not in skip and t.is_floating_point() and t.ndim >= 1 and t.shape[0] == n:
            probe, fed = _probe_leaf(t)
            leaves.append(_Probe(f"node input {_describe_tensor(t)}", probe, 0))
            return fed
        return t

    probe_inputs = map_tensors(inputs, leaf)
    if not leaves:
        raise NoGradientPath(
            f"the examples are the {n} nodes of one graph, but no floating-point input has a row per node, so "
            "there is nowhere to read a gradient. Pass `inputs=` returning the node feature matrix and the "
            "adjacency."
        )
    names = {m: name for name, m in module.named_modules()}
    recorded: list[tuple[str, str, Tensor, int]] = []

    def record_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = out if isinstance(out, Tensor) else next(iter(tensors_of(out)), None)
        if (
            t is not None
            and t.is_floating_point()
            and t.requires_grad
            and not is_sparse(t)
            and t.ndim >= 1
            and t.shape[0] == n
        ):
            recorded.append((names.get(mod, "?"), _describe_module(mod), t, 0))

    handles = [
        m.register_forward_hook(record_hook)
        for m in module.modules()
        if m is not module and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    ]
    raw = _hooked_forward(module, forward, probe_inputs, handles)
    views = _output_views(raw, n, 0, output_batch_dim)
    if not views or not views[0][0].startswith("dim"):
        raise LeakageNotApplicable(
            f"the examples are the {n} nodes of one graph, but the output of shape {tuple(raw.shape)} has no "
            f"dimension of size {n}, so outputs cannot be mapped to nodes. Pass `output_batch_dim=`, or "
            "`forward=` returning one prediction per node."
        )
    if not torch.isfinite(raw.detach()).all():
        raise LeakageNotApplicable(
            "the model's outputs are not finite at initialisation, so gradients cannot be compared; fix the "
            "non-finite outputs first."
        )
    layout, out = views[0]
    b = min(num_examples, n)
    nodes = torch.linspace(0, n - 1, b).round().long().unique()
    b = len(nodes)
    allowed = _neighbourhoods(adjacencies, n, hops, nodes)
    runner = _GraphRunner(leaves, out, tolerance, seed)
    pairs: list[tuple[int, int]] = []
    dependency = torch.zeros(b, b)
    any_gradient = False
    within = 0
    first_leaking: int | None = None
    for row, i in enumerate(nodes.tolist()):
        rel = runner.example_gradient((torch.arange(n) == i).to(out.device), "graph nodes").cpu()
        any_gradient = any_gradient or bool((rel > 0).any())
        depends = rel > tolerance
        depends[i] = False
        dependency[row] = depends[nodes].float()
        outside = depends & ~allowed[row]
        within += int((depends & allowed[row]).sum())
        if bool(outside.any()) and first_leaking is None:
            first_leaking = row
        pairs += [(i, j) for j in outside.nonzero().flatten().tolist()]
    if not any_gradient:
        raise _NoGradient(
            "no gradient reaches the node inputs from the outputs (detached or constant outputs), so "
            "dependencies cannot be charted."
        )
    first_mixing = last_clean = note = None
    if first_leaking is not None:
        runner.allowed = allowed[first_leaking]
        first_mixing, last_clean, note = _locate_mixing(runner, recorded, int(nodes[first_leaking]), n)
    given = {id(t) for t in tensors_of(inputs)}
    adjacency = ", ".join(_describe_tensor(a) + ("" if id(a) in given else " held by the model") for a in adjacencies)
    reading = GraphReading(n, adjacency, hops, nodes.tolist(), allowed.sum(1).tolist(), within)
    return LeakageReport(
        num_examples=b,
        input_batch_dim=0,
        output_layout=f"{layout} (nodes)",
        probed=[p.name for p in leaves],
        leaking_pairs=pairs,
        pairs_exact=True,
        first_mixing_module=first_mixing,
        last_clean_module=last_clean,
        mixing_module_note=note,
        causal_checked=False,
        causal_reason="the examples are nodes of a graph, which has no time order",
        causal_violations=[],
        violating_cuts=[],
        cuts_checked=[],
        sequence_length=None,
        backward_passes=dict(runner.passes),
        tolerance=tolerance,
        dependency=dependency,
        graph=reading,
    )
