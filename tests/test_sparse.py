"""Sparse inputs and graph networks: no component crashes on a sparse tensor anywhere in a batch, and a model
whose examples are the nodes of one graph is held to its neighbourhood, not to per-example independence.

Unit tests per helper that meets a sparse tensor (against the same operation on the dense tensor), the probe
on a GCN (healthy, a softmax over the node axis, a dense adjacency, ``graph=False``), and real ``Trainer.fit``
runs with all six components on a full-batch GCN (tests/graph_models.py).
"""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_recipe import (
    BatchLeakageProbe,
    CheckStatus,
    FirstLayerVisualizer,
    InitLossCheck,
    OverfitOneBatch,
    PredictionDynamicsLogger,
    RecipeCheckError,
    UpdateRatioMonitor,
)
from lightning_recipe.callbacks._fixed_batch import _concat, _uniform
from lightning_recipe.callbacks.init_loss_check import _input_stats
from lightning_recipe.diagnostics.batch import BatchAdapter
from lightning_recipe.diagnostics.labels import conflicting_labels
from lightning_recipe.diagnostics.leakage import LeakageNotApplicable, probe_batch_leakage
from lightning_recipe.diagnostics.sparse import (
    all_finite,
    examples_in_loss,
    graph_adjacency,
    is_edge_list,
    slice_batch,
    take_along,
    value_stats,
)
from lightning_recipe.diagnostics.state import preserved
from tests.graph_models import (
    GCN,
    EdgeListGCN,
    FixedGraphGCN,
    edge_list_loader,
    fixed_graph_loader,
    graph_loader,
    sbm_graph,
)
from tests.models import trainer

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def _sparse_matrix(rows: int = 6, cols: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < 0.4)
    return dense.to_sparse()


# -- helpers that meet sparse tensors ---------------------------------------------------------------


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
@pytest.mark.parametrize("dim", [0, 1])
def test_take_along_cuts_sparse_tensors_like_dense_ones(layout, dim):
    x = _sparse_matrix()
    x = x if layout == torch.sparse_coo else x.to_sparse_csr()
    for index in (slice(1, 4), torch.tensor([4, 0, 2])):
        cut = take_along(x, index, dim)
        assert cut.layout == layout
        expected = x.to_dense()[(slice(None),) * dim + (index,)]
        torch.testing.assert_close(cut.to_dense(), expected)


def test_slice_batch_cuts_sparse_rows_and_takes_the_induced_subgraph_of_an_adjacency():
    x, adj, y = _sparse_matrix(6, 3), _sparse_matrix(6, 6, seed=1), torch.arange(6)
    cut_x, cut_adj, cut_y = slice_batch((x, adj, y), slice(0, 4), 6)
    torch.testing.assert_close(cut_x.to_dense(), x.to_dense()[:4])
    torch.testing.assert_close(cut_adj.to_dense(), adj.to_dense()[:4, :4])  # not (4, 6): edges stay consistent
    assert torch.equal(cut_y, y[:4])
    dense_square = torch.randn(6, 6)  # a dense (N, N) tensor is N examples of N features: rows only
    assert slice_batch(dense_square, slice(0, 4), 6).shape == (4, 6)


def test_value_stats_counts_the_implicit_zeros_of_a_sparse_tensor():
    x = _sparse_matrix(8, 7)
    stats, dense = value_stats(x), x.to_dense().double()
    assert stats is not None and stats["sparse"] and stats["finite"]
    assert math.isclose(stats["mean"], float(dense.mean()), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(stats["std"], float(dense.std()), rel_tol=1e-9)
    assert math.isclose(stats["abs_max"], float(dense.abs().max()), rel_tol=1e-9)
    assert value_stats(torch.zeros(3, dtype=torch.long).to_sparse()) is None


def test_non_finite_values_are_found_in_sparse_tensors():
    x = _sparse_matrix().coalesce()
    assert all_finite((x, torch.ones(2)))
    values = x.values().clone()
    values[0] = float("nan")
    broken = torch.sparse_coo_tensor(x.indices(), values, x.shape, check_invariants=False)
    assert not all_finite({"x": broken})
    stats = value_stats(broken)
    assert stats is not None and stats["finite"] is False


def test_init_loss_input_stats_read_a_sparse_feature_matrix():
    x = _sparse_matrix(10, 4)
    stats = _input_stats((x, torch.eye(10).to_sparse()))
    assert stats is not None
    assert math.isclose(stats["mean"], float(x.to_dense().double().mean()), rel_tol=1e-9, abs_tol=1e-12)


def test_slice_batch_cuts_sparse_tensors_on_the_first_batch_dim_that_fits():
    x, tokens = _sparse_matrix(6, 3), torch.arange(12).reshape(2, 6)  # time-major (T, N)
    cut_x, cut_tokens = slice_batch((x, tokens), slice(0, 2), 6, (0, 1))
    torch.testing.assert_close(cut_x.to_dense(), x.to_dense()[:2])
    assert torch.equal(cut_tokens, tokens[:, :2])


def test_prediction_dynamics_joins_sparse_batches_and_keeps_a_graph_whole():
    a, b = (_sparse_matrix(4, 3, seed=s) for s in (0, 1))
    joined = _concat([(a, torch.arange(4)), (b, torch.arange(4))])
    torch.testing.assert_close(joined[0].to_dense(), torch.cat([a.to_dense(), b.to_dense()]))
    assert _uniform((a, torch.arange(4)), 4)
    graph = sbm_graph(n=30)
    assert not _uniform((graph["x"], graph["adj"], graph["y"]), 30)  # cutting nodes would cut edges


def test_graph_adjacency_is_a_sparse_square_or_a_dense_one_beside_node_features():
    g = sbm_graph(n=30)
    assert graph_adjacency((g["x"], g["adj"], g["y"]), 30) is g["adj"]
    dense = g["adj"].to_dense()
    assert graph_adjacency((g["x"].to_dense(), dense, g["y"]), 30) is dense
    assert graph_adjacency((torch.randn(30, 30), g["y"]), 30) is None  # 30 examples of 30 features
    assert graph_adjacency((g["x"], g["adj"]), 16) is None


def test_an_adjacency_held_by_the_model_makes_the_batch_a_graph():
    g = sbm_graph(n=30)
    model = FixedGraphGCN(g["adj"])
    assert graph_adjacency((g["x"], g["y"]), 30, model) is model.adj
    assert graph_adjacency((g["x"], g["y"]), 30) is None
    masked = nn.Module()
    masked.register_buffer("mask", torch.ones(30, 30).tril())  # a dense (T, T) mask is not a graph
    assert graph_adjacency((torch.randn(30, 4), g["y"]), 30, masked) is None


def test_an_edge_list_beside_node_features_makes_the_batch_a_graph():
    g = sbm_graph(n=30)
    edges = g["adj"].indices()
    assert is_edge_list(edges, 30)
    assert not is_edge_list(edges, 20)  # node indices out of range
    assert not is_edge_list(torch.randint(0, 30, (2, 30)), 30)  # (2, N): two rows of N examples
    assert graph_adjacency((g["x"], edges, g["y"]), 30) is edges
    assert graph_adjacency((edges, g["y"]), 30) is None  # no node features beside it


def test_a_snapshot_restores_a_sparse_buffer_changed_in_place_or_rebound():
    module = nn.Module()
    adj = torch.eye(4).to_sparse().coalesce()
    module.register_buffer("adj", adj)
    before = adj.to_dense().clone()
    with preserved(module):
        module.adj._values().mul_(3)
    assert module.adj is adj and torch.equal(module.adj.to_dense(), before)
    with preserved(module):
        module.adj = (module.adj * 2).coalesce()
    assert module.adj is adj and torch.equal(module.adj.to_dense(), before)


@pytest.mark.parametrize("select", ["mask", "index", "all"])
def test_examples_in_loss_are_the_rows_the_loss_reads(select):
    g = sbm_graph(n=30)
    model = GCN()
    out_mask = g["train_mask"] if select != "all" else torch.ones(30, dtype=torch.bool)
    index = out_mask.nonzero().flatten()

    def loss():
        out = model(g["x"], g["adj"])
        rows = index if select == "index" else out_mask
        return F.nll_loss(out[rows], g["y"][rows])

    read = examples_in_loss(model, loss, 30)
    assert read is not None and torch.equal(read, out_mask)
    assert all(p.grad is None for p in model.parameters())


def test_conflicting_labels_compare_sparse_rows():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    assert torch.equal(conflicting_labels(x.to_sparse(), labels), conflicting_labels(x, labels))
    assert conflicting_labels(x.to_sparse(), labels).tolist() == [True, True, False]


def test_a_multi_input_forward_is_read_from_its_signature():
    model = GCN()
    g = sbm_graph()
    batch = (g["x"], g["adj"], g["y"], g["train_mask"])
    with torch.no_grad():
        adapter = BatchAdapter().fitted(model, batch)
    x, adj = adapter.get_inputs(batch)
    assert x is g["x"] and adj is g["adj"]
    assert adapter.get_targets(batch) is g["y"]  # the item after the inputs, not the adjacency
    with torch.no_grad():
        by_key = BatchAdapter().fitted(model, g)
    assert set(by_key.get_inputs(g)) == {"x", "adj"}
    assert by_key.get_targets(g) is g["y"]


# -- the leakage probe on sparse inputs and graphs -----------------------------------------------------


class SparseBagOfWords(nn.Module):
    """A per-example model on sparse bag-of-words rows; ``mix`` normalises over the batch (a leak)."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(20, 3)
        self.mix = mix

    def forward(self, x):
        h = torch.sparse.mm(x, self.fc.weight.T) + self.fc.bias
        return F.softmax(h, dim=0) if self.mix else h


def test_probe_reads_gradients_through_sparse_inputs():
    torch.manual_seed(0)
    x = (torch.rand(12, 20) < 0.3).float().to_sparse()
    healthy = probe_batch_leakage(SparseBagOfWords(), x, lambda m, v: m(v))
    assert not healthy.batch_leak and "sparse" in healthy.probed[0]
    leaky = probe_batch_leakage(SparseBagOfWords(mix=True), x, lambda m, v: m(v))
    assert leaky.batch_leak and len(leaky.leaking_pairs) == 12 * 11


def _graph_probe(model, g, **kwargs):
    return probe_batch_leakage(model, (g["x"], g["adj"]), lambda m, x: m(*x), targets=g["y"], **kwargs)


@pytest.mark.parametrize("dense_adjacency", [False, True])
def test_a_healthy_gcn_depends_on_its_two_hop_neighbourhood_only(dense_adjacency):
    torch.manual_seed(0)
    g = sbm_graph()
    if dense_adjacency:
        g = {**g, "adj": g["adj"].to_dense()}
    report = _graph_probe(GCN(), g)
    assert report.graph is not None and report.graph.hops == 2
    assert report.graph.dependencies_within > 0  # the message passing was seen
    assert not report.batch_leak


def test_a_softmax_over_the_node_axis_is_a_leak_beyond_the_graph():
    torch.manual_seed(0)
    report = _graph_probe(GCN(bug="softmax_over_nodes"), sbm_graph())
    assert report.batch_leak and report.pairs_exact
    assert report.mixing_module_note == "examples mix after the last layer, in the code of `forward`"
    i, j = report.leaking_pairs[0]
    assert i in report.graph.probed_nodes and j != i


@pytest.mark.parametrize("dense_adjacency", [False, True])
def test_graph_false_holds_nodes_to_independence_on_a_consistent_subgraph(dense_adjacency):
    torch.manual_seed(0)
    g = sbm_graph()
    if dense_adjacency:
        g = {**g, "x": g["x"].to_dense(), "adj": g["adj"].to_dense()}
    report = _graph_probe(GCN(), g, graph=False)
    assert report.graph is None and report.num_examples == 16
    edges = g["adj"].to_dense()[:16, :16] != 0
    edges.fill_diagonal_(False)
    assert edges.any()
    # neighbours inside the subgraph of the first 16 nodes are the "leaks" asked for
    assert {(int(i), int(j)) for i, j in edges.nonzero()} <= set(report.leaking_pairs)


class GatherGCN(nn.Module):
    """Message passing by gathering along a sparse adjacency's stored entries: no product the probe can
    count."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 3)

    def forward(self, x, adj):
        adj = adj.coalesce()
        src, dst = adj.indices()
        h = self.fc(x.to_dense())
        return torch.zeros_like(h).index_add(0, dst, h[src] * adj.values()[:, None])


def test_a_graph_whose_propagation_cannot_be_seen_is_skipped_saying_why_and_how_to_probe_anyway():
    with pytest.raises(
        LeakageNotApplicable,
        match=r"nodes of one graph.*not held to per-example independence.*"
        r"`graph=False`",
    ):
        _graph_probe(GatherGCN(), sbm_graph())


class MaskedAttention(nn.Module):
    """Per-example causal self-attention whose (T, T) mask buffer has the batch size's shape (T == N)."""

    def __init__(self, t: int = 8, d: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("mask", torch.ones(t, t).tril())

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        att = (q @ k.transpose(1, 2)).masked_fill(self.mask == 0, float("-inf")).softmax(-1)
        return att @ v


def test_a_square_mask_buffer_the_size_of_the_batch_is_not_read_as_a_graph():
    torch.manual_seed(0)
    x = torch.randn(8, 8, 4)
    report = probe_batch_leakage(MaskedAttention(), x, lambda m, v: m(v), targets=x, causal=True)
    assert report.graph is None and not report.batch_leak and report.causal_checked and not report.causal_leak


def test_an_edge_list_graph_is_skipped_saying_why_and_graph_false_probes_its_induced_subgraph():
    torch.manual_seed(0)
    g = sbm_graph()
    batch = (g["x"], g["adj"].indices())
    with pytest.raises(
        LeakageNotApplicable,
        match=r"edge list over the 120 examples \(\(2, \d+\) int64\).*"
        r"not held to per-example independence.*`graph=False`",
    ):
        probe_batch_leakage(EdgeListGCN(), batch, lambda m, x: m(*x), targets=g["y"])
    report = probe_batch_leakage(EdgeListGCN(), batch, lambda m, x: m(*x), targets=g["y"], graph=False)
    edges = g["adj"].to_dense()[:16, :16] != 0
    edges.fill_diagonal_(False)
    assert report.graph is None and report.batch_leak == bool(edges.any())


# -- through a real Trainer ---------------------------------------------------------------------------


def _six(**check_kwargs):
    return [
        InitLossCheck(**check_kwargs),
        OverfitOneBatch(**check_kwargs),
        BatchLeakageProbe(**check_kwargs),
        UpdateRatioMonitor(),
        PredictionDynamicsLogger(),
        FirstLayerVisualizer(),
    ]


@pytest.mark.parametrize("batch_style", ["tuple", "dict"])
def test_all_six_components_on_a_healthy_gcn(batch_style):
    L.seed_everything(0)
    callbacks = _six()
    model = GCN(batch_style=batch_style)
    trainer(max_steps=200, callbacks=callbacks).fit(model, graph_loader(batch_style, labelled_every=1))
    init, overfit, probe = (c.result for c in callbacks[:3])
    assert init.status is CheckStatus.PASSED, init.summary
    assert overfit.status is CheckStatus.PASSED, overfit.summary
    assert "whole graph was fitted" in overfit.summary
    assert probe.status is CheckStatus.PASSED, probe.summary
    assert "2-hop neighbourhood" in probe.summary
    for monitor in callbacks[3:]:
        assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]
    assert callbacks[5].layer_name == "gc1"


def test_all_six_components_on_a_gcn_that_holds_its_graph():
    L.seed_everything(0)
    callbacks = _six()
    adj, loader = fixed_graph_loader(labelled_every=1)
    trainer(max_steps=60, callbacks=callbacks).fit(FixedGraphGCN(adj), loader)
    init, overfit, probe = (c.result for c in callbacks[:3])
    assert init.status is CheckStatus.PASSED, init.summary
    assert overfit.status is CheckStatus.PASSED and "held by the model" in overfit.summary, overfit.summary
    assert probe.status is CheckStatus.PASSED and "held by the model" in probe.summary, probe.summary
    for monitor in callbacks[3:]:
        assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]


def test_all_six_components_on_an_edge_list_gcn():
    L.seed_everything(0)
    callbacks = _six()
    trainer(max_steps=60, callbacks=callbacks).fit(EdgeListGCN(), edge_list_loader(labelled_every=1))
    init, overfit, probe = (c.result for c in callbacks[:3])
    assert init.status is CheckStatus.PASSED, init.summary
    assert overfit.status is CheckStatus.PASSED and "edge list" in overfit.summary, overfit.summary
    assert probe.status is CheckStatus.SKIPPED and "`graph=False`" in probe.summary, probe.summary
    for monitor in callbacks[3:]:
        assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]


def test_all_six_components_on_a_gcn_trained_on_masked_nodes():
    """Half the nodes carry a training label: OverfitOneBatch fits the whole graph and holds the predictions
    to the labels the loss reads, not to the labels of nodes it never trains on."""
    L.seed_everything(0)
    callbacks = _six()
    trainer(max_steps=200, callbacks=callbacks).fit(GCN(), graph_loader("tuple"))
    init, overfit, probe = (c.result for c in callbacks[:3])
    assert init.status is CheckStatus.PASSED, init.summary
    assert overfit.status is CheckStatus.PASSED, overfit.summary
    assert "The loss reads 60 of the 120 node labels" in overfit.summary
    assert overfit.details["graph_nodes"] == 120
    assert probe.status is CheckStatus.PASSED, probe.summary
    for monitor in callbacks[3:]:
        assert monitor.enabled and monitor.alerts == [], [a.message for a in monitor.alerts]


def test_the_probe_stops_a_gcn_that_normalises_over_the_nodes():
    L.seed_everything(0)
    with pytest.raises(
        RecipeCheckError,
        match=r"node outputs reach beyond the graph.*output of node \d+ depends "
        r"on node \d+",
    ) as caught:
        trainer(callbacks=[BatchLeakageProbe()]).fit(GCN(bug="softmax_over_nodes"), graph_loader())
    assert "log_softmax(x, dim=0)" in caught.value.result.hint


def _final_weights(callbacks, labelled_every, steps=30):
    L.seed_everything(0)
    model = GCN()
    loader = graph_loader("tuple", labelled_every=labelled_every)
    trainer(max_steps=steps, deterministic=True, callbacks=callbacks).fit(model, loader)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("labelled_every", [1, 2])
def test_a_seeded_gcn_run_ends_bit_identical_with_and_without_the_components(labelled_every):
    without = _final_weights([], labelled_every)
    with_them = _final_weights(_six(), labelled_every)
    assert without.keys() == with_them.keys()
    for key in without:
        assert torch.equal(without[key], with_them[key]), key
