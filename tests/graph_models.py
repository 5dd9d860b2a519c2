"""A graph convolutional network as its users write it without PyG, and procedural graph data.

Full-batch node classification (Kipf & Welling; the ``pygcn`` reference code): ``x`` a sparse COO ``(N, F)``
bag-of-words feature matrix, ``adj`` the normalised sparse COO ``(N, N)`` adjacency with self-loops, layers
``adj @ (x @ W)``, ``y`` ``(N,)`` node labels and a train mask; one batch is the whole graph, served by a
DataLoader over a one-item dataset. The graph is a stochastic block model: nodes of a class link more often
to each other, and each class favours its own words, so a 2-layer GCN learns it well.

Module level, so subprocesses can import them.
"""

from __future__ import annotations

import math

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


def sbm_graph(
    n: int = 120,
    classes: int = 3,
    features: int = 48,
    p_in: float = 0.08,
    p_out: float = 0.005,
    words: int = 6,
    labelled_every: int = 2,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A stochastic block model graph with class-dependent sparse features, as ``pygcn`` prepares Cora:
    row-normalised sparse features, ``D^-1/2 (A + I) D^-1/2`` sparse adjacency, labels, a train mask.

    Returns a dict with ``x`` (sparse COO ``(n, features)``), ``adj`` (sparse COO ``(n, n)``), ``y`` ``(n,)``
    and ``train_mask`` ``(n,)`` (every ``labelled_every``-th node; 1: every node)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    same = y[:, None] == y[None, :]
    upper = torch.rand(n, n, generator=g) < torch.where(same, p_in, p_out)
    a = torch.triu(upper, diagonal=1)
    a = (a | a.T).float() + torch.eye(n)
    d = a.sum(1).rsqrt()
    adj = (d[:, None] * a * d[None, :]).to_sparse()
    # each class draws most of its words from its own block of the vocabulary
    block = features // classes
    own = torch.randint(0, block, (n, words), generator=g) + (y * block)[:, None]
    noise = torch.randint(0, features, (n, words // 2), generator=g)
    counts = torch.zeros(n, features)
    counts.scatter_(1, torch.cat([own, noise], 1), 1.0)
    x = (counts / counts.sum(1, keepdim=True)).to_sparse()
    return {"x": x.coalesce(), "adj": adj.coalesce(), "y": y, "train_mask": torch.arange(n) % labelled_every == 0}


class GraphConvolution(nn.Module):
    """``adj @ (x @ W) + b``, the ``pygcn`` layer; ``x`` may be sparse (first layer) or dense."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        stdv = 1.0 / math.sqrt(out_features)
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.uniform_(self.bias, -stdv, stdv)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        support = torch.mm(x, self.weight)
        return torch.sparse.mm(adj, support) + self.bias


class GCN(L.LightningModule):
    """Two graph convolutions, ReLU, dropout, ``log_softmax`` over classes and ``nll_loss`` on the train
    nodes, Adam at 1e-2 with weight decay 5e-4: ``pygcn``'s training program.

    ``batch_style`` says how the batch arrives: ``"tuple"`` ``(x, adj, y, train_mask)`` or ``"dict"``.
    ``bug="softmax_over_nodes"`` normalises the outputs over the node axis (``log_softmax(dim=0)``): every
    node's prediction then depends on every other node, not only on its neighbours (a leak)."""

    def __init__(
        self,
        features: int = 48,
        hidden: int = 16,
        classes: int = 3,
        dropout: float = 0.5,
        lr: float = 1e-2,
        batch_style: str = "tuple",
        bug: str | None = None,
    ) -> None:
        super().__init__()
        self.gc1 = GraphConvolution(features, hidden)
        self.gc2 = GraphConvolution(hidden, classes)
        self.dropout = dropout
        self.lr = lr
        self.batch_style = batch_style
        self.bug = bug

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = F.relu(self.gc1(x, adj))
        h = F.dropout(h, self.dropout, training=self.training)
        h = self.gc2(h, adj)
        return F.log_softmax(h, dim=0 if self.bug == "softmax_over_nodes" else 1)

    def _unpack(self, batch):
        if self.batch_style == "dict":
            return batch["x"], batch["adj"], batch["y"], batch["train_mask"]
        return batch

    def training_step(self, batch, batch_idx):
        x, adj, y, mask = self._unpack(batch)
        loss = F.nll_loss(self(x, adj)[mask], y[mask])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=5e-4)


def graph_loader(batch_style: str = "tuple", **graph_kwargs) -> DataLoader:
    """One batch per epoch, the whole graph: a one-item dataset with ``collate_fn=lambda items: items[0]``
    (tuple style) or ``batch_size=None`` (dict style), as full-batch GCN code does."""
    g = sbm_graph(**graph_kwargs)
    if batch_style == "dict":
        return DataLoader([g], batch_size=None)
    return DataLoader([(g["x"], g["adj"], g["y"], g["train_mask"])], batch_size=1, collate_fn=_first)


def _first(items):
    return items[0]


class FixedGraphGCN(GCN):
    """The same network with the graph kept in the model (a buffer), as code written for one fixed graph
    does: ``forward(x)`` and ``(x, y, train_mask)`` batches."""

    def __init__(self, adj: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("adj", adj)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.adj)

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        loss = F.nll_loss(self(x)[mask], y[mask])
        self.log("train_loss", loss)
        return loss


def fixed_graph_loader(**graph_kwargs) -> tuple[Tensor, DataLoader]:
    """The adjacency (for the model) and a loader of ``(x, y, train_mask)``, the whole graph per batch."""
    g = sbm_graph(**graph_kwargs)
    return g["adj"], DataLoader([(g["x"], g["y"], g["train_mask"])], batch_size=None)


class EdgeListGCN(GCN):
    """The same network with message passing along an edge list (``edge_index``, ``(2, E)``) instead of an
    adjacency matrix, as PyG-free code ported from PyG writes it: ``(x, edge_index, y, train_mask)`` batches,
    ``nn.Linear`` layers, mean aggregation over neighbours with ``index_add``."""

    def __init__(self, features: int = 48, hidden: int = 16, classes: int = 3, **kwargs) -> None:
        super().__init__(features, hidden, classes, **kwargs)
        self.gc1 = nn.Linear(features, hidden)
        self.gc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:  # type: ignore[override]
        x = x.to_dense() if x.is_sparse else x
        h = F.relu(self._propagate(self.gc1(x), edge_index))
        h = F.dropout(h, self.dropout, training=self.training)
        h = self._propagate(self.gc2(h), edge_index)
        return F.log_softmax(h, dim=0 if self.bug == "softmax_over_nodes" else 1)

    @staticmethod
    def _propagate(h: Tensor, edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        total = torch.zeros_like(h).index_add(0, dst, h[src])
        count = torch.zeros(h.shape[0], device=h.device).index_add(0, dst, torch.ones_like(dst, dtype=h.dtype))
        return total / count.clamp_min(1)[:, None]


def edge_list_loader(**graph_kwargs) -> DataLoader:
    """``(x, edge_index, y, train_mask)``, the whole graph per batch; edges both ways, self-loops included."""
    g = sbm_graph(**graph_kwargs)
    edge_index = g["adj"].indices()
    return DataLoader([(g["x"], edge_index, g["y"], g["train_mask"])], batch_size=1, collate_fn=_first)
