"""Graph batches: the examples are the nodes of one graph.

Full-batch node classification feeds the whole graph as one batch: node features ``(N, F)`` and an ``(N, N)``
adjacency (sparse or dense). A node's output depends on its neighbours by design, so the test of independent
examples would call every healthy graph network leaky. What a node may depend on is known, though: a model
that multiplies node features by the adjacency ``k`` times in ``forward`` (``adj @ h``,
``torch.sparse.mm(adj, h)``) reaches the ``k``-hop neighbourhood, and nothing else. The probe counts those
propagations in one forward pass (a TorchFunctionMode watches which calls take the adjacency or a tensor
derived from it), then holds a sample of nodes to their neighbourhood: a dependency on a node outside it (a
softmax or statistics over the node axis) is a leak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe.diagnostics.leakage.evidence import (
    BatchDependencies,
    CausalReading,
    GraphReading,
    LeakageNotApplicable,
    LeakageReport,
    Mixing,
    NoGradient,
    NoNodeFeatures,
    ProbeSettings,
    assemble_report,
)
from lightning_recipe.diagnostics.leakage.passes import (
    Forward,
    Probe,
    Recorded,
    Runner,
    dim_views,
    hooked_forward,
    locate_mixing,
    probe_leaf,
    record,
)
from lightning_recipe.diagnostics.sparse import held_tensors, is_edge_list, is_sparse
from lightning_recipe.diagnostics.walk import map_tensors, tensors_of

__all__ = ["FoundGraph", "not_a_graph_model", "probe_graph", "read_graph"]

_PRODUCTS = frozenset(
    {"mm", "matmul", "__matmul__", "__rmatmul__", "spmm", "_sparse_mm", "bmm", "addmm", "sparse_mm", "mv", "einsum"}
)


def _describe_tensor(t: Tensor) -> str:
    if is_sparse(t):
        return f"sparse {tuple(t.shape)}"
    return f"dense {tuple(t.shape)}" if t.is_floating_point() else f"{tuple(t.shape)} {str(t.dtype)[6:]}"


def _node_count(inputs: Any, targets: Tensor | None) -> int | None:
    if targets is not None and targets.ndim >= 1:
        return int(targets.shape[0])
    squares = [t for t in tensors_of(inputs) if t.ndim == 2 and t.shape[0] == t.shape[1]]
    return int(squares[0].shape[0]) if squares else None


# -- reading the graph: which (N, N) tensors `forward` propagates node features through, how often ----


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


@dataclass(frozen=True)
class FoundGraph:
    """What :func:`read_graph` found: ``N`` nodes, the adjacencies ``forward`` propagates through and how many
    times (none for an edge list: how far messages travel along one cannot be counted), and every candidate."""

    num_nodes: int
    adjacencies: list[Tensor]
    hops: int
    candidates: list[Tensor]


def read_graph(module: nn.Module, inputs: Any, forward: Forward, targets: Tensor | None) -> FoundGraph | None:
    """The graph when an ``(N, N)`` input, or an ``(N, N)`` tensor the model holds (a buffer: code written for one
    fixed graph), multiplies node features in ``forward``, or when an edge list over the nodes is among the
    inputs; ``None`` when there is no candidate. Runs the model once, without gradients."""
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
            return FoundGraph(n, [], 0, edges)
        return None
    mode = _Propagation(candidates, n)
    try:
        with torch.no_grad(), mode:
            forward(module, inputs)
    except Exception:  # noqa: BLE001 - e.g. a compiled forward refusing the mode: the per-example probe runs
        return None  # the forward again, and a user's error surfaces there, unchanged
    used = [t for t in candidates if id(t) in mode.used]
    return FoundGraph(n, used, mode.hops, candidates)


def not_a_graph_model(n: int, candidates: list[Tensor]) -> LeakageNotApplicable:
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


# -- probing the nodes: each held to its neighbourhood ----------------------------------------------


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


class _GraphRunner(Runner):
    """A runner whose leaks are dependencies outside the allowed neighbourhood of the node being probed."""

    allowed: Tensor | None = None

    def leaks(self, rel: Tensor) -> Tensor:
        leaked = rel > self.tolerance
        return leaked if self.allowed is None else leaked & ~self.allowed.to(leaked.device)


def _node_leaves(inputs: Any, graph: FoundGraph) -> tuple[Any, list[Probe]]:
    """Probe leaves in place of the floating-point inputs with a row per node (the adjacencies excluded)."""
    n = graph.num_nodes
    skip = {id(a) for a in graph.adjacencies}
    leaves: list[Probe] = []

    def leaf(t: Tensor) -> Tensor:
        if id(t) not in skip and t.is_floating_point() and t.ndim >= 1 and t.shape[0] == n:
            probe, fed = probe_leaf(t)
            leaves.append(Probe(f"node input {_describe_tensor(t)}", probe, 0))
            return fed
        return t

    probe_inputs = map_tensors(inputs, leaf)
    if not leaves:
        raise NoNodeFeatures(
            f"the examples are the {n} nodes of one graph, but no floating-point input has a row per node, so "
            "there is nowhere to read a gradient. Pass `inputs=` returning the node feature matrix and the "
            "adjacency."
        )
    return probe_inputs, leaves


def _trace_nodes(module: nn.Module, forward: Forward, probe_inputs: Any, n: int) -> tuple[Tensor, list[Recorded]]:
    """The output of one forward pass, and the layer outputs with a row per node, in completion order."""
    names = {m: name for name, m in module.named_modules()}
    recorded: list[Recorded] = []

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
            recorded.append(record(names.get(mod, "?"), mod, t, 0))

    handles = [
        m.register_forward_hook(record_hook)
        for m in module.modules()
        if m is not module and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    ]
    return hooked_forward(module, forward, probe_inputs, handles), recorded


def _node_output(raw: Tensor, n: int, output_batch_dim: int | None) -> tuple[str, Tensor]:
    """The output with the nodes on dim 0, and how it was read."""
    views = dim_views(raw, n, 0, output_batch_dim)
    if not views:
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
    return views[0]


@dataclass(frozen=True)
class _NodeCharts:
    """The dependencies of each probed node: those outside its neighbourhood (``dependencies.pairs``, by node
    index), how many inside, and the row of the first node with one outside."""

    dependencies: BatchDependencies
    within: int
    first_leaking: int | None


def _chart_nodes(runner: _GraphRunner, nodes: Tensor, allowed: Tensor, n: int) -> _NodeCharts:
    """One pass per probed node, its output as the source; gradient on a node outside its neighbourhood is a leak."""
    b = len(nodes)
    pairs: list[tuple[int, int]] = []
    dependency = torch.zeros(b, b)
    any_gradient = False
    within = 0
    first_leaking: int | None = None
    for row, i in enumerate(nodes.tolist()):
        rel = runner.example_gradient((torch.arange(n) == i).to(runner.out.device), "graph nodes").cpu()
        any_gradient = any_gradient or bool((rel > 0).any())
        depends = rel > runner.tolerance
        depends[i] = False
        dependency[row] = depends[nodes].float()
        outside = depends & ~allowed[row]
        within += int((depends & allowed[row]).sum())
        if bool(outside.any()) and first_leaking is None:
            first_leaking = row
        pairs += [(i, j) for j in outside.nonzero().flatten().tolist()]
    if not any_gradient:
        raise NoGradient(
            "no gradient reaches the node inputs from the outputs (detached or constant outputs), so "
            "dependencies cannot be charted."
        )
    return _NodeCharts(BatchDependencies(pairs=pairs, exact=True, dependency=dependency), within, first_leaking)


def probe_graph(
    module: nn.Module, inputs: Any, forward: Forward, graph: FoundGraph, settings: ProbeSettings
) -> LeakageReport:
    """Each of a sample of nodes held to the neighbourhood ``graph.hops`` propagations reach."""
    n = graph.num_nodes
    probe_inputs, leaves = _node_leaves(inputs, graph)
    raw, recorded = _trace_nodes(module, forward, probe_inputs, n)
    layout, out = _node_output(raw, n, settings.output_batch_dim)
    nodes = torch.linspace(0, n - 1, min(settings.num_examples, n)).round().long().unique()
    allowed = _neighbourhoods(graph.adjacencies, n, graph.hops, nodes)
    runner = _GraphRunner(leaves, out, settings.tolerance, settings.seed)
    charts = _chart_nodes(runner, nodes, allowed, n)
    mixing = Mixing()
    if charts.first_leaking is not None:
        runner.allowed = allowed[charts.first_leaking]
        mixing = locate_mixing(runner, recorded, int(nodes[charts.first_leaking]), n)
    given = {id(t) for t in tensors_of(inputs)}
    adjacency = ", ".join(
        _describe_tensor(a) + ("" if id(a) in given else " held by the model") for a in graph.adjacencies
    )
    reading = GraphReading(n, adjacency, graph.hops, nodes.tolist(), allowed.sum(1).tolist(), charts.within)
    return assemble_report(
        num_examples=len(nodes),
        input_batch_dim=0,
        output_layout=f"{layout} (nodes)",
        probed=[p.name for p in leaves],
        dependencies=charts.dependencies,
        mixing=mixing,
        causal=CausalReading(checked=False, reason="the examples are nodes of a graph, which has no time order"),
        backward_passes=dict(runner.passes),
        tolerance=settings.tolerance,
        graph=reading,
    )
