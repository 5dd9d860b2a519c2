"""The probe of independent examples: where the batch is, which examples to probe, one traced forward pass, and
the passes for each way of reading the output (a batch dim, a flattened ``(B*T, ...)`` layout, or the last
layer that passes a gradient when the model's output passes none).

Hypotheses come most likely first; a later one is tried only when the earlier show a leak, since a wrong guess
for the batch dim looks like a leak and a right one does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_recipe.diagnostics.leakage.causal import causal_passes
from lightning_recipe.diagnostics.leakage.evidence import (
    CausalPlan,
    CausalReading,
    LeakageNotApplicable,
    LeakageReport,
    Mixing,
    NoGradient,
    NoGradientPath,
    ProbeSettings,
    assemble_report,
)
from lightning_recipe.diagnostics.leakage.passes import (
    Forward,
    Probe,
    Recorded,
    Runner,
    batch_dependencies,
    dim_views,
    hooked_forward,
    locate_mixing,
    probe_leaf,
    record,
)
from lightning_recipe.diagnostics.sparse import graph_adjacency, is_edge_list, is_sparse, slice_batch
from lightning_recipe.diagnostics.task import is_int
from lightning_recipe.diagnostics.walk import map_tensors, tensors_of

__all__ = ["input_batch_dims", "probe_examples"]

T = TypeVar("T")


# -- hypotheses about where the batch is ------------------------------------------------------------


def input_batch_dims(inputs: Any, targets: Tensor | None, batch_dim: int | None) -> list[int]:
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
    x = next((t for t in tensors if t.is_floating_point() or is_int(t)), tensors[0])
    # (T, N, F) float sequences or (T, N) tokens may carry the batch on dim 1
    dims = [0, 1] if (x.ndim >= 3 or (x.ndim == 2 and is_int(x))) else [0]
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


def _edges_within(edges: Tensor, b: int) -> Tensor:
    """The edges of a ``(2, E)`` edge list between the first ``b`` nodes: the induced subgraph's."""
    return edges[:, (edges < b).all(0)]


def _examples(inputs: Any, in_dim: int, num_examples: int) -> tuple[Any, int]:
    """The inputs cut to the examples probed, and their number ``b``."""
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
        inputs = slice_batch(inputs, slice(0, b), n, (in_dim,))
        inputs = map_tensors(inputs, lambda t: _edges_within(t, b) if is_edge_list(t, n) else t)
    return inputs, b


def _output_views(out: Tensor, b: int, in_dim: int, output_batch_dim: int | None) -> list[tuple[str, Tensor]]:
    """Ways to read the output with the examples on dim 0, most likely first: a dim of size ``b``, or the
    output flattened ``(B*T, ...)`` or ``(T*B, ...)``."""
    views = dim_views(out, b, in_dim, output_batch_dim)
    if output_batch_dim is None and out.ndim >= 1 and out.shape[0] % b == 0 and out.shape[0] > b:
        k, rest = out.shape[0] // b, out.shape[1:]
        example_major = ("flattened (B*T, ...) example-major", out.reshape(b, k, *rest))
        time_major = ("flattened (T*B, ...) time-major", out.reshape(k, b, *rest).movedim(1, 0))
        views += [example_major, time_major] if in_dim == 0 else [time_major, example_major]
    return views[:4]


# -- one traced forward pass ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Traced:
    """One forward pass: the probe leaves (inputs, embedding outputs), the recorded layer outputs, the output."""

    leaves: list[Probe]
    recorded: list[Recorded]
    output: Tensor


def _make_leaves(inputs: Any, b: int, in_dim: int) -> tuple[Any, list[Probe]]:
    leaves: list[Probe] = []

    def leaf(t: Tensor) -> Tensor:
        if t.is_floating_point() and t.ndim > in_dim and t.shape[in_dim] == b:
            probe, fed = probe_leaf(t)
            leaves.append(Probe(f"input {tuple(t.shape)}{' (sparse)' if is_sparse(t) else ''}", probe, in_dim))
            return fed
        return t

    return map_tensors(inputs, leaf), leaves


class _Tracer:
    """The forward hooks of one traced pass. Integer token inputs carry no gradient, so an ``nn.Embedding``
    that reads one of the batch gets a probe leaf in place of its output; every other module's floating-point
    output with a dimension of ``b`` is recorded for :func:`locate_mixing`."""

    def __init__(self, module: nn.Module, inputs: Any, leaves: list[Probe], b: int, in_dim: int) -> None:
        self.int_shapes = {
            tuple(t.shape) for t in tensors_of(inputs) if is_int(t) and t.ndim > in_dim and t.shape[in_dim] == b
        }
        self.names = {m: name for name, m in module.named_modules()}
        self.leaves = leaves
        self.recorded: list[Recorded] = []
        self.b = b
        self.in_dim = in_dim

    def embedding_hook(self, mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        idx = args[0] if args else None
        if (
            isinstance(idx, Tensor)
            and tuple(idx.shape) in self.int_shapes
            and isinstance(out, Tensor)
            and out.is_floating_point()
        ):
            probe = out.detach().requires_grad_(True)
            self.leaves.append(Probe(f"embedding `{self.names.get(mod, '?')}` output", probe, self.in_dim))
            return probe.clone()
        return None

    def record_hook(self, mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = out if isinstance(out, Tensor) else next(iter(tensors_of(out)), None)
        if t is None or not t.is_floating_point() or not t.requires_grad:
            return
        dims = [d for d in range(t.ndim) if t.shape[d] == self.b]
        if dims:
            d = self.in_dim if self.in_dim in dims else dims[0]
            self.recorded.append(record(self.names.get(mod, "?"), mod, t, d))

    def attach(self, module: nn.Module) -> list[Any]:
        handles = []
        for m in module.modules():
            if isinstance(m, nn.Embedding) and self.int_shapes:
                handles.append(m.register_forward_hook(self.embedding_hook))
            elif m is not module and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                # children complete (and are recorded) before their parents: completion order
                handles.append(m.register_forward_hook(self.record_hook))
        return handles


def _trace(module: nn.Module, forward: Forward, inputs: Any, b: int, in_dim: int) -> _Traced:
    probe_inputs, leaves = _make_leaves(inputs, b, in_dim)
    tracer = _Tracer(module, inputs, leaves, b, in_dim)
    raw = hooked_forward(module, forward, probe_inputs, tracer.attach(module))
    if not leaves:
        raise NoGradientPath(
            "the model takes no floating-point input with a batch dimension and no `nn.Embedding` reads its "
            "integer input, so there is nowhere to read a gradient. Pass `inputs=` returning the float "
            "tensor(s) (or token ids fed to an `nn.Embedding`)."
        )
    return _Traced(leaves=leaves, recorded=tracer.recorded, output=raw)


def _checked_views(raw: Tensor, b: int, in_dim: int, output_batch_dim: int | None) -> list[tuple[str, Tensor]]:
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
    return views


# -- the passes for one reading of the output -------------------------------------------------------


def _run_passes(
    traced: _Traced, view: tuple[str, Tensor], b: int, in_dim: int, settings: ProbeSettings, plan: CausalPlan
) -> LeakageReport:
    """The batch passes on one reading of the output (``view``: its layout and the tensor, examples on dim 0),
    where mixing starts when examples mix, else the causal passes when wanted."""
    layout, out = view
    runner = Runner(traced.leaves, out, settings.tolerance, settings.seed)
    dependencies = batch_dependencies(runner, b, settings.max_exact_rows)
    pairs = dependencies.pairs
    mixing = locate_mixing(runner, traced.recorded, pairs[0][0], b) if pairs else Mixing()
    if plan.wanted and pairs:
        causal = CausalReading(checked=False, reason=f"{plan.reason}; not checked while examples mix (fix that first)")
    elif plan.wanted:
        causal = causal_passes(runner, b, in_dim, settings.time_dim, plan.reason, settings.max_causal_passes)
    else:
        causal = CausalReading(checked=False, reason=plan.reason)
    return assemble_report(
        num_examples=b,
        input_batch_dim=in_dim,
        output_layout=layout,
        probed=[p.name for p in runner.leaves],
        dependencies=dependencies,
        mixing=mixing,
        causal=causal,
        backward_passes=dict(runner.passes),
        tolerance=runner.tolerance,
    )


def _probe_last_layer(
    traced: _Traced, b: int, in_dim: int, settings: ProbeSettings, plan: CausalPlan
) -> LeakageReport | None:
    """No gradient reaches the inputs from the output (e.g. a zero-initialised final layer): chart the
    dependencies of the last layer outputs that do pass one; mixing after that layer stays unseen."""
    for layer in reversed(traced.recorded[-8:]):
        layout = (
            f"output of layer `{layer.name}` ({layer.kind}): no gradient reaches the inputs from the model output "
            "(zero-initialised final layer?), so the last layer that passes one was probed"
        )
        try:
            fallback = _run_passes(traced, (layout, layer.tensor.movedim(layer.dim, 0)), b, in_dim, settings, plan)
        except (NoGradient, RuntimeError):
            continue
        return replace(fallback, probed_layer=layer.name)
    return None


def _first_without_leak(
    candidates: Iterable[T], probe: Callable[[T], LeakageReport], skip: type[LeakageNotApplicable]
) -> tuple[LeakageReport | None, list[LeakageNotApplicable]]:
    """``probe`` each candidate in turn: the first report without a leak, else the first with one, else ``None``;
    and the ``skip`` errors of the candidates that could not be probed."""
    first: LeakageReport | None = None
    errors: list[LeakageNotApplicable] = []
    for candidate in candidates:
        try:
            report = probe(candidate)
        except skip as error:
            errors.append(error)
            continue
        if not report.batch_leak:
            return report, errors
        first = first or report
    return first, errors


def _probe_at_batch_dim(
    module: nn.Module, inputs: Any, forward: Forward, in_dim: int, settings: ProbeSettings, plan: CausalPlan
) -> LeakageReport:
    """The examples on dim ``in_dim`` of the inputs, each reading of the output in turn: the first without a
    leak, else the first with one, else the last layer that passes a gradient."""
    inputs, b = _examples(inputs, in_dim, settings.num_examples)
    traced = _trace(module, forward, inputs, b, in_dim)
    report, no_gradient = _first_without_leak(
        _checked_views(traced.output, b, in_dim, settings.output_batch_dim),
        lambda view: _run_passes(traced, view, b, in_dim, settings, plan),
        NoGradient,
    )
    report = report or _probe_last_layer(traced, b, in_dim, settings, plan)
    if report is None:
        raise no_gradient[-1]
    return report


def probe_examples(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    hypotheses: list[int],
    settings: ProbeSettings,
    plan: CausalPlan,
) -> LeakageReport:
    """Each batch-dim hypothesis in turn: the first report without a leak, else the first with one, else the
    first reason none could be probed."""
    report, errors = _first_without_leak(
        hypotheses,
        lambda in_dim: _probe_at_batch_dim(module, inputs, forward, in_dim, settings, plan),
        LeakageNotApplicable,
    )
    if report is None:
        raise errors[0] if errors else LeakageNotApplicable("no batch dimension found")
    return report
