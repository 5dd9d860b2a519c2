"""The public entry, :func:`probe_batch_leakage`: decides whether causality is wanted, whether the batch is one
graph (:mod:`.graph`) or independent examples (:mod:`.examples`), and probes integer inputs the model casts
itself as floats when nothing else carries a gradient.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from lightning_recipe.diagnostics.alignment import looks_like_next_step
from lightning_recipe.diagnostics.leakage.evidence import (
    CausalPlan,
    LeakageNotApplicable,
    LeakageReport,
    NoGradientPath,
    NoNodeFeatures,
    ProbeSettings,
)
from lightning_recipe.diagnostics.leakage.examples import input_batch_dims, probe_examples
from lightning_recipe.diagnostics.leakage.graph import not_a_graph_model, probe_graph, read_graph
from lightning_recipe.diagnostics.leakage.passes import Forward
from lightning_recipe.diagnostics.sparse import is_edge_list, is_sparse
from lightning_recipe.diagnostics.state import eval_mode
from lightning_recipe.diagnostics.task import is_int
from lightning_recipe.diagnostics.walk import map_tensors

__all__ = ["probe_batch_leakage"]


def probe_batch_leakage(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    *,
    targets: Tensor | None = None,
    settings: ProbeSettings | None = None,
    **keywords: Any,
) -> LeakageReport:
    """Chart which examples (and positions) each output depends on, in eval mode.

    Args:
        module: the model; its train/eval modes are restored afterwards.
        inputs: what ``forward`` takes: a tensor, or a tuple/dict of tensors, batch included.
        forward: ``(module, inputs) -> output tensor``.
        targets: the labels, used to find the batch size and to recognise next-token training.
        settings: how to probe (default: :class:`~lightning_recipe.diagnostics.leakage.ProbeSettings`'s defaults).
        keywords: fields of :class:`~lightning_recipe.diagnostics.leakage.ProbeSettings` (``batch_dim``,
            ``causal``, ``time_dim``, ``num_examples``, ``tolerance``, ``graph``, ...) that replace those of
            ``settings``.

    Raises:
        LeakageNotApplicable: fewer than two examples, nothing to probe, or no batch dim in the output.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> report = probe_batch_leakage(net, torch.randn(8, 3), lambda m, x: m(x))
        >>> report.batch_leak, report.total_backward_passes
        (False, 6)
    """
    settings = replace(settings or ProbeSettings(), **keywords)
    try:
        return _probe(module, inputs, forward, targets, settings)
    except NoGradientPath as reason:
        if isinstance(reason, NoNodeFeatures):
            raise
        return _probe_as_floats(module, inputs, forward, targets, settings, reason)


def _probe(
    module: nn.Module, inputs: Any, forward: Forward, targets: Tensor | None, settings: ProbeSettings
) -> LeakageReport:
    hypotheses = input_batch_dims(inputs, targets, settings.batch_dim)
    plan = _causal_plan(settings, shifted_batch=looks_like_next_step(inputs, targets, hypotheses[0]))
    with eval_mode(module):
        report = _probe_as_graph(module, inputs, forward, targets, settings)
        if report is not None:
            return report
        return probe_examples(module, inputs, forward, hypotheses, settings, plan)


def _causal_plan(settings: ProbeSettings, shifted_batch: bool) -> CausalPlan:
    """Causality is checked when asked, when ``time_dim`` is given, or when the model is trained on next-token
    targets (``shifted_batch``: the targets are the inputs shifted by one position; or ``next_token`` says so)."""
    if settings.causal is not None:
        return CausalPlan(settings.causal, "asked (`causal=True`)" if settings.causal else "not asked (`causal=False`)")
    if settings.time_dim is not None:
        return CausalPlan(True, "asked (`time_dim` given)")
    if shifted_batch:
        return CausalPlan(True, "the targets are the inputs shifted by one position (next-step training)")
    if settings.next_token:
        return CausalPlan(True, str(settings.next_token))
    return CausalPlan(False, "not asked, and the model is not trained on next-token targets")


def _probe_as_graph(
    module: nn.Module, inputs: Any, forward: Forward, targets: Tensor | None, settings: ProbeSettings
) -> LeakageReport | None:
    """The report when the examples are the nodes of one graph ``forward`` propagates through; ``None`` when they
    are to be probed as independent examples."""
    found = None if settings.graph is False else read_graph(module, inputs, forward, targets)
    if found is None:
        if settings.graph:
            raise LeakageNotApplicable(
                "`graph=True`, but no input is an (N, N) adjacency over the N examples of the batch; pass "
                "`inputs=` returning the node features and the adjacency."
            )
        return None
    if found.adjacencies and found.hops > 0:
        return probe_graph(module, inputs, forward, found, settings)
    if settings.graph or any(is_sparse(t) or is_edge_list(t, found.num_nodes) for t in found.candidates):
        raise not_a_graph_model(found.num_nodes, found.candidates)
    return None  # a dense (N, N) input that never multiplies node features: N examples of N features


def _probe_as_floats(
    module: nn.Module,
    inputs: Any,
    forward: Forward,
    targets: Tensor | None,
    settings: ProbeSettings,
    reason: NoGradientPath,
) -> LeakageReport:
    """uint8 images and the like: the model casts them to float itself, so the same values as float tensors give
    it the same outputs, with a gradient to read."""
    floated = map_tensors(inputs, lambda t: t.float() if is_int(t) else t)
    try:
        report = _probe(module, floated, forward, targets, settings)
    except Exception:  # noqa: BLE001 - the model needs integers after all: the original reason stands
        raise reason from None
    return replace(report, probed=[f"{p} (integer input, probed as float)" for p in report.probed])
